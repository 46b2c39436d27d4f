"""The celery plugin's registration (entry point ``celery`` of the ``regionvault`` group): the
``celery`` executor kind. Loading it imports no Celery, redis-py or kombu."""

from __future__ import annotations

from regionvault.core.plugins import ExecutorKind, hookimpl
from regionvault.plugins.celery.kind import CELERY

__all__ = ["regionvault_executor_kinds"]


@hookimpl
def regionvault_executor_kinds() -> list[ExecutorKind]:
    return [CELERY]
