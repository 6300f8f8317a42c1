"""Pytest fixtures for the chaos server.

Enable with ``pytest_plugins = ["rag_resilience.chaos.pytest_plugin"]`` or import the
fixtures. One server per session is shared; `chaos_server` resets it (no faults, fresh
counters, RNG re-seeded) before and after each test, so tests stay independent and fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .server import ChaosServer

__all__ = ["chaos_server", "chaos_server_factory", "chaos_server_session"]


@pytest.fixture(scope="session")
def chaos_server_session() -> Iterator[ChaosServer]:
    """The shared session server (seed 0, no faults, 1536-dim embeddings)."""
    server = ChaosServer(seed=0)
    with server:
        yield server


@pytest.fixture
def chaos_server(chaos_server_session: ChaosServer) -> Iterator[ChaosServer]:
    """A running chaos server with no faults; set them with ``chaos_server.set_faults(...)``.

    Between tests it is reset and left to finish what an earlier test left in flight, so
    no test sees another's requests in its counters."""
    chaos_server_session.reset()
    chaos_server_session.wait_idle()
    yield chaos_server_session
    chaos_server_session.reset()
    chaos_server_session.wait_idle()


@pytest.fixture
def chaos_server_factory() -> Iterator[Callable[..., ChaosServer]]:
    """Build dedicated servers (own seed/dimension/clock); all are stopped after the test."""
    servers: list[ChaosServer] = []

    def make(**kwargs: Any) -> ChaosServer:
        server = ChaosServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
