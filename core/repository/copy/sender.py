"""The source region's half of a copy (:class:`CopySender`): it offers a point, then sends
exactly the chunks the destination asked for, in sealed batches (docs/copy.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from regionvault.core.errors import IntegrityError, RegionVaultError, TransitError
from regionvault.core.repository.copy.batches import (
    BATCH_BYTES,
    ExportedChunk,
    encode_chunks,
    export_chunks,
)
from regionvault.core.repository.copy.half import CopyHalf, in_inbox, link_error
from regionvault.core.repository.copy.names import batch_prefix, offer_name, request_name
from regionvault.core.repository.copy.offer import make_offer
from regionvault.core.repository.copy.payloads import TransitSession, open_payload, seal_payload

if TYPE_CHECKING:
    from regionvault.core.interfaces import Sealer, Transit
    from regionvault.core.repository.repository import Repository

__all__ = ["CopySender", "SendReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendReport:
    """What :meth:`CopySender.send` did."""

    #: False when the source's inbox held no request (nothing asked yet, or already sent)
    requested: bool
    chunks_sent: int = 0
    batches: int = 0
    #: payload bytes of the batches sent
    bytes_sent: int = 0


class CopySender(CopyHalf):
    """The source region's half of a copy: it needs only its own repository (its own vault
    and KeyService), the destination's :class:`Sealer` (seal-only, from configuration), the
    Transit into the destination's inbox (``forward``, to send) and the Transit into its own
    inbox (``backward``, to read and discard the request)."""

    _operation = "copy-out"

    def __init__(
        self,
        repository: Repository,
        *,
        forward: Transit,
        backward: Transit,
        seal_to_destination: Sealer,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        super().__init__(repository)
        a = self.region
        if forward.source != a:
            raise link_error("sender", a, forward, f"{a} -> the destination")
        if backward.region != a or backward.source != forward.region:
            raise link_error("sender", a, backward, f"{forward.region} -> {a}")
        if batch_bytes < 1:
            raise RegionVaultError(f"batch_bytes must be positive, got {batch_bytes}")
        self.destination = forward.region
        self.forward = forward
        self.backward = backward
        self.seal_to_destination = seal_to_destination
        self.batch_bytes = batch_bytes

    def offer(self, point_id: str) -> int:
        """Send the point's metadata and tree (read and verified with the source's keys) into
        the destination's inbox, replacing an earlier offer; returns the payload's size."""
        name = offer_name(point_id)
        with self.locked():
            offer = make_offer(self.store, self.repository.load_manifest(point_id))
        payload = seal_payload(
            self.seal_to_destination,
            name,
            offer.encode(),
            kind="offer",
            source=self.region,
            destination=self.destination,
        )
        self.forward.send(name, payload)
        return len(payload)

    def send(
        self,
        point_id: str,
        on_batch: Callable[[str], None] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> SendReport:
        """Read the destination's request from the source's inbox and stream exactly those
        chunks into the destination's inbox, in sealed batches; then discard the request.

        ``on_batch(name)`` is called after each batch has landed (an in-process receiver
        ingests it meanwhile; if it raises, sending stops), ``progress(chunks, bytes)`` with
        the totals so far. With no request in the inbox (not made yet, or this ran before
        and discarded it), nothing is sent and ``requested`` is False.
        """
        a, b = self.region, self.destination
        req = request_name(point_id)
        try:
            sealed = self.backward.receive(req)
        except TransitError:
            if in_inbox(self.backward, req):
                raise
            log.info("copy %s to %s: no request in %s's inbox, nothing to send", point_id, b, a)
            return SendReport(requested=False)
        wanted_raw = open_payload(
            self.repository.keys, req, sealed, kind="request", source=b, destination=a
        )
        if len(wanted_raw) % 32:
            raise IntegrityError(req, "copy request has a torn chunk id")
        wanted = [wanted_raw[i : i + 32] for i in range(0, len(wanted_raw), 32)]
        run = os.urandom(4).hex()
        base = batch_prefix(point_id)
        batch: list[ExportedChunk] = []
        size = sent = seq = nbytes = 0
        # one transfer key for every batch of this run: one seal, not one per batch
        session = TransitSession(self.seal_to_destination, kind="batch", source=a, destination=b)

        def flush() -> None:
            nonlocal batch, size, seq, nbytes
            if not batch:
                return
            name = f"{base}{run}-{seq:06d}"
            payload = session.seal(name, encode_chunks(batch))
            self.forward.send(name, payload)
            seq += 1
            nbytes += len(payload)
            batch, size = [], 0
            if on_batch is not None:
                on_batch(name)
            if progress is not None:
                progress(sent, nbytes)

        with self.locked():
            for chunk in export_chunks(self.store, wanted):
                batch.append(chunk)
                size += len(chunk[4])
                sent += 1
                if size >= self.batch_bytes:
                    flush()
            flush()
        self.backward.discard(req)
        return SendReport(requested=True, chunks_sent=sent, batches=seq, bytes_sent=nbytes)
