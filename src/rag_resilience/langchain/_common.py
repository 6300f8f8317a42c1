"""Shared plumbing of the LangChain wrappers: cache keys, codecs, timeouts, warnings, events.

Kept out of the public modules so each wrapper stays a thin shell over `ResiliencePolicy`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks.manager import ahandle_event, handle_event
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ..adapters import NestedRetriesWarning, accepts_request_timeout, inner_max_retries
from ..degraded import nested
from ..errors import attempts_of
from ..policy import Codec, ResiliencePolicy, Served

logger = logging.getLogger("rag_resilience")

#: Name of the LangChain custom event our wrappers dispatch after every call.
EVENT_NAME = "rag_resilience"

_TIMEOUT_FIELDS = ("request_timeout", "timeout")
_BUILT_CLIENTS = frozenset({"client", "async_client", "root_client", "root_async_client"})


# -- cache keys ---------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """A JSON-friendly, deterministic view of chain inputs/outputs (messages, documents)."""
    if isinstance(value, BaseMessage):
        data = message_to_dict(value)
        data["data"].pop("id", None)
        return data
    if isinstance(value, Document):
        return {"page_content": value.page_content, "metadata": value.metadata}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    to_messages = getattr(value, "to_messages", None)  # PromptValue
    if callable(to_messages):
        return [_jsonable(m) for m in to_messages()]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _jsonable(dump())
    return repr(value)


def _message_part(message: BaseMessage) -> str:
    # Attribute reads by message type: a missing attribute on a pydantic model goes
    # through __getattr__ and an exception, which costs more than the hash.
    content = message.content
    kind = message.type
    text = (
        content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=repr)
    )
    tool_calls = message.tool_calls if kind == "ai" else None  # type: ignore[attr-defined]
    extra = ""
    if tool_calls or message.additional_kwargs:
        extra = json.dumps([tool_calls, message.additional_kwargs], sort_keys=True, default=repr)
    tool_call_id = message.tool_call_id if kind == "tool" else ""  # type: ignore[attr-defined]
    return f"{kind}\x1f{text}\x1f{extra}\x1f{tool_call_id}"


def _digest(payload: str) -> str:
    """A 128-bit BLAKE2b digest: a cache key, not a signature, and about half the cost of
    SHA-256 (whose OpenSSL setup dominates for short payloads) on every call."""
    data = payload.encode("utf-8", "surrogatepass")
    return "b2:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def chat_key(
    identity: str, messages: Sequence[BaseMessage], stop: list[str] | None, params: dict[str, Any]
) -> str:
    """Stable key of one chat call: model identity, messages (ids ignored), stop, call params.

    Hashed by hand (not `stable_key` over dicts) because it runs on every call: a string
    join and one BLAKE2b is a couple of microseconds.
    """
    if len(messages) == 1 and not stop and not params:  # the usual invoke: one message
        return _digest(identity + "\x1e" + _message_part(messages[0]))
    parts = [identity, *(_message_part(m) for m in messages)]
    if stop:
        parts.append("stop\x1f" + "\x1f".join(stop))
    if params:
        parts.append(json.dumps(params, sort_keys=True, default=repr))
    return _digest("\x1e".join(parts))


def input_key(name: str, value: Any) -> str:
    """Stable key of a chain input."""
    if isinstance(value, str):
        payload = f"{name}\x1e{value}"
    else:
        payload = name + "\x1e" + json.dumps(_jsonable(value), sort_keys=True, default=repr)
    return _digest(payload)


# -- codecs -------------------------------------------------------------------------------
class _NotPlain(Exception):
    """A value `_plain_copy` cannot copy exactly as pydantic's `model_dump` would."""


_SCALARS = (str, int, float, bool, type(None))


