"""Regions as queues (issue #18): the pipeline's jobs on Celery and Redis, each region's
workers holding only that region's keys.

This part holds the foundation: :class:`RedisLedger`, the job ledger kept in Redis and shared
by every worker of a site (``ledger``), and :class:`RedisServer`, a private redis-server for
tests and trials (``redis_server``). Celery, redis-py and kombu come with the ``celery``
extra and are imported only here, on first use: loading this package needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regionvault.plugins.celery.ledger import RedisLedger, RedisLock
    from regionvault.plugins.celery.redis_server import RedisServer

__all__ = ["RedisLedger", "RedisLock", "RedisServer"]

_LAZY = frozenset({"RedisLedger", "RedisLock"})


def __getattr__(name: str) -> object:
    # redis-py loads with the ledger, on first use, so the plugin registers without it; the
    # launcher too (`python -m ...redis_server` must not find it imported already)
    if name in _LAZY:
        from regionvault.plugins.celery import ledger

        return getattr(ledger, name)
    if name == "RedisServer":
        from regionvault.plugins.celery import redis_server

        return redis_server.RedisServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
