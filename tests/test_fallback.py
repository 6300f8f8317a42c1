"""GracefulFallbacks: the seed's demos, age on a fake clock, TTL, LRU bound, stable keys."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER, GracefulFallbacks, stable_key
from rag_resilience.stores.memory import MemoryStore
from rag_resilience.testing import FakeClock, fake_clock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- the seed's demos -----------------------------------------------------------------------
def test_seed_last_known_good_with_age(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock)
    question = "What is deep learning?"
    answer = "Deep learning uses neural networks with multiple layers..."
    fallbacks.update_cache(question, answer)
    clock.advance(2.0)  # the seed's time.sleep(2)
    result = fallbacks.get_last_known_good(question)
    assert result is not None
    cached_answer, age = result
    assert cached_answer == answer and age == pytest.approx(2.0)
    assert fallbacks.get_last_known_good("Unknown question?") is None


def test_seed_cached_or_fallback_and_generic(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock)
    questions = [
        "What is machine learning?",
        "How does a neural network work?",
        "What is gradient descent?",
    ]
    for q in questions:
        fallbacks.update_cache(q, f"[AI-generated answer about: {q}]")
    cached = fallbacks.get_cached_or_fallback(questions[0], "Service temporarily unavailable")
    assert cached == "[AI-generated answer about: What is machine learning?]"
    new_question = "What is quantum computing?"
    generic = fallbacks.get_generic_answer(new_question)
    assert fallbacks.get_cached_or_fallback(new_question, generic) == generic
    assert generic == DEFAULT_GENERIC_ANSWER and "unavailable" in generic
    assert GracefulFallbacks(generic_answer="Try later").get_generic_answer() == "Try later"
    assert fallbacks.stats()["entries"] == 3


def test_default_clock_is_resolved_at_call_time() -> None:
    fallbacks = GracefulFallbacks()  # built before the fake clock is installed
    with fake_clock() as clock:
        fallbacks.update_cache("q", "a")
        clock.advance(42.0)
        assert fallbacks.get_last_known_good("q") == ("a", pytest.approx(42.0))


def test_overwrite_replaces_value_and_resets_age(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock)
    fallbacks.update_cache("q", "old")
    clock.advance(100.0)
    fallbacks.update_cache("q", "new")
    clock.advance(1.0)
    assert fallbacks.get_last_known_good("q") == ("new", pytest.approx(1.0))
    assert len(fallbacks) == 1


# -- TTL and the LRU bound ------------------------------------------------------------------
def test_ttl_expiry(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(ttl=10.0, clock=clock)
    fallbacks.update_cache("q", "a")
    clock.advance(9.9)
    assert fallbacks.get_last_known_good("q") == ("a", pytest.approx(9.9))
    assert len(fallbacks) == 1
    clock.advance(0.1)
    assert fallbacks.get_last_known_good("q") is None
    assert fallbacks.get_cached_or_fallback("q", "fb") == "fb"
    assert len(fallbacks) == 0


def test_no_ttl_never_expires(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(ttl=None, clock=clock)
    fallbacks.update_cache("q", "a")
    clock.advance(10 * 365 * 86_400.0)
    found = fallbacks.get_last_known_good("q")
    assert found is not None and found[0] == "a" and found[1] == pytest.approx(10 * 365 * 86_400.0)


def test_lru_bound_evicts_least_recently_used(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(max_entries=3, clock=clock)
    for q in "abc":
        fallbacks.update_cache(q, q.upper())
    assert fallbacks.get_last_known_good("a") is not None  # a is now the most recent
    fallbacks.update_cache("d", "D")  # evicts b, the least recently used
    assert fallbacks.get_last_known_good("b") is None
    assert [fallbacks.get_cached_or_fallback(q, None) for q in "acd"] == ["A", "C", "D"]
    assert len(fallbacks) == 3
    fallbacks.update_cache("c", "C2")  # rewriting refreshes too, and does not grow
    fallbacks.update_cache("e", "E")  # now a is the least recent
    assert fallbacks.get_last_known_good("a") is None
    assert [fallbacks.get_cached_or_fallback(q, None) for q in "cde"] == ["C2", "D", "E"]


def test_lru_bound_holds_under_many_writes(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(max_entries=50, clock=clock)
    for i in range(1000):
        fallbacks.update_cache(f"q{i}", i)
    assert len(fallbacks) == 50
    assert fallbacks.get_last_known_good("q949") is None
    assert fallbacks.get_last_known_good("q950") == (950, 0.0)


def test_invalidate_clear_and_stats(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock, max_entries=10, ttl=60.0)
    fallbacks.update_cache("a", 1)
    fallbacks.update_cache("b", 2)
    fallbacks.get_last_known_good("a")
    fallbacks.get_last_known_good("zzz")
    fallbacks.invalidate("a")
    assert fallbacks.get_last_known_good("a") is None
    stats = fallbacks.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["writes"] == 2
    assert stats["entries"] == 1 and stats["max_entries"] == 10 and stats["ttl_s"] == 60.0
    fallbacks.clear()
    assert len(fallbacks) == 0 and fallbacks.get_last_known_good("b") is None


async def test_async_twins(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock, ttl=5.0)
    await fallbacks.aupdate_cache({"q": 1}, ["x"])
    clock.advance(3.0)
    assert await fallbacks.aget_last_known_good({"q": 1}) == (["x"], pytest.approx(3.0))
    clock.advance(2.0)
    assert await fallbacks.aget_last_known_good({"q": 1}) is None


def test_shared_store_is_keyed_by_name(clock: FakeClock) -> None:
    store = MemoryStore()
    a = GracefulFallbacks(name="chat", store=store, clock=clock)
    b = GracefulFallbacks(name="chat", store=store, clock=clock)
    other = GracefulFallbacks(name="embed", store=store, clock=clock)
    a.update_cache("q", "answer")
    assert b.get_last_known_good("q") == ("answer", 0.0)
    assert other.get_last_known_good("q") is None


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": 2.5}, "max_entries"),
    ],
)
def test_invalid_configuration_names_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        GracefulFallbacks(**kwargs)


# -- stable keys ----------------------------------------------------------------------------
def test_stable_key_short_strings_are_kept() -> None:
    assert stable_key("What is RAG?") == "What is RAG?"


def test_stable_key_long_strings_are_hashed() -> None:
    long = "x" * 5000
    key = stable_key(long)
    assert key == "sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert len(key) < 100 and stable_key(long + "y") != key


def test_stable_key_dicts_ignore_key_order_and_tuples_match_lists() -> None:
    a = {"model": "gpt-4o-mini", "temperature": 0.0, "messages": [("user", "hi")]}
    b = {"messages": [["user", "hi"]], "temperature": 0.0, "model": "gpt-4o-mini"}
    assert stable_key(a) == stable_key(b)
    canonical = json.dumps(a, sort_keys=True, separators=(",", ":"))
    assert stable_key(a) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert stable_key(("m", "q")) == stable_key(["m", "q"])
    assert stable_key({**a, "temperature": 0.7}) != stable_key(a)
    assert stable_key(("m", "q")) != stable_key(("m", "q2"))
    assert stable_key(1) != stable_key("1")  # non-strings are hashed, strings kept


def test_stable_key_same_in_another_process() -> None:
    """Keys must not depend on Python's per-process hash randomisation."""
    value = {"model": "m", "input": ("a", "b"), "params": {"t": 0.2, "n": 1}}
    code = (
        "from rag_resilience.fallback import stable_key;"
        "print(stable_key({'params': {'n': 1, 't': 0.2}, 'input': ('a', 'b'), 'model': 'm'}));"
        "print(stable_key('z' * 300))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out == [stable_key(value), stable_key("z" * 300)]


def test_dict_queries_round_trip_through_the_cache(clock: FakeClock) -> None:
    fallbacks = GracefulFallbacks(clock=clock)
    fallbacks.update_cache({"b": 2, "a": 1}, "v")
    assert fallbacks.get_last_known_good({"a": 1, "b": 2}) == ("v", 0.0)


def test_counters_exact_under_threads(clock: FakeClock) -> None:
    import threading

    fallbacks = GracefulFallbacks(clock=clock, max_entries=100)

    def work(i: int) -> None:
        for j in range(200):
            fallbacks.update_cache(f"{i}:{j % 50}", j)
            fallbacks.get_last_known_good(f"{i}:{(j + 25) % 50}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stats = fallbacks.stats()
    assert stats["writes"] == 16 * 200
    assert stats["hits"] + stats["misses"] == 16 * 200
    assert stats["entries"] == 100
