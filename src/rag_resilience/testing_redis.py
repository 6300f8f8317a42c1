"""A private redis-server for tests and benchmarks that stall, kill, flush or restart Redis.

Each `RedisServer` runs on its own port (the shared server on 6379 is never touched), with no
persistence and DEBUG enabled so a caller can `DEBUG SLEEP` it. Needs the `redis-server`
binary and the `[redis]` extra; nothing is imported until `start()`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on a fixed port that its owner can kill and restart."""

    def __init__(self, port: int, workdir: Path | str) -> None:
        self.port = port
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it answers PING (at most 5 s)."""
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

    def stall(self, seconds: float) -> socket.socket:
        """`DEBUG SLEEP seconds` on a raw socket; returns at once: Redis stops answering
        while every command sent meanwhile waits in its socket buffer (recv on the returned
        socket to wait the stall out)."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        return sock

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
