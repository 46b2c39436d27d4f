"""Orchestration: the engine (the embedding facade), the service (ticks on any executor), the
copy flow, jobs, the ledger, the executor, the tagger, the scheduler, the capture hooks and the
reports. Embedders import from here::

    from regionvault.core.pipeline import Engine, Service
"""

from __future__ import annotations

from regionvault.core.pipeline.engine import DEFAULT_COPY_GRACE, SLOT_TAG, Engine, PointsView
from regionvault.core.pipeline.reports import RestoreResult, RetentionReport, StatusRow, TickReport
from regionvault.core.pipeline.service import Service, job_handlers, run_chains

__all__ = [
    "DEFAULT_COPY_GRACE",
    "SLOT_TAG",
    "Engine",
    "PointsView",
    "RestoreResult",
    "RetentionReport",
    "Service",
    "StatusRow",
    "TickReport",
    "job_handlers",
    "run_chains",
]
