"""The ``celery`` executor kind (``[executor] kind = "celery"``): its settings are checked,
and the plugin registers, without Celery installed; the executor and the ledger import
``celery[redis]`` when they are made, and say which extra to install when it is missing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import RegionVaultError
from regionvault.plugins.celery.settings import EXTRA, CelerySettings, parse_settings

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.site import Site
    from regionvault.plugins.celery.executor import CeleryExecutor
    from regionvault.plugins.celery.ledger import RedisLedger

__all__ = ["CELERY", "CeleryKind", "needs_celery", "site_settings"]

_PACKAGES = frozenset({"celery", "kombu", "redis", "billiard", "vine"})


@contextlib.contextmanager
def needs_celery() -> Iterator[None]:
    """Around an import of Celery or redis-py: one :class:`RegionVaultError` naming the
    extra to install when one is missing."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _PACKAGES:
            raise
        raise RegionVaultError(
            f"the celery executor needs celery[redis] ({exc.name} is missing): {EXTRA}"
        ) from None


def site_settings(site: Site) -> CelerySettings:
    """The celery settings of ``site``'s ``[executor]``."""
    table = site.config.executor
    return parse_settings(table.settings, site.config.source)


class CeleryKind:
    """``kind = "celery"``: jobs on the Celery workers of each job's region."""

    name = "celery"

    def validate(self, settings: Mapping[str, Any], source: str) -> None:
        parse_settings(settings, source)

    @contextlib.contextmanager
    def executor(self, engine: Engine, *, stop: threading.Event | None) -> Iterator[CeleryExecutor]:
        settings = site_settings(engine.site)
        with needs_celery():
            from regionvault.plugins.celery.executor import CeleryExecutor
        ledger = self.ledger(engine.site)
        ledger.warn_if_evicting()

        # what the workers' hooks raised is reported with the tick's own (Engine.notify)
        executor = CeleryExecutor(settings, ledger, stop=stop, problems=engine.add_hook_problems)
        try:
            yield executor
        finally:
            executor.close()
            ledger.close()

    def ledger(self, site: Site) -> RedisLedger:
        settings = site_settings(site)
        with needs_celery():
            from regionvault.plugins.celery.ledger import RedisLedger
        return RedisLedger(
            settings.broker_url(), namespace=settings.namespace, lock_ttl=settings.lock_ttl
        )


#: the kind the plugin registers
CELERY = CeleryKind()
