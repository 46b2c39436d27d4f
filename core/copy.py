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

Each payload carries a fresh 256-bit transfer key sealed with the receiver's Sealer (the
sender may seal, never unseal) and is AES-256-GCM encrypted under it, bound to its name and
direction, and ends with a BLAKE3 checksum, so damage anywhere is an :class:`IntegrityError`
naming the payload before any KeyService is asked. Nothing in an inbox is plaintext. An
interrupted copy is resumed by running it again: B first ingests any batches still in its
inbox (a damaged one is discarded, its chunks are asked for again), so its request leaves out
whatever already arrived; a half copy is never visible, since the manifest comes last.

The two halves are separate objects, so that each can run in its own region with only that
region's keys: :class:`CopySender` (A: ``offer``, ``send``) and :class:`CopyReceiver` (B:
``request``, ``ingest``, ``commit``). Each holds only its own repository's shared copy lock
while it works, so a prune there waits. :func:`copy_point` runs both in one process, holding
both locks for the whole copy and ingesting each batch while the next one is read; the
pipeline's ``copy-offer``, ``copy-request``, ``copy-send`` and ``copy-commit`` jobs run them
one phase at a time, each in its own region (docs/jobs.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import IntegrityError, RegionVaultError, TransitError
from regionvault.core.repository._copy import (
    CopyOffer,
    ExportedChunk,
    LinkTable,
    RunKey,
    commit_copy,
    copy_lock,
    decode_chunks,
    encode_chunks,
    export_chunks,
    ingest_chunks,
    make_offer,
    missing_chunks,
)

if TYPE_CHECKING:
    from regionvault.core.interfaces import KeyService, Sealer, Transit
    from regionvault.core.repository import Repository
    from regionvault.core.repository._locks import RepositoryLock
    from regionvault.core.types import RecoveryPoint

__all__ = [
    "BATCH_BYTES",
    "CommitReport",
    "CopyProgress",
    "CopyReceiver",
    "CopyResult",
    "CopySender",
    "RequestReport",
    "SendReport",
    "batch_prefix",
    "copy_point",
    "offer_name",
    "open_payload",
    "request_name",
    "seal_payload",
]

log = logging.getLogger(__name__)

_MAGIC = b"RVT1"
_LEN = struct.Struct(">H")
#: the trailing BLAKE3 checksum of everything before it
_SUM = 32
#: a batch of chunks is sent once it holds this many payload bytes
BATCH_BYTES = 16 << 20


def _context(name: str, kind: str, source: str, destination: str) -> dict[str, str]:
    return {
        "purpose": "regionvault-transit",
        "kind": kind,
        "name": name,
        "source": source,
        "destination": destination,
    }


def seal_payload(
    sealer: Sealer, name: str, body: bytes, *, kind: str, source: str, destination: str
) -> bytes:
    """Encrypt ``body`` under a fresh key sealed for ``sealer``'s region."""
    key = AESGCM.generate_key(bit_length=256)
    sealed_key = sealer.seal(key, _context(name, kind, source, destination))
    nonce = os.urandom(12)
    aad = _MAGIC + name.encode()
    head = _MAGIC + _LEN.pack(len(sealed_key)) + sealed_key + nonce
    sealed_body = AESGCM(key).encrypt(nonce, body, aad)
    checksum = blake3.blake3(head)
    checksum.update(sealed_body)
    return b"".join((head, sealed_body, checksum.digest()))


def open_payload(
    keys: KeyService, name: str, data: bytes, *, kind: str, source: str, destination: str
) -> bytes:
    """Open a payload sealed for ``keys``' region; :class:`KeyAccessDenied` if it was sealed
    for another region, :class:`IntegrityError` naming it if it was damaged or altered."""
    if data[:4] != _MAGIC:
        raise IntegrityError(name, "not a sealed transit payload")
    view = memoryview(data)
    if len(data) < 6 + 12 + 16 + _SUM or blake3.blake3(view[:-_SUM]).digest() != data[-_SUM:]:
        raise IntegrityError(name, "transit payload is damaged (checksum mismatch)")
    (n,) = _LEN.unpack_from(data, 4)
    if len(data) < 6 + n + 12 + 16 + _SUM:
        raise IntegrityError(name, "transit payload is truncated")
    sealed_key = data[6 : 6 + n]
    nonce = data[6 + n : 18 + n]
    key = keys.unseal(sealed_key, _context(name, kind, source, destination))
    try:
        return AESGCM(key).decrypt(nonce, view[18 + n : -_SUM], _MAGIC + name.encode())
    except InvalidTag:
        raise IntegrityError(name, "transit payload failed authentication (altered)") from None


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
class SendReport:
    """What :meth:`CopySender.send` did."""

    #: False when the source's inbox held no request (nothing asked yet, or already sent)
    requested: bool
    chunks_sent: int = 0
    batches: int = 0
    #: payload bytes of the batches sent
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


def offer_name(point_id: str) -> str:
    return f"copy/{point_id}/offer"


def request_name(point_id: str) -> str:
    return f"copy/{point_id}/request"


def batch_prefix(point_id: str) -> str:
    return f"copy/{point_id}/batch-"


def _link_error(role: str, here: str, transit: Transit, expected: str) -> RegionVaultError:
    return RegionVaultError(
        f"copy {role} in {here}: a Transit runs {transit.source} -> {transit.region}, "
        f"expected {expected}",
        region=here,
    )


def _in_inbox(transit: Transit, name: str) -> bool:
    """Whether ``name`` waits in ``transit``'s inbox, asked the receiving side's way (a
    listing, with the receiver's own credentials)."""
    return name in set(transit.inbox(name))


class _Half:
    """What both halves share: one repository and its shared copy lock."""

    _operation = "copy"

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.region = repository.region
        self._held: RepositoryLock | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RepositoryLock]:
        """Hold this half's repository under a shared lock (a prune there waits). Calls made
        while it is held, from any thread, run under it instead of taking another."""
        if self._held is not None:
            yield self._held
            return
        with copy_lock(self.repository, self._operation) as held:
            self._held = held
            try:
                yield held
            finally:
                self._held = None


