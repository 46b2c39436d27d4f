"""Test support of the libcloud provider that imports no apache-libcloud: an S3 store for
offline runs (moto's server in a child process on 127.0.0.1, stopped by its PID) and the
environment the conformance site reads.

moto's server is started as a command (``python -m moto.server``), not imported: the
providers never import one another, so this is not providers/aws/testing.py's MotoServer
but the same launch.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO

from regionvault.core.errors import RegionVaultError

__all__ = ["S3Server", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """moto's S3 on 127.0.0.1:``port`` in a child process; any key and secret log in."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, timeout: float = 30.0) -> S3Server:
        out: IO[bytes] | int = subprocess.DEVNULL
        cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._process = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RegionVaultError(f"moto server exited with code {code} while starting")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RegionVaultError(f"moto server on {self.endpoint} not ready in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=10)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
