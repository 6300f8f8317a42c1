"""The adapters' hand-written fast paths must equal the slow, obviously-right versions."""

from __future__ import annotations

import json
import math
import sys
from array import array
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_openai import ChatOpenAI

from rag_resilience.embedding_cache import _to_native, decode_vector, encode_vector
from rag_resilience.langchain._common import _fast_ai_dict
from rag_resilience.langchain.llm import _Target
from rag_resilience.policy import ResiliencePolicy

MESSAGES = [
    AIMessage(content="plain"),
    AIMessage(content="with id", id="run-1", name="bot"),
    AIMessage(
        content="",
        tool_calls=[{"name": "lookup", "args": {"q": "x", "n": [1, 2]}, "id": "call_1"}],
    ),
    AIMessage(
        content=[{"type": "text", "text": "block"}],
        response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "stop"},
        usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        additional_kwargs={"refusal": None, "nested": {"a": [1, 2]}},
    ),
    AIMessage(
        content="half a call",
        invalid_tool_calls=[{"name": "f", "args": "{oops", "id": "c2", "error": "bad json"}],
    ),
]


@pytest.mark.parametrize("message", MESSAGES)
def test_fast_ai_dict_decodes_to_what_message_to_dict_decodes_to(message: AIMessage) -> None:
    fast = _fast_ai_dict(message)
    assert fast is not None
    # It writes only the non-default fields; what comes back from the cache (also through
    # JSON, as a shared store would keep it) is the message `message_to_dict` describes.
    reference = messages_from_dict([message_to_dict(message)])[0]
    assert messages_from_dict([fast])[0] == reference == message
    assert messages_from_dict([json.loads(json.dumps(fast))])[0] == reference
    assert set(fast["data"]) <= set(message_to_dict(message)["data"])
    # Nothing in the cached dict aliases the live message: mutating one leaves the other.
    data = fast["data"]
    for name in ("response_metadata", "additional_kwargs", "usage_metadata"):
        if name in data:
            data[name]["poked"] = True
            assert "poked" not in (getattr(message, name) or {})
    if "tool_calls" in data:
        data["tool_calls"][0]["args"]["poked"] = True
        assert "poked" not in message.tool_calls[0]["args"]


@pytest.mark.parametrize("message", [HumanMessage(content="hi"), AIMessageChunk(content="chunk")])
def test_fast_ai_dict_declines_what_it_does_not_handle(message: Any) -> None:
    assert _fast_ai_dict(message) is None


def _same_as_array(values: list[Any]) -> None:
    try:
        expected: bytes | type[BaseException] = array("f", values).tobytes()
    except Exception as exc:  # the fast path must raise exactly what array("f") raises
        expected = type(exc)
    if isinstance(expected, bytes):
        assert _to_native(values) == expected
        assert decode_vector(_to_native(values)) == pytest.approx(
            array("f", values).tolist(), nan_ok=True
        )
        little = array("f", values)
        if sys.byteorder != "little":  # pragma: no cover
            little.byteswap()
        assert decode_vector(encode_vector(values)) == pytest.approx(
            array("f", values).tolist(), nan_ok=True
        )
    else:
        with pytest.raises(expected):
            _to_native(values)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [0.0, -1.5, 3.25],
        [math.nan, math.inf, -math.inf],
        [1e39, -1e39],  # beyond float32
        [1, 2, 3],  # ints
        [1.0, "x"],  # not a number
    ],
)
def test_float32_packing_matches_array(values: list[Any]) -> None:
    _same_as_array(values)


@given(st.lists(st.floats(width=64, allow_nan=False), max_size=64))
def test_float32_packing_matches_array_for_any_floats(values: list[float]) -> None:
    _same_as_array(values)


def test_streaming_setting_is_read_without_errors() -> None:
    policy = ResiliencePolicy.preset("balanced", name="internals")
    streaming = _Target(ChatOpenAI(api_key="sk-x", streaming=True, max_retries=0), policy)
    plain = _Target(ChatOpenAI(api_key="sk-x", max_retries=0), policy)
    assert streaming._streaming_setting(streaming.model) is True
    assert plain._streaming_setting(plain.model) is False
