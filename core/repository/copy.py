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

Each payload carries its session's 256-bit transfer key sealed with the receiver's Sealer
(the sender may seal, never unseal; a send run's batches share one session, so one seal and
one unseal), is AES-256-GCM encrypted under a key derived from it and the payload's name,
bound to its kind and direction, and ends with a BLAKE3 checksum, so damage anywhere is an
:class:`IntegrityError` naming the payload before any KeyService is asked. Nothing in an inbox
is plaintext. An interrupted copy is resumed by running it again: B first ingests any batches
still in its inbox (a damaged one is discarded, its chunks are asked for again), so its request
leaves out whatever already arrived; a half copy is never visible, since the manifest comes
last.

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
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
    TransitError,
)
from regionvault.core.repository import _format as fmt
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
    keyed_tag,
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
    "TransitSession",
    "UnsealedKeys",
    "batch_prefix",
    "copy_point",
    "offer_name",
    "open_payload",
    "request_name",
    "seal_payload",
]

log = logging.getLogger(__name__)

#: a payload sealed under a transfer key of its own, its name in the sealing context
_MAGIC_V1 = b"RVT1"
#: a payload of a session: one transfer key sealed once per session (a send run), each
#: payload under a key derived from it and the payload's name
_MAGIC = b"RVT2"
_LEN = struct.Struct(">H")
_SESSION_ID = 16
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


def _session_context(session: bytes, kind: str, source: str, destination: str) -> dict[str, str]:
    return {
        "purpose": "regionvault-transit",
        "kind": kind,
        "session": session.hex(),
        "source": source,
        "destination": destination,
    }


def _payload_key(transfer_key: bytes, name: str) -> bytes:
    """The AES key of payload ``name`` in a session: BLAKE3 keyed by the transfer key."""
    return blake3.blake3(_MAGIC + name.encode(), key=transfer_key).digest()


class TransitSession:
    """Payloads of one kind, from one region to another, under one transfer key: it is
    sealed for the receiver (one :meth:`Sealer.seal` call, at the first payload) and each
    payload is encrypted under a key derived from it and the payload's name (docs/copy.md,
    "Payloads"). A send run uses one session for all its batches."""

    def __init__(self, sealer: Sealer, *, kind: str, source: str, destination: str) -> None:
        self.sealer = sealer
        self.kind = kind
        self.source = source
        self.destination = destination
        self.id = os.urandom(_SESSION_ID)
        self._key: bytes | None = None
        self._sealed_key = b""
        self._lock = threading.Lock()

    def _transfer_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                key = AESGCM.generate_key(bit_length=256)
                context = _session_context(self.id, self.kind, self.source, self.destination)
                self._sealed_key = self.sealer.seal(key, context)
                self._key = key
            return self._key

    def seal(self, name: str, body: bytes) -> bytes:
        """``body`` encrypted for the receiver, bound to ``name``."""
        key = self._transfer_key()
        nonce = os.urandom(12)
        head = b"".join(
            (_MAGIC, _LEN.pack(len(self._sealed_key)), self._sealed_key, self.id, nonce)
        )
        sealed_body = AESGCM(_payload_key(key, name)).encrypt(nonce, body, _MAGIC + name.encode())
        checksum = blake3.blake3(head)
        checksum.update(sealed_body)
        return b"".join((head, sealed_body, checksum.digest()))


#: transfer keys a receiver has unsealed, by (sealed key, session, kind, source, destination)
UnsealedKeys = dict[tuple[bytes, bytes, str, str, str], bytes]


def seal_payload(
    sealer: Sealer, name: str, body: bytes, *, kind: str, source: str, destination: str
) -> bytes:
    """Encrypt ``body`` for ``sealer``'s region in a session of its own (one seal)."""
    session = TransitSession(sealer, kind=kind, source=source, destination=destination)
    return session.seal(name, body)


