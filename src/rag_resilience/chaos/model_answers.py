"""Answers shaped like a model's: tool calls and JSON that fit the request's schemas.

The chaos server is not a language model, but an app (or LangChain's standard tests, or a
LlamaIndex agent) needs answers of the right *shape*:

- a request with ``tools`` (and a ``tool_choice`` other than ``"none"``) gets one call to the
  chosen tool, else the first, with arguments valid for its JSON schema; once the last
  message is a tool result the model answers in text, so an agent loop finishes;
- ``response_format`` ``json_schema`` gets a JSON instance of that schema, ``json_object`` a
  JSON object (with the keys the prompt names in quotes, e.g. "a JSON with 'setup' and
  'punchline' keys", else ``{"answer": ...}``).

Values come from the question where they can: numbers from the numbers in it (``"What is
magic_function(3)?"`` -> ``{"input": 3}``), strings from a quoted phrase in it, else the
question itself. Deterministic: the same request always gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "instance_of", "json_content", "tool_call_for"]

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_QUOTED = re.compile(r"'([^'\n]{1,200})'|\"([^\"\n]{1,200})\"")
_MAX_DEPTH = 8
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


@dataclass
class _Hints:
    """What the question offers to fill values with, consumed in order."""

    text: str
    numbers: list[str] = field(default_factory=list)
    quoted: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, text: str) -> _Hints:
        return cls(
            text=" ".join(text.split())[:200] or "chaos",
            numbers=_NUMBER.findall(text),
            quoted=[a or b for a, b in _QUOTED.findall(text)],
        )

    def number(self, integer: bool) -> int | float | None:
        while self.numbers:
            raw = self.numbers.pop(0)
            value = float(raw)
            if integer and value.is_integer():
                return int(value)
            if not integer:
                return int(value) if value.is_integer() else value
        return None

    def string(self) -> str:
        return self.quoted.pop(0) if self.quoted else self.text


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    seen = 0
    while isinstance(ref, str) and ref.startswith("#/") and seen < _MAX_DEPTH:
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**node, **extra} if isinstance(node, dict) else extra
        ref = schema.get("$ref")
        seen += 1
    return schema


def _bounded(value: float, schema: dict[str, Any]) -> float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if isinstance(low, (int, float)) and value < low:
        value = low + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
    if isinstance(high, (int, float)) and value > high:
        value = high - (1 if "exclusiveMaximum" in schema and "maximum" not in schema else 0)
    return value


def _instance(schema: Any, root: dict[str, Any], hints: _Hints, depth: int) -> Any:
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            chosen = next(
                (o for o in options if _resolve(o, root).get("type") != "null"), options[0]
            )
            return _instance(chosen, root, hints, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for raw in schema["allOf"]:
            part = _resolve(raw, root)
            if isinstance(part, dict):
                both = {**merged.get("properties", {}), **part.get("properties", {})}
                merged = {**merged, **part, "properties": both}
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return _instance({**merged, **rest}, root, hints, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else ("array" if "items" in schema else "string")
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {
            str(name): _instance(sub, root, hints, depth + 1)
            for name, sub in props.items()
            if not str(name).startswith("$")
        }
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 1))
        items = schema.get("items", {})
        if isinstance(items, list):  # tuple form
            return [_instance(s, root, hints, depth + 1) for s in items]
        return [_instance(items, root, hints, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        found = hints.number(kind == "integer")
        value = _bounded(found if found is not None else 1, schema)
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    fmt = schema.get("format")
    text = _FORMATS[fmt] if isinstance(fmt, str) and fmt in _FORMATS else hints.string()
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    if isinstance(low, int) and len(text) < low:
        text = text + "x" * (low - len(text))
    return text


def instance_of(schema: Any, question: str = "") -> Any:
    """A value valid for the JSON schema `schema` (pydantic's and OpenAI's subset of it:
    objects with every property filled, arrays, enums, consts, anyOf/oneOf/allOf, $ref into
    $defs/definitions, numeric bounds, string lengths and common formats)."""
    root = schema if isinstance(schema, dict) else {}
    return _instance(schema, root, _Hints.of(question), 0)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def message_entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _function_of(tool: Any) -> dict[str, Any] | None:
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function") if tool.get("type", "function") == "function" else None
    return fn if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


def tool_call_for(payload: dict[str, Any], question: str) -> ToolCall | None:
    """The tool call a model would make for this request, or None for a text answer: no
    tools, ``tool_choice`` "none", or the last message already a tool result."""
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    messages = payload.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        return None
    choice = payload.get("tool_choice")
    if choice == "none":
        return None
    functions = [f for f in map(_function_of, tools) if f is not None]
    if not functions:
        return None
    chosen = functions[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f["name"] == wanted), chosen)
    args = instance_of(chosen.get("parameters") or {"type": "object"}, question)
    if not isinstance(args, dict):
        args = {}
    arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(f"{chosen['name']}\x1f{question}".encode(), digest_size=12)
    return ToolCall("call_" + digest.hexdigest(), str(chosen["name"]), arguments)


def _json_object(question: str, answer: str) -> dict[str, Any]:
    keys = [q for q in (a or b for a, b in _QUOTED.findall(question)) if q.isidentifier()]
    if not keys:
        return {"answer": answer}
    return {k: f"{k} of the answer" for k in dict.fromkeys(keys)}


def json_content(payload: dict[str, Any], question: str, answer: str) -> str | None:
    """The JSON text `response_format` asks for, or None when it asks for plain text."""
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        value = instance_of(schema if isinstance(schema, dict) else {}, question)
        return json.dumps(value, ensure_ascii=False)
    if kind == "json_object":
        return json.dumps(_json_object(question, answer), ensure_ascii=False)
    return None
