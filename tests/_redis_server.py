"""A private redis-server for tests that stall, kill, flush or restart Redis.

Each `RedisServer` runs on its own free port (the shared server on 6379 is never touched),
with DEBUG enabled so a test can `DEBUG SLEEP` it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_resilience.testing_redis import REDIS_SERVER, RedisServer, free_port

__all__ = ["REDIS_SERVER", "RedisServer", "free_port", "own_redis"]

def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Body of a `redis_server` fixture: start a private server, kill it afterwards."""
    if not os.path.exists(REDIS_SERVER):
        reason = f"redis-server binary not found at {REDIS_SERVER}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()