class CopySender(_Half):
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
            raise _link_error("sender", a, forward, f"{a} -> the destination")
        if backward.region != a or backward.source != forward.region:
            raise _link_error("sender", a, backward, f"{forward.region} -> {a}")
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
            offer = make_offer(self.repository, point_id)
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
            if _in_inbox(self.backward, req):
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

        def flush() -> None:
            nonlocal batch, size, seq, nbytes
            if not batch:
                return
            name = f"{base}{run}-{seq:06d}"
            payload = seal_payload(
                self.seal_to_destination,
                name,
                encode_chunks(batch),
                kind="batch",
                source=a,
                destination=b,
            )
            self.forward.send(name, payload)
            seq += 1
            nbytes += len(payload)
            batch, size = [], 0
            if on_batch is not None:
                on_batch(name)
            if progress is not None:
                progress(sent, nbytes)

        with self.locked():
            for chunk in export_chunks(self.repository, wanted):
                batch.append(chunk)
                size += len(chunk[4])
                sent += 1
                if size >= self.batch_bytes:
                    flush()
            flush()
        self.backward.discard(req)
        return SendReport(requested=True, chunks_sent=sent, batches=seq, bytes_sent=nbytes)


class CopyReceiver(_Half):
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
            raise _link_error("receiver", b, forward, f"the source -> {b}")
        if backward.source != b or backward.region != forward.source:
            raise _link_error("receiver", b, backward, f"{b} -> {forward.source}")
        self.source = forward.source
        self.forward = forward
        self.backward = backward
        self.seal_to_source = seal_to_source
        self._links: LinkTable | None = None
        self._links_lock = threading.Lock()
        self._run: RunKey | None = None
        self._offers: dict[str, CopyOffer] = {}

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
                self._links = LinkTable(self.repository, self.source)
            return self._links

    @property
    def run(self) -> RunKey:
        """This receiver's copy run: every pack it writes (each batch it ingests, the tree of
        each commit) is encrypted under one data key from its KeyService, asked for on the
        first pack, so a run costs one data-key call however many batches it takes in."""
        with self._links_lock:
            if self._run is None:
                self._run = RunKey(self.repository._ensure_open())
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

    def ingest(self, name: str) -> None:
        """Take one batch from the inbox: open it, store its chunks under this region's own
        ids and its run's data key (:attr:`run`), record the links, then discard it."""
        body = open_payload(
            self.repository.keys,
            name,
            self.forward.receive(name),
            kind="batch",
            source=self.source,
            destination=self.region,
        )
        with self.locked():
            ingest_chunks(
                self.repository, self.links, decode_chunks(name, body), name, run=self.run
            )
        self.forward.discard(name)

    def _take_leftovers(self, point_id: str) -> int:
        # Whatever landed arrived: take it in. A damaged payload must not block every later
        # attempt: it is dropped, and its chunks are simply asked for again.
        taken = 0
        for name in list(self.forward.inbox(batch_prefix(point_id))):
            try:
                self.ingest(name)
                taken += 1
            except IntegrityError as exc:
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
            if _in_inbox(self.forward, name):
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

    def request(self, point_id: str, source_region: str | None = None) -> RequestReport:
        """Take in the leftovers of an interrupted run, open the offer, and send the source
        the ids of the chunks this destination lacks. When the copy exists already, the
        offer is discarded and nothing is requested."""
        self._source(source_region)
        found = self.existing(point_id)
        if found is not None:
            self._tidy(point_id)
            return RequestReport(existing=found)
        return self._request(point_id)

    def _request(self, point_id: str) -> RequestReport:
        a, b = self.source, self.region
        with self.locked():
            leftovers = self._take_leftovers(point_id)
            offer = self._open_offer(point_id)
            name = offer_name(point_id)
            total = len(offer.chunk_ids(name))
            missing = missing_chunks(self.repository, self.links, offer, name)
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
        return self._commit(point_id, expires_at)

    def _commit(self, point_id: str, expires_at: datetime | None) -> CommitReport:
        name = offer_name(point_id)
        with self.locked() as held:
            ingested = self._take_leftovers(point_id)
            offer = self._offers.get(point_id) or self._open_offer(point_id)
            # a lost lock means a prune may have collected what arrived: do not commit
            held.check()
            copy = commit_copy(
                self.repository,
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
    halves (:class:`CopySender`, :class:`CopyReceiver`); see the module docstring.

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
        asked = receiver._request(point_id)
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
        committed = receiver._commit(point_id, expires_at)
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