def open_payload(
    keys: KeyService,
    name: str,
    data: bytes,
    *,
    kind: str,
    source: str,
    destination: str,
    unsealed: UnsealedKeys | None = None,
) -> bytes:
    """Open a payload sealed for ``keys``' region; :class:`KeyAccessDenied` if it was sealed
    for another region, :class:`IntegrityError` naming it if it was damaged or altered.

    ``unsealed``, kept by a receiver across the payloads of one run, saves unsealing a
    session's transfer key again for each of its payloads (the key is cached under the
    sealed key and the exact context it was unsealed with)."""
    magic = data[:4]
    if magic not in (_MAGIC, _MAGIC_V1):
        raise IntegrityError(name, "not a sealed transit payload")
    session_len = _SESSION_ID if magic == _MAGIC else 0
    view = memoryview(data)
    least = 6 + session_len + 12 + 16 + _SUM
    if len(data) < least or blake3.blake3(view[:-_SUM]).digest() != data[-_SUM:]:
        raise IntegrityError(name, "transit payload is damaged (checksum mismatch)")
    (n,) = _LEN.unpack_from(data, 4)
    if len(data) < least + n:
        raise IntegrityError(name, "transit payload is truncated")
    sealed_key = data[6 : 6 + n]
    at = 6 + n
    if magic == _MAGIC_V1:
        key = keys.unseal(sealed_key, _context(name, kind, source, destination))
    else:
        session = data[at : at + _SESSION_ID]
        at += _SESSION_ID
        cache_key = (sealed_key, session, kind, source, destination)
        transfer = unsealed.get(cache_key) if unsealed is not None else None
        if transfer is None:
            context = _session_context(session, kind, source, destination)
            transfer = keys.unseal(sealed_key, context)
            if unsealed is not None:
                unsealed[cache_key] = transfer
        key = _payload_key(transfer, name)
    nonce = data[at : at + 12]
    try:
        return AESGCM(key).decrypt(nonce, view[at + 12 : -_SUM], magic + name.encode())
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


def sent_name(point_id: str) -> str:
    """The source's notice, in the destination's inbox, that it sent every batch asked for."""
    return f"copy/{point_id}/sent"


def receipt_name(point_id: str) -> str:
    """The destination's receipt, in the source's inbox, for a copy it holds."""
    return f"copy/{point_id}/receipt"


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
            unsealed=self._unsealed,
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

    def tidy(self, point_id: str) -> None:
        """Drop everything left in this destination's inbox for ``point_id`` (offer,
        batches, the source's sent notice): for a point it holds a copy of already."""
        self._tidy(point_id)

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


# --------------------------------------------------------------------------- notices and receipts
#
# Two small sealed payloads let each region run its own tick with its own keys alone
# (docs/copy.md, "Receipts"): the source's *sent notice* tells the destination that every
# batch it asked for has landed (and how long to keep the copy); the destination's *receipt*
# tells the source that it holds the copy, so the source stops offering the point.

