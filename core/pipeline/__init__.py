"""Orchestration: the engine (the embedding facade), jobs, the ledger, the executor, the
tagger, the scheduler and the capture hooks. Embedders import from here::

    from regionvault.core.pipeline import Engine
"""

from __future__ import annotations

from regionvault.core.pipeline.engine import (
    DEFAULT_COPY_GRACE,
    SLOT_TAG,
    Engine,
    RestoreResult,
    RetentionReport,
    StatusRow,
    TickReport,
    run_chains,
)

__all__ = [
    "DEFAULT_COPY_GRACE",
    "SLOT_TAG",
    "Engine",
    "RestoreResult",
    "RetentionReport",
    "StatusRow",
    "TickReport",
    "run_chains",
]
