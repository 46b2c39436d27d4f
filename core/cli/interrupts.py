"""Ctrl-C for the commands that write (``backup``, ``copy``, ``tick``): the first SIGINT asks
the command to stop at its next safe point, the second exits at once; either way the exit
status is 130 (128 + SIGINT), as shells expect.

What a safe point is belongs to each command: a backup or a copy is one commit, so it
finishes it (a killed one leaves its vault valid and is redone or resumed by running it
again); a tick finishes the jobs running now and runs no further step
(:attr:`Service.halt <regionvault.core.pipeline.Service.halt>`). The second Ctrl-C ends the
process as a kill would, which the vaults are made to survive (docs/format.md)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

__all__ = ["EXIT_INTERRUPTED", "Interrupted", "interruptible"]

#: the exit status of a command stopped by Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130


class Interrupted:
    """What :func:`interruptible` yields: ``requested`` is set by the first Ctrl-C."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def exit(self, state: str) -> None:
        """When a Ctrl-C came: say ``state`` (what was committed, what resumes) on standard
        error and exit 130. Nothing when none came."""
        if self.requested.is_set():
            click.echo(f"regionvault: interrupted: {state}", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED)


@contextmanager
def interruptible(doing: str, interrupted: Interrupted | None = None) -> Iterator[Interrupted]:
    """SIGINT handled while the block runs: the first sets ``requested`` and says that
    ``doing`` stops at its next safe point; the second exits 130 at once. Outside the main
    thread (an embedder's worker) signals cannot be handled: Python's default stays.
    ``interrupted`` is the one to set (a new one by default)."""
    if interrupted is None:
        interrupted = Interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if interrupted.requested.is_set():
            sys.stderr.write("\nregionvault: interrupted again: exiting now\n")
            sys.stderr.flush()
            # os._exit skips rich's Live stop: show the cursor a progress display hid (on
            # the descriptor itself: a Live's sys.stderr proxy says no tty and strips codes)
            if os.isatty(2):
                os.write(2, b"\x1b[?25h")
            os._exit(EXIT_INTERRUPTED)
        interrupted.requested.set()
        sys.stderr.write(
            f"\nregionvault: interrupt: {doing} stops at its next safe point "
            "(Ctrl-C again to exit at once)\n"
        )
        sys.stderr.flush()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
