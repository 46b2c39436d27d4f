"""Test support of the celery plugin that imports no Celery: ``regionvault worker`` processes
(``WorkerProcess``), each in a session of its own and stopped by its PID (SIGTERM, then
SIGKILL), never left running. tests/celery and benchmarks/celery_tick.py start their workers
with it; redis_server.py starts the Redis they share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "WorkerProcess", "stop_all"]

#: how long a worker may take to say it is ready
READY_TIMEOUT = 60.0
#: how long a SIGTERMed worker may take to finish the job in hand before it is SIGKILLed
STOP_TIMEOUT = 20.0


class WorkerProcess:
    """``regionvault --site SITE_FILE worker --region REGION`` named ``NAME@host``, its
    output in ``log``."""

    def __init__(self, name: str, region: str, site_file: Path, log: Path) -> None:
        self.name = name
        self.region = region
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from regionvault.core.cli import main; main()",
                    "--site",
                    str(site_file),
                    "worker",
                    "--region",
                    region,
                    "--name",
                    f"{name}@%h",
                    "--loglevel",
                    "INFO",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the caller is not its to take
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until Celery says the worker is ready; RuntimeError (with its log) if it exits or
        is not ready within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if " ready." in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        raise RuntimeError(
            f"worker {self.name} not ready in {timeout:.0f} s:\n{self.log.read_text()}"
        )

    def kill(self) -> None:
        """SIGKILL, as a lost machine."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (the worker finishes the job in hand), then SIGKILL after
        :data:`STOP_TIMEOUT` seconds."""
        stop_all([self])


def stop_all(started: list[WorkerProcess]) -> None:
    """SIGTERM to every worker at once, then SIGKILL to those still running
    :data:`STOP_TIMEOUT` seconds later."""
    for worker in started:
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for worker in started:
        try:
            worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(10)
