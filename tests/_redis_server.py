"""A private redis-server for tests that stall, kill, flush or restart Redis.

Each `RedisServer` runs on its own free port (the shared server on 6379 is never touched),
with DEBUG enabled so a test can `DEBUG SLEEP` it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on a fixed port that a test can kill and restart."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

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
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
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

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


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
