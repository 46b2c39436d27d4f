"""gcp-storage-emulator, the Cloud Storage emulator, for the GCP tests and the provider's
conformance support: started as a child process in a session of its own on 127.0.0.1,
in memory, waited for until it answers, and stopped by its PID.

What the emulator does not do (the tests assert the requests the real client sends instead,
and the conformance suite skips what cannot be shown offline, saying why): it ignores
``ifGenerationMatch`` and every other precondition, ``maxResults`` and ``pageToken`` (a
listing is one page), the location of a bucket, object retention and holds (dropped from
the object's metadata) and bucket lock.

Nothing here imports the Google SDK. ``python -m regionvault.providers.gcp.emulator
[--port P]`` starts one, prints its endpoint, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from regionvault.core.errors import RegionVaultError

__all__ = ["EmulatorUnavailable", "GcsEmulator", "emulator_command", "free_port"]


class EmulatorUnavailable(RegionVaultError):
    """The storage emulator is not installed here, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_command() -> list[str]:
    """``gcp-storage-emulator`` next to this Python (a venv's), else on PATH."""
    beside = Path(sys.executable).parent / "gcp-storage-emulator"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gcp-storage-emulator")
    if found is not None:
        return [found]
    raise EmulatorUnavailable(
        "gcp-storage-emulator is not installed: pip install -e '.[test]' "
        "(it is among the test dependencies)"
    )


class GcsEmulator:
    """gcp-storage-emulator on 127.0.0.1 (``endpoint``: ``http://127.0.0.1:P``), in memory,
    in a child process of its own session; a context manager."""

    def __init__(self, *, port: int | None = None, log: Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 30.0) -> GcsEmulator:
        """Start the emulator and wait, at most ``timeout`` seconds, until it answers."""
        if self._process is not None:
            return self
        command = [
            *emulator_command(),
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--in-memory",
            "-q",
        ]
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log is not None:
            self._log_file = out = self.log.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a terminal's Ctrl-C reaches the test run, not this
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise EmulatorUnavailable(
                    f"gcp-storage-emulator exited with code {code} while starting on "
                    f"{self.endpoint}"
                )
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorUnavailable(
                    f"gcp-storage-emulator on {self.endpoint} not ready in {timeout}s"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        """Any HTTP answer to a bucket listing means it is serving."""
        url = f"{self.endpoint}/storage/v1/b?project=ready-check"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the child by its PID (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            else:
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m regionvault.providers.gcp.emulator [--port P]``: start the emulator,
    print its endpoint, and stop it on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m regionvault.providers.gcp.emulator")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        emulator = GcsEmulator(port=args.port).start()
    except EmulatorUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        print(emulator.endpoint, flush=True)
        while not stopping:
            if emulator._process is None or emulator._process.poll() is not None:
                print("gcp-storage-emulator exited", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
