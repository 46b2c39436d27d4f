"""Helpers of tests/celery, in a module of its own name (so that they import without clashing
with another directory's conftest): :class:`LedgerKind`, what the ``ledgers`` fixture gives,
and :func:`make_ledger`, which builds such a ledger in a child process from its ``spec``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class LedgerKind:
    """How to make ledgers that share one store, here and in a child process."""

    name: str
    #: (kind, where, namespace): what a child passes to :func:`make_ledger`
    spec: tuple[str, str, str]
    #: whether a dead holder on this host loses its lock at once (JobLedger tells a dead pid
    #: on its own machine) or only when its lock_ttl runs out (RedisLedger: Redis alone judges)
    frees_dead_holders_at_once: bool
    make: Callable[..., Any]

    def __call__(self, lock_ttl: timedelta = timedelta(minutes=5)) -> Any:
        return self.make(lock_ttl=lock_ttl)


def make_ledger(kind: str, where: str, namespace: str, ttl: float) -> Any:
    lock_ttl = timedelta(seconds=ttl)
    if kind == "file":
        from regionvault.core.pipeline.ledger import JobLedger

        return JobLedger(where, lock_ttl=lock_ttl)
    from regionvault.plugins.celery.ledger import RedisLedger

    return RedisLedger(where, namespace=namespace, lock_ttl=lock_ttl, timeout=5)