def _plain_copy(value: Any) -> Any:
    """A copy of a JSON-like tree (dicts with str keys, lists, tuples, exact scalars), equal
    to what `model_dump` returns for it; raises `_NotPlain` on anything else (models,
    enums, subclasses), for which `model_dump` is the authority."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _NotPlain
            out[k] = _plain_copy(v)
        return out
    if kind is list:
        return [_plain_copy(v) for v in value]
    if kind is tuple:
        return tuple(_plain_copy(v) for v in value)
    raise _NotPlain


def _fast_ai_dict(message: BaseMessage) -> dict[str, Any] | None:
    """`message_to_dict` for a plain AIMessage, built without the pydantic serializer
    (~2 µs of the per-call cache write); None when the message needs the serializer.

    Only the type, the content and the fields that differ from their defaults are
    written: decoding fills in the defaults, so the message read back is equal to the
    one `message_to_dict` would give, and the usual live answer stays a small dict.
    """
    if type(message) is not AIMessage or message.__pydantic_extra__:
        return None
    d = message.__dict__
    try:
        if d["type"] != "ai":
            return None
        content = d["content"]
        data: dict[str, Any] = {
            "content": content if type(content) is str else _plain_copy(content),
            "type": "ai",
        }
        if d["additional_kwargs"]:
            data["additional_kwargs"] = _plain_copy(d["additional_kwargs"])
        if d["response_metadata"]:
            data["response_metadata"] = _plain_copy(d["response_metadata"])
        for name in ("name", "id"):
            value = d[name]
            if value is not None:
                data[name] = value if type(value) is str else _plain_copy(value)
        if d["tool_calls"]:
            data["tool_calls"] = _plain_copy(d["tool_calls"])
        if d["invalid_tool_calls"]:
            data["invalid_tool_calls"] = _plain_copy(d["invalid_tool_calls"])
        if d["usage_metadata"] is not None:
            data["usage_metadata"] = _plain_copy(d["usage_metadata"])
    except (_NotPlain, KeyError, RecursionError):
        return None
    return {"type": "ai", "data": data}


def _encode_message(message: BaseMessage) -> dict[str, Any]:
    data = _fast_ai_dict(message) or message_to_dict(message)
    meta = data["data"].get("response_metadata")
    if meta and "resilience" in meta:
        data["data"]["response_metadata"] = {k: v for k, v in meta.items() if k != "resilience"}
    return data


def encode_chat_result(result: ChatResult) -> dict[str, Any]:
    return {
        "generations": [
            {"message": _encode_message(g.message), "info": g.generation_info}
            for g in result.generations
        ],
        "llm_output": result.llm_output,
    }


def decode_chat_result(data: dict[str, Any]) -> ChatResult:
    gens = data["generations"]
    messages = messages_from_dict([g["message"] for g in gens])
    return ChatResult(
        generations=[
            ChatGeneration(message=m, generation_info=g.get("info"))
            for m, g in zip(messages, gens, strict=True)
        ],
        llm_output=data.get("llm_output"),
    )


def encode_chunks(chunks: list[ChatGenerationChunk]) -> dict[str, Any]:
    """A complete live stream, stored in the same form as an invoke's ChatResult."""
    merged: ChatGenerationChunk | None = None
    for chunk in chunks:
        merged = chunk if merged is None else merged + chunk
    if merged is None:
        return {"generations": [], "llm_output": None}
    message = merged.message
    return {
        "generations": [{"message": _encode_message(message), "info": merged.generation_info}],
        "llm_output": None,
    }


def decode_chunks(data: dict[str, Any]) -> list[ChatGenerationChunk]:
    out: list[ChatGenerationChunk] = []
    for gen in decode_chat_result(data).generations:
        msg = gen.message
        chunk = AIMessageChunk(
            content=msg.content,
            additional_kwargs=msg.additional_kwargs,
            response_metadata=msg.response_metadata,
            tool_call_chunks=[
                {
                    "name": tc["name"],
                    "args": json.dumps(tc["args"]),
                    "id": tc.get("id"),
                    "index": i,
                    "type": "tool_call_chunk",
                }
                for i, tc in enumerate(getattr(msg, "tool_calls", []) or [])
            ],
            usage_metadata=getattr(msg, "usage_metadata", None),
        )
        out.append(ChatGenerationChunk(message=chunk, generation_info=gen.generation_info))
    return out


CHAT_RESULT_CODEC = Codec(encode_chat_result, decode_chat_result)
CHUNKS_CODEC = Codec(encode_chunks, decode_chunks)


