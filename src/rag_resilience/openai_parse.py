"""`chat.completions.parse` (and `beta.chat.completions.parse`) under the policy.

The SDK parses the answer into the `response_format` type (or the tools' arguments)
inside the call: a `ValidationError`, `LengthFinishReasonError` or
`ContentFilterFinishReasonError` on a 200 is the model's answer (verdict "parse_failure":
not retried, not a breaker failure, never masked; counted in `parse_failures`). In an
outage a parse request gets a cached answer of the same call (parsed again into the
caller's type) or `UpstreamUnavailableError` from the upstream error: never generic text.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .fallback import stable_key
from .policy import Codec, ResiliencePolicy
from .typed_answers import unavailable

__all__ = ["aparse", "parse"]


def _schema_of(value: Any) -> Any:
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return {"pydantic": f"{value.__module__}.{value.__qualname__}", "schema": schema()}
    return value


def _key(kwargs: dict[str, Any]) -> str:
    keyed = {k: v for k, v in kwargs.items() if k not in ("timeout", "extra_headers")}
    if "response_format" in keyed:
        keyed["response_format"] = _schema_of(keyed["response_format"])
    return stable_key({"kind": "chat.parse", **keyed})


def _codec(kwargs: dict[str, Any]) -> Codec:
    """Cached as the plain completion; decoded by parsing it again into the caller's type."""
    from openai.lib._parsing._completions import parse_chat_completion
    from openai.types.chat import ChatCompletion

    def decode(data: Any) -> Any:
        completion = ChatCompletion.model_validate(data)
        return parse_chat_completion(
            response_format=kwargs.get("response_format", openai_omit()),
            input_tools=kwargs.get("tools", openai_omit()),
            chat_completion=completion,
        )

    def encode(value: Any) -> Any:
        # ParsedChatCompletion[T] declares `parsed` loosely: pydantic warns when it dumps the
        # caller's object there (we drop it below and parse again when decoding)
        data = value.model_dump(mode="json", warnings=False)
        for choice in data.get("choices", ()):
            message = choice.get("message") or {}
            message.pop("parsed", None)
            for call in message.get("tool_calls") or ():
                (call.get("function") or {}).pop("parsed_arguments", None)
        return data

    return Codec(encode, decode)


def openai_omit() -> Any:
    from openai import omit

    return omit


def _annotate(obj: Any, metadata: dict[str, Any]) -> Any:
    with contextlib.suppress(Exception):  # objects that refuse attributes stay as they are
        obj.resilience = metadata
    return obj


def parse(policy: ResiliencePolicy, inner: Any, kwargs: dict[str, Any]) -> Any:
    """`inner.chat.completions.parse(**kwargs)` under `policy`."""
    try:
        served = policy.execute(
            inner.chat.completions.parse,
            (),
            kwargs,
            key=_key(kwargs),
            codec=_codec(kwargs),
            generic=False,
        )
    except Exception as exc:
        typed = unavailable(exc, policy, "structured output")
        if typed is not None:
            raise typed from exc
        raise
    return _annotate(served.value, served.metadata())


async def aparse(policy: ResiliencePolicy, inner: Any, kwargs: dict[str, Any]) -> Any:
    """Async twin of `parse`."""
    try:
        served = await policy.aexecute(
            inner.chat.completions.parse,
            (),
            kwargs,
            key=_key(kwargs),
            codec=_codec(kwargs),
            generic=False,
        )
    except Exception as exc:
        typed = unavailable(exc, policy, "structured output")
        if typed is not None:
            raise typed from exc
        raise
    return _annotate(served.value, served.metadata())