_SENT_MAGIC = b"RVSN"
_RECEIPT_MAGIC = b"RVRC"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(value: Any, name: str, field: str, *, optional: bool) -> datetime | None:
    if value is None and optional:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise IntegrityError(name, f"{field} {value!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise IntegrityError(name, f"{field} {value!r} has no time zone")
    return moment


def _json_body(magic: bytes, doc: dict[str, Any]) -> bytes:
    return magic + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _read_body(magic: bytes, name: str, body: bytes, expect: dict[str, str]) -> dict[str, Any]:
    if body[:4] != magic:
        raise IntegrityError(name, f"not a {magic.decode()} body")
    try:
        doc = json.loads(body[4:])
    except ValueError:
        raise IntegrityError(name, "body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise IntegrityError(name, "unknown format (expected 1)")
    for field, value in expect.items():
        if doc.get(field) != value:
            raise IntegrityError(name, f"{field} is {doc.get(field)!r}, expected {value!r}")
    return doc


@dataclass(frozen=True)
class SentNotice:
    """The source's word, sealed for the destination, that every batch the destination asked
    for has landed in its inbox: the destination may commit. It carries the copy's expiry,
    which the source's policy decides."""

    recovery_point: str
    source: str
    destination: str
    expires_at: datetime | None
    batches: int = 0
    chunks_sent: int = 0


def seal_sent_notice(sealer: Sealer, notice: SentNotice) -> bytes:
    """``notice`` as a payload for ``copy/<point>/sent``, sealed for the destination."""
    body = _json_body(
        _SENT_MAGIC,
        {
            "format": 1,
            "recovery_point": notice.recovery_point,
            "source": notice.source,
            "destination": notice.destination,
            "expires_at": _iso(notice.expires_at),
            "batches": notice.batches,
            "chunks_sent": notice.chunks_sent,
        },
    )
    return seal_payload(
        sealer,
        sent_name(notice.recovery_point),
        body,
        kind="sent",
        source=notice.source,
        destination=notice.destination,
    )


def open_sent_notice(
    keys: KeyService, point_id: str, data: bytes, *, source: str, destination: str
) -> SentNotice:
    """Open the sent notice for ``point_id`` that ``source`` sealed for ``destination``
    (``keys``, the destination's); :class:`IntegrityError` naming it if it does not say what
    its name and seal say."""
    name = sent_name(point_id)
    body = open_payload(keys, name, data, kind="sent", source=source, destination=destination)
    expect = {"recovery_point": point_id, "source": source, "destination": destination}
    doc = _read_body(_SENT_MAGIC, name, body, expect)
    try:
        batches, chunks = int(doc.get("batches", 0)), int(doc.get("chunks_sent", 0))
    except (TypeError, ValueError):
        raise IntegrityError(name, "batch or chunk count is not a number") from None
    return SentNotice(
        point_id,
        source,
        destination,
        _time(doc.get("expires_at"), name, "expires_at", optional=True),
        batches,
        chunks,
    )


@dataclass(frozen=True)
class CopyReceipt:
    """The destination's word, sealed for the source, that it holds a committed copy of the
    source's point. The source records it in its own vault (:class:`CopyTracker`) and stops
    offering the point."""

    #: the source's point, its region, and the region holding the copy
    recovery_point: str
    source: str
    destination: str
    #: the copy's id in the destination, when it was committed and when it expires
    copy: str
    committed_at: datetime
    expires_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "recovery_point": self.recovery_point,
            "source": self.source,
            "destination": self.destination,
            "copy": self.copy,
            "committed_at": self.committed_at.isoformat(),
            "expires_at": _iso(self.expires_at),
        }

    @classmethod
    def from_dict(cls, name: str, doc: dict[str, Any]) -> CopyReceipt:
        for field in ("recovery_point", "source", "destination", "copy"):
            if not isinstance(doc.get(field), str) or not doc[field]:
                raise IntegrityError(name, f"receipt lacks {field!r}")
        committed = _time(doc.get("committed_at"), name, "committed_at", optional=False)
        assert committed is not None
        return cls(
            doc["recovery_point"],
            doc["source"],
            doc["destination"],
            doc["copy"],
            committed,
            _time(doc.get("expires_at"), name, "expires_at", optional=True),
        )

    @classmethod
    def of(cls, source: str, recovery_point: str, copy: RecoveryPoint) -> CopyReceipt:
        """The receipt for ``copy`` (in its own region) of ``source``'s ``recovery_point``."""
        return cls(recovery_point, source, copy.region, copy.id, copy.created_at, copy.expires_at)


def seal_receipt(sealer: Sealer, receipt: CopyReceipt) -> bytes:
    """``receipt`` as a payload for ``copy/<point>/receipt`` in the source's inbox, sealed
    with the source's Sealer (the destination sends it)."""
    return seal_payload(
        sealer,
        receipt_name(receipt.recovery_point),
        _json_body(_RECEIPT_MAGIC, receipt.to_dict()),
        kind="receipt",
        source=receipt.destination,
        destination=receipt.source,
    )


def open_receipt(
    keys: KeyService, point_id: str, data: bytes, *, source: str, destination: str
) -> CopyReceipt:
    """Open the receipt for ``point_id`` that the copy's ``destination`` sealed for its
    ``source`` (``keys``, the source's: the receipt travels destination to source)."""
    name = receipt_name(point_id)
    body = open_payload(keys, name, data, kind="receipt", source=destination, destination=source)
    expect = {"recovery_point": point_id, "source": source, "destination": destination}
    return CopyReceipt.from_dict(name, _read_body(_RECEIPT_MAGIC, name, body, expect))


class CopyTracker:
    """What a source region knows about its copies, kept in its own vault under its own
    keys: per destination and point, when it last offered the point (``offered``) and the
    destination's receipt (``receipt``). Nothing of it is plaintext.

    Objects are ``copies/<destination tag>/<point id>/offered`` (replaced by every offer) and
    ``.../receipt`` (written once, if absent): sealed objects of kind ``COPIES`` (docs/format.md,
    the envelope under the repository's master key) holding JSON. The tag is a keyed hash of
    the destination's name (:func:`~regionvault.core.repository._copy.keyed_tag`), so names
    do not say which region a copy went to.
    """

    PREFIX = fmt.COPIES_PREFIX

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self._store = repository._ensure_open()

    def _name(self, destination: str, point_id: str, what: str) -> str:
        return f"{self.PREFIX}{keyed_tag(self._store, f'tracker:{destination}')}/{point_id}/{what}"

    def _put(self, name: str, doc: dict[str, Any], *, if_absent: bool = False) -> None:
        body = json.dumps(doc, sort_keys=True).encode()
        self._store.put_sealed(fmt.ObjectKind.COPIES, name, body, if_absent=if_absent)

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            body = self._store.get_sealed(fmt.ObjectKind.COPIES, name)
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise IntegrityError(name, "copy tracker object is not a JSON object")
        return doc

    def offered_at(self, destination: str, point_id: str) -> datetime | None:
        """When ``point_id`` was last offered to ``destination`` (None: never)."""
        name = self._name(destination, point_id, "offered")
        doc = self._get(name)
        return None if doc is None else _time(doc.get("at"), name, "at", optional=False)

    def mark_offered(self, destination: str, point_id: str, at: datetime) -> None:
        self._put(
            self._name(destination, point_id, "offered"),
            {"point": point_id, "destination": destination, "at": at.isoformat()},
        )

    def receipt(self, destination: str, point_id: str) -> CopyReceipt | None:
        """``destination``'s receipt for ``point_id``, if one was recorded."""
        name = self._name(destination, point_id, "receipt")
        doc = self._get(name)
        return None if doc is None else CopyReceipt.from_dict(name, doc)

    def record(self, receipt: CopyReceipt) -> bool:
        """Record ``receipt`` (once: True when it was new, False when one was there)."""
        if receipt.source != self.repository.region:
            raise RegionVaultError(
                f"a receipt for {receipt.source}'s point cannot be kept in "
                f"{self.repository.region}",
                region=self.repository.region,
            )
        name = self._name(receipt.destination, receipt.recovery_point, "receipt")
        if self._get(name) is not None:
            return False
        try:
            self._put(name, receipt.to_dict(), if_absent=True)
        except ObjectExists:
            return False  # another runner recorded it meanwhile
        return True

    def tidy(self, live_points: set[str]) -> int:
        """Delete what is kept for points no longer in the repository; returns how many
        objects went."""
        gone = 0
        for info in list(self.repository.vault.list(self.PREFIX)):
            parts = info.name[len(self.PREFIX) :].split("/")
            if len(parts) == 3 and parts[1] not in live_points:
                try:
                    self.repository.vault.delete(info.name)
                except RetentionLocked:
                    continue  # a vault-wide lock: it goes when the lock ends
                gone += 1
        return gone
