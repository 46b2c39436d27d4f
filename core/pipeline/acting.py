"""Which job this thread is running, for the ``who`` of the events it records: the
executor runs each handler inside :func:`acting_for` (a context variable, so threads and
tasks each have their own)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["acting_for", "current_job"]

_JOB: ContextVar[str | None] = ContextVar("regionvault_job", default=None)


def current_job() -> str | None:
    """The key of the job this thread runs now, or None outside a job."""
    return _JOB.get()


@contextlib.contextmanager
def acting_for(job_key: str | None) -> Iterator[None]:
    """Run the body as job ``job_key``: the events it records name that job."""
    token = _JOB.set(job_key)
    try:
        yield
    finally:
        _JOB.reset(token)
