"""LangChain's standard unit suites over the wrappers, and over the bare inner models.

The wrapped model must pass every standard test the bare inner model passes, so each
suite runs twice: once on the inner class, once on the wrapper (built from the same
parameters by a small test-only subclass).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests
from pydantic import model_validator

from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM

OPENAI_PARAMS = {"model": "gpt-4o-mini", "api_key": "sk-test", "base_url": "http://127.0.0.1:9/v1"}

warnings.filterwarnings("ignore", module="rag_resilience")


class ResilientChatOpenAI(ResilientLLM):
    """Test-only: a ResilientLLM built from ChatOpenAI's constructor parameters, as the
    standard suite instantiates `chat_model_class(**params)`."""

    @model_validator(mode="before")
    @classmethod
    def _build_inner(cls, data: Any) -> Any:
        if isinstance(data, dict) and "llm" not in data:
            data = dict(data)
            data["llm"] = ChatOpenAI(**data)
            data = {"llm": data["llm"]}
        return data


@pytest.fixture
def benchmark(benchmark: Any) -> Any:
    """test_init_time: one measured round instead of seconds of calibration (bare and
    wrapped alike), so the suite stays fast; the init is still exercised."""
    benchmark.disabled = True
    return benchmark


class TestBareChatOpenAIStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return dict(OPENAI_PARAMS)

    @pytest.mark.xfail(reason="needs a syrupy snapshot of ChatOpenAI (langchain-openai's own)")
    def test_serdes(self, *args: Any, **kwargs: Any) -> None:
        super().test_serdes(*args, **kwargs)


class TestResilientChatOpenAIStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ResilientChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return dict(OPENAI_PARAMS)


class ResilientFakeEmbeddings(ResilientEmbeddings):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(DeterministicFakeEmbedding(**kwargs))


class TestBareFakeEmbeddingsStandard(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[Embeddings]:
        return DeterministicFakeEmbedding

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"size": 8}


class TestResilientEmbeddingsStandard(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[Embeddings]:
        return ResilientFakeEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"size": 8}


def test_wrapper_reflects_inner_identity() -> None:
    inner = ChatOpenAI(**OPENAI_PARAMS, max_retries=0)
    llm = ResilientLLM(inner)
    assert llm._llm_type == inner._llm_type == "openai-chat"
    assert llm._identifying_params == inner._identifying_params
    assert llm._get_ls_params()["ls_model_name"] == "gpt-4o-mini"
    assert llm._get_ls_params()["ls_provider"] == "openai"
