"""Both halves of a copy in one process (:func:`copy_point`): the source's sender and the
destination's receiver, both repositories held under their shared copy locks for the whole
copy, the destination ingesting each batch while the source reads the next."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from regionvault.core.errors import RegionVaultError
from regionvault.core.repository.copy.batches import BATCH_BYTES
from regionvault.core.repository.copy.receiver import CopyReceiver
from regionvault.core.repository.copy.sender import CopySender, SendReport

if TYPE_CHECKING:
    from regionvault.core.interfaces import Sealer, Transit
    from regionvault.core.repository.repository import Repository
    from regionvault.core.types import RecoveryPoint

__all__ = ["CopyProgress", "CopyResult", "copy_point"]


@dataclass(frozen=True)
class CopyProgress:
    chunks_sent: int
    chunks_total: int
    bytes_sent: int


@dataclass(frozen=True)
class CopyResult:
    point: RecoveryPoint
    #: payload bytes that crossed from source to destination, and back (the request)
    bytes_forward: int
    bytes_backward: int
    #: chunks the point references, and how many of them had to cross
    chunks_total: int
    chunks_sent: int
    #: True when the destination already held this copy (nothing was sent)
    existing: bool = False

    @property
    def bytes_moved(self) -> int:
        return self.bytes_forward + self.bytes_backward


def copy_point(
    *,
    source: Repository,
    destination: Repository,
    forward: Transit,
    backward: Transit,
    seal_to_destination: Sealer,
    seal_to_source: Sealer,
    point_id: str,
    expires_at: datetime | None,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[CopyProgress], None] | None = None,
) -> CopyResult:
    """Copy ``point_id`` from ``source`` into ``destination`` in this process, with both
    halves (:class:`CopySender`, :class:`CopyReceiver`); see docs/copy.md.

    ``forward`` moves payloads into the destination's inbox, ``backward`` into the source's.
    Both repositories are held under their shared copy locks for the whole copy, and the
    destination ingests each batch while the source reads the next. Running it again after an
    interruption resumes; running it after it finished returns the existing copy.
    """
    sender = CopySender(
        source,
        forward=forward,
        backward=backward,
        seal_to_destination=seal_to_destination,
        batch_bytes=batch_bytes,
    )
    receiver = CopyReceiver(
        destination, forward=forward, backward=backward, seal_to_source=seal_to_source
    )
    existing = receiver.existing(point_id)
    if existing is not None:
        return CopyResult(existing, 0, 0, 0, 0, existing=True)
    # shared locks: a prune in either region waits until the copy is committed, so it can
    # neither pull packs from under the export nor collect chunks ingested but not yet
    # referenced by the copy's manifest
    with receiver.locked(), sender.locked():
        offer_bytes = sender.offer(point_id)
        asked = receiver.request_missing(point_id)
        total = asked.chunks_total

        def report(chunks: int, nbytes: int) -> None:
            if progress is not None:
                progress(CopyProgress(chunks, total, offer_bytes + nbytes))

        sent = _send_and_ingest(sender, receiver, point_id, report)
        if not sent.requested:
            raise RegionVaultError(
                f"copy of {point_id}: the request vanished from {source.region}'s inbox",
                region=source.region,
            )
        committed = receiver.commit_offered(point_id, expires_at)
    bytes_forward = offer_bytes + sent.bytes_sent
    if progress is not None:
        progress(CopyProgress(sent.chunks_sent, total, bytes_forward))
    return CopyResult(
        committed.point,
        bytes_forward=bytes_forward,
        bytes_backward=asked.bytes_sent,
        chunks_total=total,
        chunks_sent=sent.chunks_sent,
    )


def _send_and_ingest(
    sender: CopySender,
    receiver: CopyReceiver,
    point_id: str,
    progress: Callable[[int, int], None],
) -> SendReport:
    """The sender streams batches; a thread of the receiver ingests each as it lands (at
    most two wait), so the source reads the next batch while the destination stores the
    last."""
    landed: queue.Queue[str | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def ingest_landed() -> None:
        try:
            while (name := landed.get()) is not None:
                receiver.ingest(name)
        except BaseException as exc:
            failure.append(exc)
            while landed.get() is not None:  # drain so the sender never blocks
                pass

    def on_batch(name: str) -> None:
        if failure:
            raise failure[0]
        landed.put(name)

    thread = threading.Thread(target=ingest_landed, name="regionvault-copy-ingest", daemon=True)
    thread.start()
    try:
        sent = sender.send(point_id, on_batch, progress=progress)
    finally:
        landed.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return sent
