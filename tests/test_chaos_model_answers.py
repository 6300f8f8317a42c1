"""The chaos server answers like a model: tool calls valid for the tool's schema, a text
answer once the last message is a tool result, JSON for `response_format`; streamed too.
Over real HTTP with the openai SDK, sync and async."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai

from rag_resilience.chaos import ChaosServer
from rag_resilience.chaos.model_answers import instance_of

pytest_plugins = ["rag_resilience.chaos.pytest_plugin"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 5},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        },
    },
}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 2},
        "mayor": {"anyOf": [{"type": "null"}, {"type": "string"}]},
    },
    "required": ["name", "population", "tags", "mayor"],
    "additionalProperties": False,
    "$defs": {"Tag": {"type": "object", "properties": {"label": {"const": "x"}}}},
}


def clients(server: ChaosServer) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    kw: dict[str, Any] = {"base_url": server.base_url, "api_key": "sk-test", "max_retries": 0}
    return openai.OpenAI(**kw), openai.AsyncOpenAI(**kw)


def test_schema_instances_fit_their_schema() -> None:
    value = instance_of(CITY_SCHEMA, "Tell me about 'Lyon', 513000 people")
    assert value == {
        "name": "Lyon",
        "population": 513000,
        "tags": [{"label": "x"}, {"label": "x"}],
        "mayor": "Tell me about 'Lyon', 513000 people",
    }
    assert instance_of({"type": "integer", "minimum": 10}, "3") == 10
    assert instance_of({"type": "string", "format": "date"}) == "2026-01-01"
    assert instance_of({"allOf": [{"properties": {"a": {"type": "boolean"}}}]}) == {"a": True}


def test_tools_get_a_tool_call_then_a_text_answer(chaos_server: ChaosServer) -> None:
    sync, asyn = clients(chaos_server)
    messages: list[Any] = [{"role": "user", "content": "Weather in 'Oslo' for 3 days?"}]
    reply = sync.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert args == {"city": "Oslo", "days": 3, "unit": "celsius"}

    # the chosen tool, asynchronously
    chosen = asyncio.run(
        asyn.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "add 2 and 40"}],
            tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}},
        )
    )
    add_call = chosen.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert add_call.function.name == "add"  # type: ignore[union-attr]
    assert json.loads(add_call.function.arguments) == {"a": 2, "b": 40}  # type: ignore[union-attr]

    # a tool result as the last message: the model answers in text, so agents finish
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    final = sync.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert "sunny, 21 C" in (final.choices[0].message.content or "")
    none = sync.chat.completions.create(
        model="gpt-4o-mini", messages=messages[:1], tools=[WEATHER], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None


def test_streamed_tool_call_reassembles(chaos_server: ChaosServer) -> None:
    sync, asyn = clients(chaos_server)
    kw: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Weather in 'São Paulo' for 2 days?"}],
        "tools": [WEATHER],
        "stream": True,
    }

    def collect(chunks: list[Any]) -> tuple[str, str, str | None]:
        name, arguments, finish = "", "", None
        for chunk in chunks:
            choice = chunk.choices[0]
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
        return name, arguments, finish

    async def astream() -> list[Any]:
        return [c async for c in await asyn.chat.completions.create(**kw)]

    for chunks in (list(sync.chat.completions.create(**kw)), asyncio.run(astream())):
        name, arguments, finish = collect(chunks)
        assert (name, finish) == ("get_weather", "tool_calls")
        assert json.loads(arguments) == {"city": "São Paulo", "days": 2, "unit": "celsius"}


def test_response_format_gets_valid_json(chaos_server: ChaosServer) -> None:
    sync, asyn = clients(chaos_server)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    messages = [{"role": "user", "content": "About 'Lyon', 513000 people"}]
    reply = sync.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        response_format=fmt,  # type: ignore[arg-type]
    )
    parsed = json.loads(reply.choices[0].message.content or "")
    assert parsed["name"] == "Lyon" and parsed["population"] == 513000

    async def streamed() -> str:
        stream = await asyn.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]
            response_format=fmt,  # type: ignore[arg-type]
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert json.loads(asyncio.run(streamed())) == parsed

    obj = sync.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "A JSON with 'setup' and 'punchline' keys"}],
        response_format={"type": "json_object"},
    )
    assert set(json.loads(obj.choices[0].message.content or "")) == {"setup", "punchline"}
