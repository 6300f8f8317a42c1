"""A private redis-server for benchmarks that stall, kill, flush or count commands.

Runs on a free port (the shared server on 6379 is never touched), no persistence, DEBUG
enabled for `DEBUG SLEEP`. `commands()` reads the server's own command counters, so
"Redis operations per call" is what Redis executed, not what a client thinks it sent.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from rag_resilience.testing_redis import RedisServer, free_port


class PrivateRedis(RedisServer):
    """A `RedisServer` on a free port in a temporary directory, removed on exit."""

    def __init__(self) -> None:
        super().__init__(free_port(), tempfile.mkdtemp(prefix="rr-bench-redis-"))
        self.dir = str(self.workdir)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5.0)

    def commands(self, client: Any) -> int:
        """Commands Redis executed so far, not counting INFO/CONFIG (the reads here)."""
        stats = client.info("commandstats")
        return sum(
            v["calls"]
            for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_config", "cmdstat_ping")
        )

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