def encode_output(value: Any) -> Any:
    """Chain outputs: messages and documents tagged so they decode to the same types."""
    if isinstance(value, BaseMessage):
        return {"__lc_message__": _encode_message(value)}
    if isinstance(value, Document):
        return {"__lc_document__": {"page_content": value.page_content, "metadata": value.metadata}}
    if isinstance(value, list):
        return [encode_output(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode_output(v) for k, v in value.items()}
    return value


def decode_output(value: Any) -> Any:
    if isinstance(value, dict):
        if "__lc_message__" in value and len(value) == 1:
            return messages_from_dict([value["__lc_message__"]])[0]
        if "__lc_document__" in value and len(value) == 1:
            return Document(**value["__lc_document__"])
        return {k: decode_output(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_output(v) for v in value]
    return value


OUTPUT_CODEC = Codec(encode_output, decode_output)


# -- generic answers ----------------------------------------------------------------------
def generic_text(setting: bool | str, error: BaseException, policy: ResiliencePolicy) -> str:
    """The text of the generic answer for `error` under a `generic_fallback` setting."""
    return str(policy.generic_answer(error, setting if isinstance(setting, str) else True))


# -- events to callback handlers ----------------------------------------------------------
def event_data(
    kind: str,
    policy: ResiliencePolicy,
    served: Served[Any] | None,
    error: BaseException | None = None,
    **extra: Any,
) -> dict[str, Any]:
    # `nested`: one component of an outer wrapper's call (the handler counts the user call
    # once, from the outer wrapper's event)
    data: dict[str, Any] = {"component": kind, "policy": policy.name, "nested": nested(policy)}
    if served is not None:
        data.update(served.metadata())
        if served.error is not None:
            data["error_class"] = type(served.error).__name__
    if error is not None:
        data.update(
            {
                "source": "error",
                "degraded": False,
                "error_class": type(error).__name__,
                "error": f"{type(error).__name__}: {error}",
            }
        )
        # the attempts the policy spent before giving up (the handler counts them)
        spent = attempts_of(error)
        if spent is not None:
            data["attempts"] = spent
    breaker = policy.breaker
    if breaker is not None:
        data["breaker_state"] = breaker.get_state().value
    data.update(extra)
    return data


def dispatch(run_manager: Any, data: dict[str, Any]) -> None:
    """Tell the run's callback handlers how the call was served (a LangChain custom event)."""
    if run_manager is None or not run_manager.handlers:
        return
    try:
        handle_event(
            run_manager.handlers,
            "on_custom_event",
            "ignore_custom_event",
            EVENT_NAME,
            data,
            run_id=run_manager.run_id,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
        )
    except Exception:
        logger.debug("rag_resilience: custom event dispatch failed", exc_info=True)


async def adispatch(run_manager: Any, data: dict[str, Any]) -> None:
    if run_manager is None or not run_manager.handlers:
        return
    try:
        await ahandle_event(
            run_manager.handlers,
            "on_custom_event",
            "ignore_custom_event",
            EVENT_NAME,
            data,
            run_id=run_manager.run_id,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
        )
    except Exception:
        logger.debug("rag_resilience: custom event dispatch failed", exc_info=True)


def dispatch_adhoc(data: dict[str, Any]) -> None:
    """Custom event to the handlers of the current run, if any (embeddings have no run)."""
    try:
        from langchain_core.callbacks.manager import dispatch_custom_event

        dispatch_custom_event(EVENT_NAME, data)
    except Exception:  # no parent run: nobody to tell
        pass


# -- nested retries and timeouts ----------------------------------------------------------
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def effective_max_retries(inner: Any) -> int:
    """The inner model's own retries, including the SDK default langchain-openai leaves
    at None (`max_retries=None` means the openai client's 2)."""
    retries = inner_max_retries(inner)
    if retries > 0:
        return retries
    for attr in ("root_client", "root_async_client", "client", "async_client"):
        client = getattr(inner, attr, None)
        if client is None:
            continue
        for obj in (client, getattr(client, "_client", None)):
            value = getattr(obj, "max_retries", None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 0


def warn_nested(inner: Any, policy: ResiliencePolicy, kind: str) -> int:
    """Warn once per wrapped class when it retries on its own; returns its retry count."""
    retries = effective_max_retries(inner)
    if retries <= 0:
        return retries
    ours = policy.retry.max_retries + 1 if policy.retry is not None else 1
    cls = type(inner)
    marker = (f"{cls.__module__}.{cls.__qualname__}", kind)
    with _warned_lock:
        if marker in _warned:
            return retries
        _warned.add(marker)
    message = (
        f"{cls.__name__} retries by itself (max_retries={retries}): wrapped by rag-resilience "
        f"({ours} attempts), one call can make up to {ours * (retries + 1)} upstream requests. "
        f"Build it with max_retries=0, e.g. {cls.__name__}(..., max_retries=0), and let the "
        "policy retry."
    )
    warnings.warn(message, NestedRetriesWarning, stacklevel=4)
    logger.warning(message)
    return retries


class NoTimeoutWarning(UserWarning):
    """The wrapped model has no timeout setting: a stalled sync call cannot be cut."""


def with_timeout(inner: Any, timeout: float | None) -> Any:
    """A copy of `inner` whose own timeout is the policy's per-attempt timeout, if it has a
    timeout setting left unset; `inner` itself is never mutated.

    langchain-openai builds its HTTP clients at construction, so a `model_copy` would keep
    the old (infinite) timeout: the copy is re-validated from the user's explicit settings
    so the clients are rebuilt. Falls back to `model_copy` for models that cannot be.
    """
    if timeout is None:
        return inner
    fields = getattr(type(inner), "model_fields", None)
    if not fields:
        _warn_no_timeout(inner)
        return inner
    name = next((f for f in _TIMEOUT_FIELDS if f in fields), None)
    if name is None:
        _warn_no_timeout(inner)
        return inner
    if getattr(inner, name, None) is not None:
        return inner
    # Clients the model built itself are in model_fields_set too (assigned by its
    # validator); leaving them out makes the copy build new ones with the timeout.
    explicit = {k: getattr(inner, k) for k in inner.model_fields_set if k not in _BUILT_CLIENTS}
    explicit[name] = timeout
    try:
        return type(inner).model_validate(explicit)
    except Exception:
        logger.debug(
            "rag_resilience: re-validating %s failed; using model_copy", type(inner), exc_info=True
        )
        return inner.model_copy(update={name: timeout})


def warn_deadline_uncut(inner: Any, policy: ResiliencePolicy) -> None:
    """Warn once per class when a sync call of `inner` cannot be cut at the call's deadline:
    it takes no per-request timeout (only langchain-openai's models pass one to the SDK),
    so a stalled request runs to its own timeout (the attempt timeout of its copy)."""
    if policy.deadline is None or accepts_request_timeout(inner):
        return
    fields = getattr(type(inner), "model_fields", None) or {}
    if not any(f in fields for f in _TIMEOUT_FIELDS):
        return  # `_warn_no_timeout` tells about it
    cls = type(inner)
    marker = (f"{cls.__module__}.{cls.__qualname__}", "deadline")
    with _warned_lock:
        if marker in _warned:
            return
        _warned.add(marker)
    message = (
        f"{cls.__name__} takes no per-request timeout: rag-resilience cuts its stalled sync "
        f"calls at the attempt timeout ({policy.attempt_timeout}s), not at what the call's "
        f"deadline ({policy.deadline}s) leaves (async calls are cancelled at the deadline)."
    )
    warnings.warn(message, NoTimeoutWarning, stacklevel=4)
    logger.warning(message)


def _warn_no_timeout(inner: Any) -> None:
    cls = type(inner)
    marker = (f"{cls.__module__}.{cls.__qualname__}", "timeout")
    with _warned_lock:
        if marker in _warned:
            return
        _warned.add(marker)
    message = (
        f"{cls.__name__} has no timeout setting: rag-resilience cannot cut a stalled sync call, "
        "neither at the policy's attempt_timeout nor at the call's deadline (async calls are "
        "cancelled at both)."
    )
    warnings.warn(message, NoTimeoutWarning, stacklevel=4)
    logger.warning(message)


def reset_warnings() -> None:
    """Forget which classes were warned about (tests)."""
    with _warned_lock:
        _warned.clear()


def generic_message(text: str) -> AIMessage:
    return AIMessage(content=text)
