"""A private redis-server for benchmarks that stall, kill, flush or count commands.

Runs on a free port (the shared server on 6379 is never touched), no persistence, DEBUG
enabled for `DEBUG SLEEP`. `commands()` reads the server's own command counters, so
"Redis operations per call" is what Redis executed, not what a client thinks it sent.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rr-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.1)
        deadline = time.monotonic() + 5.0
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.01)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)

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

    def stall(self, seconds: float) -> socket.socket:
        """DEBUG SLEEP on a raw socket; returns at once (recv on it to wait the stall out)."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        return sock

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
