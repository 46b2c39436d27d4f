"""Cross-region copy over Transit, with key isolation (docs/copy.md).

The protocol, between source region A and destination region B:

1. A sends an *offer* into B's inbox: the point's metadata and tree (naming A's opaque chunk
   ids), sealed so that only B's KeyService can open it.
2. B opens it, finds the chunks its link table does not map yet, and sends a *request* (the
   missing ids) into A's inbox, sealed for A.
3. A streams the stored payloads of exactly those chunks, verified, in sealed *batches*;
   B opens each batch, re-identifies every chunk under its own chunk-id key, writes it into
   its own packs under its own fresh data key (one per run of the receiver, however many
   batches it takes in), records the links, then discards the batch.
4. B writes the translated tree and commits the copy's manifest with its lineage.

The two halves are separate objects, so that each can run in its own region with only that
region's keys: :class:`CopySender` (A: ``offer``, ``send``) and :class:`CopyReceiver` (B:
``request``, ``ingest``, ``commit``). Each holds only its own repository's shared copy lock
while it works, so a prune there waits. :func:`copy_point` runs both in one process; the
pipeline's ``copy-offer``, ``copy-request``, ``copy-send`` and ``copy-commit`` jobs run them
one phase at a time, each in its own region (docs/jobs.md).

The modules, each calling only those listed after it:

- ``inprocess``: :func:`copy_point`, both halves in one process;
- ``sender`` (A) and ``receiver`` (B): the halves, on ``half`` (the repository, its lock);
- ``notices``: the sent notice (A to B) and the receipt (B to A); ``records``: what A keeps
  of its copies (:class:`CopyTracker`);
- ``offer`` (A reads a point's tree), ``batches`` (A reads chunks), ``ingest`` (B stores
  chunks, commits the copy), ``links`` (B's map of A's chunk ids to its own);
- ``payloads``: sealing any payload for its receiver; ``names``: payload and object names.
"""

from __future__ import annotations

from regionvault.core.repository.copy.batches import BATCH_BYTES
from regionvault.core.repository.copy.inprocess import CopyProgress, CopyResult, copy_point
from regionvault.core.repository.copy.names import (
    batch_prefix,
    offer_name,
    receipt_name,
    request_name,
    sent_name,
)
from regionvault.core.repository.copy.notices import (
    CopyReceipt,
    SentNotice,
    open_receipt,
    open_sent_notice,
    seal_receipt,
    seal_sent_notice,
)
from regionvault.core.repository.copy.payloads import (
    TransitSession,
    UnsealedKeys,
    open_payload,
    seal_payload,
)
from regionvault.core.repository.copy.receiver import CommitReport, CopyReceiver, RequestReport
from regionvault.core.repository.copy.records import CopyTracker
from regionvault.core.repository.copy.sender import CopySender, SendReport

__all__ = [
    "BATCH_BYTES",
    "CommitReport",
    "CopyProgress",
    "CopyReceipt",
    "CopyReceiver",
    "CopyResult",
    "CopySender",
    "CopyTracker",
    "RequestReport",
    "SendReport",
    "SentNotice",
    "TransitSession",
    "UnsealedKeys",
    "batch_prefix",
    "copy_point",
    "offer_name",
    "open_payload",
    "open_receipt",
    "open_sent_notice",
    "receipt_name",
    "request_name",
    "seal_payload",
    "seal_receipt",
    "seal_sent_notice",
    "sent_name",
]
