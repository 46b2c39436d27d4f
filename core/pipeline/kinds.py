"""Executor kinds: what ``[executor] kind`` in site.toml selects. The pipeline's own,
``thread`` (:data:`THREAD`), runs jobs in this process; others come from plugins
(``regionvault_executor_kinds``, core/plugins.py: ``celery`` from plugins/celery).
:func:`executor_kind` is the one a site names; ``Engine.ledger()`` is its ledger."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from regionvault.core.config import THREAD_EXECUTOR
from regionvault.core.errors import ConfigError
from regionvault.core.pipeline.executor import ThreadExecutor
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.plugins import ExecutorKind, check_executor, executor_kinds

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine
    from regionvault.core.site import Site

__all__ = ["THREAD", "ThreadKind", "executor_kind"]


class ThreadKind:
    """``kind = "thread"`` (the default): jobs run on a pool of ``engine.workers`` threads
    in the ticking process, recorded in the ledger of files under ``state_dir``."""

    name = THREAD_EXECUTOR

    def validate(self, settings: Mapping[str, Any], source: str) -> None:
        if settings:
            raise ConfigError(
                "unknown key (the thread executor takes none but kind)",
                file=source,
                key=f"executor.{sorted(settings)[0]}",
            )

    @contextmanager
    def executor(self, engine: Engine, *, stop: threading.Event | None) -> Iterator[ThreadExecutor]:
        from regionvault.core.pipeline.service import job_handlers

        with ThreadExecutor(
            job_handlers(engine),
            engine.ledger(),
            max_workers=engine.workers,
            plugin_manager=engine.site.plugin_manager,
            stop=stop,
        ) as executor:
            yield executor

    def ledger(self, site: Site) -> JobLedger:
        return JobLedger(site.config.state_dir)


#: the built-in executor kind
THREAD = ThreadKind()


def executor_kind(site: Site, name: str | None = None) -> ExecutorKind:
    """The executor kind ``name`` (default: the one the site's ``[executor]`` names), from
    the site's plugins; ``thread`` is :data:`THREAD`. An unknown kind is a
    :class:`ConfigError` naming ``executor.kind`` and the installed kinds."""
    wanted = name if name is not None else site.config.executor.kind
    if wanted == THREAD_EXECUTOR:
        return THREAD
    if name is None:
        table = site.config.executor
        kind = check_executor(table.kind, table.settings, site.config.source, site.plugin_manager)
        if kind is not None:
            return kind
    found = executor_kinds(site.plugin_manager).get(wanted)
    if found is None:
        installed = ", ".join(["thread", *sorted(executor_kinds(site.plugin_manager))])
        raise ConfigError(
            f"unknown executor kind {wanted!r} (installed: {installed})",
            file=site.config.source,
            key="executor.kind",
        )
    return found
