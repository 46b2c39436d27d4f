"""The data plane: an encrypted, deduplicating repository of recovery points that works on any
Vault + KeyService. The on-vault format is specified in docs/format.md.

Typical use::

    repo = Repository.init_or_open(region.vault, region.keys, region=region.name)
    point = repo.backup(capture, policy="1-7", expires_at=...)
    repo.restore(point.id, Path("/restore/here"))
"""

from __future__ import annotations

from regionvault.core.repository._browse import (
    EntryChange,
    PruneForecast,
    diff_trees,
    forecast_prune,
    forget_refusal,
    list_entries,
    tree_reader,
)
from regionvault.core.repository._events import Event, EventAction, EventResult, current_actor
from regionvault.core.repository._format import FORMAT_VERSION
from regionvault.core.repository._restore import MARKER_NAME as RESTORE_MARKER
from regionvault.core.repository._rotate import RotationReport
from regionvault.core.repository.copy import (
    CommitReport,
    CopyProgress,
    CopyReceipt,
    CopyReceiver,
    CopyResult,
    CopySender,
    CopyTracker,
    SentNotice,
    TransitSession,
    UnsealedKeys,
    copy_point,
    offer_name,
    open_payload,
    open_receipt,
    open_sent_notice,
    receipt_name,
    seal_payload,
    seal_receipt,
    seal_sent_notice,
    sent_name,
)
from regionvault.core.repository.model import (
    ChunkerParams,
    Extent,
    Manifest,
    Problem,
    Progress,
    ProgressCallback,
    ProtectReport,
    PruneReport,
    ReleaseReport,
    RepositorySettings,
    RestoreReport,
    TreeEntry,
    VerifyReport,
)
from regionvault.core.repository.repository import Repository

__all__ = [
    "FORMAT_VERSION",
    "RESTORE_MARKER",
    "ChunkerParams",
    "CommitReport",
    "CopyProgress",
    "CopyReceipt",
    "CopyReceiver",
    "CopyResult",
    "CopySender",
    "CopyTracker",
    "EntryChange",
    "Event",
    "EventAction",
    "EventResult",
    "Extent",
    "Manifest",
    "Problem",
    "Progress",
    "ProgressCallback",
    "ProtectReport",
    "PruneForecast",
    "PruneReport",
    "ReleaseReport",
    "Repository",
    "RepositorySettings",
    "RestoreReport",
    "RotationReport",
    "SentNotice",
    "TransitSession",
    "TreeEntry",
    "UnsealedKeys",
    "VerifyReport",
    "copy_point",
    "current_actor",
    "diff_trees",
    "forecast_prune",
    "forget_refusal",
    "list_entries",
    "offer_name",
    "open_payload",
    "open_receipt",
    "open_sent_notice",
    "receipt_name",
    "seal_payload",
    "seal_receipt",
    "seal_sent_notice",
    "sent_name",
    "tree_reader",
]
