"""Shared test setup: the chaos server fixtures, and no stray global state between tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_resilience.clock import get_clock, set_default_clock

pytest_plugins = ["rag_resilience.chaos.pytest_plugin"]


@pytest.fixture(autouse=True)
def _restore_default_clock() -> Iterator[None]:
    """A test that installs a fake clock and fails must not leak it into the next test."""
    before = get_clock()
    yield
    set_default_clock(before)
