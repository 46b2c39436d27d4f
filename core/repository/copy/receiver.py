"""The destination region's half of a copy (:class:`CopyReceiver`): it requests the chunks
it lacks, ingests the batches that arrive, and commits the copy (docs/copy.md).

An interrupted copy is resumed by running it again: the receiver first ingests any batches
still in its inbox (a damaged one is discarded, its chunks are asked for again), so its
request leaves out whatever already arrived; a half copy is never visible, since the
manifest comes last.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from regionvault.core.errors import (
    IntegrityError,
    KeyAccessDenied,
    RegionVaultError,
    TransitError,
)
from regionvault.core.repository._links import LinkTable
from regionvault.core.repository.copy.batches import decode_chunks
from regionvault.core.repository.copy.half import CopyHalf, in_inbox, link_error
from regionvault.core.repository.copy.ingest import (
    RunKey,
    commit_copy,
    ingest_chunks,
    missing_chunks,
)
from regionvault.core.repository.copy.names import batch_prefix, offer_name, request_name
from regionvault.core.repository.copy.offer import CopyOffer
from regionvault.core.repository.copy.payloads import UnsealedKeys, open_payload, seal_payload

if TYPE_CHECKING:
    from regionvault.core.interfaces import Sealer, Transit
    from regionvault.core.repository.repository import Repository
    from regionvault.core.types import RecoveryPoint

__all__ = ["CommitReport", "CopyReceiver", "RequestReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestReport:
    """What :meth:`CopyReceiver.request` did."""

    #: the copy the destination already holds (then nothing was requested), else None
    existing: RecoveryPoint | None
    #: distinct data chunks the offered point uses, and how many of them were asked for
    chunks_total: int = 0
    chunks_requested: int = 0
    #: batches an interrupted run had left in the inbox, taken in first
    leftovers: int = 0
    #: payload bytes of the request sent back to the source
    bytes_sent: int = 0


@dataclass(frozen=True)
class CommitReport:
    """What :meth:`CopyReceiver.commit` did."""

    #: the copy in the destination
    point: RecoveryPoint
    #: True when it was committed before (nothing was written now)
    existing: bool
    #: batches taken in from the inbox before the commit
    batches_ingested: int = 0
    #: the source's point, as the offer described it (None for an existing copy)
    source: RecoveryPoint | None = None


class CopyReceiver(CopyHalf):
    """The destination region's half of a copy: it needs only its own repository (its own
    vault and KeyService), the source's :class:`Sealer` (seal-only, from configuration), the
    Transit from the source (``forward``: its own inbox, to read and discard) and the Transit
    into the source's inbox (``backward``, to send the request)."""

    _operation = "copy-in"

    def __init__(
        self,
        repository: Repository,
        *,
        forward: Transit,
        backward: Transit,
        seal_to_source: Sealer,
    ) -> None:
        super().__init__(repository)
        b = self.region
        if forward.region != b:
            raise link_error("receiver", b, forward, f"the source -> {b}")
        if backward.source != b or backward.region != forward.source:
            raise link_error("receiver", b, backward, f"{b} -> {forward.source}")
        self.source = forward.source
        self.forward = forward
        self.backward = backward
        self.seal_to_source = seal_to_source
        self._links: LinkTable | None = None
        self._links_lock = threading.Lock()
        self._run: RunKey | None = None
        self._offers: dict[str, CopyOffer] = {}
        # the transfer keys of the sessions this run has opened (a send run's batches share one)
        self._unsealed: UnsealedKeys = {}

    def _source(self, source_region: str | None) -> str:
        if source_region is not None and source_region != self.source:
            raise RegionVaultError(
                f"copy receiver in {self.region} reads the inbox from {self.source}, "
                f"not from {source_region}",
                region=self.region,
            )
        return self.source

    @property
    def links(self) -> LinkTable:
        """This destination's link table for the source region (loaded on first use)."""
        with self._links_lock:
            if self._links is None:
                self._links = LinkTable(self.store, self.source)
            return self._links

    @property
    def run(self) -> RunKey:
        """This receiver's copy run: every pack it writes (each batch it ingests, the tree of
        each commit) is encrypted under one data key from its KeyService, asked for on the
        first pack, so a run costs one data-key call however many batches it takes in."""
        with self._links_lock:
            if self._run is None:
                self._run = RunKey(self.store)
            return self._run

    def existing(self, point_id: str) -> RecoveryPoint | None:
        """The copy of the source's ``point_id`` this destination already holds, if any."""
        for p in self.repository.points():
            if (
                p.lineage is not None
                and p.lineage.source_region == self.source
                and p.lineage.source_recovery_point == point_id
            ):
                return p
        return None

    def ingest(self, name: str) -> bool:
        """Take one batch from the inbox: open it, store its chunks under this region's own
        ids and its run's data key (:attr:`run`), record the links, then discard it. False
        when the batch is gone from the inbox: a concurrent copy of the same point took it
        in (as its leftovers) or tidied it after committing. Nothing is lost by going on: a
        commit checks that every chunk the copy needs has arrived, and asks again for any
        that has not."""
        try:
            payload = self.forward.receive(name)
        except TransitError:
            if in_inbox(self.forward, name):
                raise
            log.info("batch %s was taken from %s's inbox by a concurrent copy", name, self.region)
            with self._links_lock:
                # that run's links are in the vault, not in this table: read them again
                self._links = None
            return False
        body = open_payload(
            self.repository.keys,
            name,
            payload,
            kind="batch",
            source=self.source,
            destination=self.region,
            unsealed=self._unsealed,
        )
        with self.locked():
            ingest_chunks(self.store, self.links, decode_chunks(name, body), name, run=self.run)
        self.forward.discard(name)
        return True

    def _take_leftovers(self, point_id: str) -> int:
        # Whatever landed arrived: take it in. A damaged payload, or one that no longer
        # unseals (sealed to a master key since rotated and disabled), must not block every
        # later attempt: it is dropped, and its chunks are simply asked for again.
        taken = 0
        for name in list(self.forward.inbox(batch_prefix(point_id))):
            try:
                taken += self.ingest(name)
            except (IntegrityError, KeyAccessDenied) as exc:
                log.warning(
                    "copy %s: discarding a damaged payload from %s: %s", point_id, self.source, exc
                )
                self.forward.discard(name)
        return taken

    def _open_offer(self, point_id: str) -> CopyOffer:
        name = offer_name(point_id)
        try:
            sealed = self.forward.receive(name)
        except TransitError:
            if in_inbox(self.forward, name):
                raise
            raise RegionVaultError(
                f"copy of {point_id} from {self.source}: no offer in {self.region}'s inbox "
                "(the source must offer it first)",
                region=self.region,
            ) from None
        body = open_payload(
            self.repository.keys,
            name,
            sealed,
            kind="offer",
            source=self.source,
            destination=self.region,
        )
        offer = CopyOffer.decode(name, body)
        self._offers[point_id] = offer
        return offer

    def _tidy(self, point_id: str) -> None:
        """Drop what is left in the inbox for a point already copied."""
        for name in list(self.forward.inbox(f"copy/{point_id}/")):
            self.forward.discard(name)

    def tidy(self, point_id: str) -> None:
        """Drop everything left in this destination's inbox for ``point_id`` (offer,
        batches, the source's sent notice): for a point it holds a copy of already."""
        self._tidy(point_id)

    def offered_point(self, point_id: str) -> RecoveryPoint:
        """The source's recovery point as its offer in this destination's inbox describes it
        (its tags say where its instance's policy copies it); :class:`RegionVaultError` when
        no offer is there."""
        offer = self._offers.get(point_id) or self._open_offer(point_id)
        return offer.source_point()

    def request(self, point_id: str, source_region: str | None = None) -> RequestReport:
        """Take in the leftovers of an interrupted run, open the offer, and send the source
        the ids of the chunks this destination lacks. When the copy exists already, the
        offer is discarded and nothing is requested."""
        self._source(source_region)
        found = self.existing(point_id)
        if found is not None:
            self._tidy(point_id)
            return RequestReport(existing=found)
        return self.request_missing(point_id)

    def request_missing(self, point_id: str) -> RequestReport:
        """:meth:`request`, without looking for an existing copy first (:func:`copy_point`
        looked, once, before it took both locks)."""
        a, b = self.source, self.region
        with self.locked():
            leftovers = self._take_leftovers(point_id)
            offer = self._open_offer(point_id)
            name = offer_name(point_id)
            total = len(offer.chunk_ids(name))
            missing = missing_chunks(self.store, self.links, offer, name)
        req = request_name(point_id)
        payload = seal_payload(
            self.seal_to_source, req, b"".join(missing), kind="request", source=b, destination=a
        )
        self.backward.send(req, payload)
        return RequestReport(
            existing=None,
            chunks_total=total,
            chunks_requested=len(missing),
            leftovers=leftovers,
            bytes_sent=len(payload),
        )

    def commit(
        self,
        point_id: str,
        source_region: str | None = None,
        expires_at: datetime | None = None,
    ) -> CommitReport:
        """Take in the batches still in the inbox, write the translated tree and the copy's
        manifest (last), then discard the offer. A copy committed before is returned as it
        is (``existing``). A chunk that never arrived is an error naming it; the offer stays,
        so requesting and sending again completes the copy."""
        self._source(source_region)
        found = self.existing(point_id)
        if found is not None:
            self._tidy(point_id)
            return CommitReport(found, existing=True)
        return self.commit_offered(point_id, expires_at)

    def commit_offered(self, point_id: str, expires_at: datetime | None) -> CommitReport:
        """:meth:`commit`, without looking for an existing copy first (:func:`copy_point`
        looked, once, before it took both locks)."""
        name = offer_name(point_id)
        with self.locked() as held:
            ingested = self._take_leftovers(point_id)
            offer = self._offers.get(point_id) or self._open_offer(point_id)
            # a lost lock means a prune may have collected what arrived: do not commit
            held.check()
            copy = commit_copy(
                self.store,
                self.links,
                offer,
                name,
                source_region=self.source,
                expires_at=expires_at,
                run=self.run,
            )
        self.forward.discard(name)
        self._offers.pop(point_id, None)
        return CommitReport(
            copy, existing=False, batches_ingested=ingested, source=offer.source_point()
        )
