"""Cross-region copy over Transit, with key isolation (docs/copy.md).

The protocol, between source region A and destination region B:

1. A sends an *offer* into B's inbox: the point's metadata and tree (naming A's opaque chunk
   ids), sealed so that only B's KeyService can open it.
2. B opens it, finds the chunks its link table does not map yet, and sends a *request* (the
   missing ids) into A's inbox, sealed for A.
3. A streams the stored payloads of exactly those chunks, verified, in sealed *batches*;
   B opens each batch, re-identifies every chunk under its own chunk-id key, writes it into
   its own packs under its own fresh data key, records the links, then discards the batch.
4. B writes the translated tree and commits the copy's manifest with its lineage.

Each payload carries a fresh 256-bit transfer key sealed with the receiver's Sealer (the
sender may seal, never unseal) and is AES-256-GCM encrypted under it, bound to its name and
direction, and ends with a BLAKE3 checksum, so damage anywhere is an :class:`IntegrityError`
naming the payload before any KeyService is asked. Nothing in an inbox is plaintext. An
interrupted copy is resumed by running it again: B first ingests any batches still in its
inbox (a damaged one is discarded, its chunks are asked for again), so its request leaves out
whatever already arrived; a half copy is never visible, since the manifest comes last. Both
repositories are held under a shared lock for the whole copy, so a prune in either region
cannot collect what the copy is reading or has written but not yet committed.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import IntegrityError
from regionvault.core.repository._copy import (
    CopyOffer,
    LinkTable,
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
    from regionvault.core.types import RecoveryPoint

__all__ = ["CopyProgress", "CopyResult", "copy_point", "open_payload", "seal_payload"]

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


def _existing_copy(
    destination: Repository, source_region: str, point_id: str
) -> RecoveryPoint | None:
    for p in destination.points():
        if (
            p.lineage is not None
            and p.lineage.source_region == source_region
            and p.lineage.source_recovery_point == point_id
        ):
            return p
    return None


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
    """Copy ``point_id`` from ``source`` into ``destination`` (see the module docstring).

    ``forward`` moves payloads into the destination's inbox, ``backward`` into the source's.
    Running it again after an interruption resumes; running it after it finished returns the
    existing copy.
    """
    a = source.region
    existing = _existing_copy(destination, a, point_id)
    if existing is not None:
        return CopyResult(existing, 0, 0, 0, 0, existing=True)
    # shared locks: a prune in either region waits until the copy is committed, so it can
    # neither pull packs from under the export nor collect chunks ingested but not yet
    # referenced by the copy's manifest
    with (
        copy_lock(destination, "copy-in") as held,
        copy_lock(source, "copy-out"),
    ):
        return _copy_locked(
            source=source,
            destination=destination,
            forward=forward,
            backward=backward,
            seal_to_destination=seal_to_destination,
            seal_to_source=seal_to_source,
            point_id=point_id,
            expires_at=expires_at,
            batch_bytes=batch_bytes,
            progress=progress,
            before_commit=held.check,
        )


def _copy_locked(
    *,
    source: Repository,
    destination: Repository,
    forward: Transit,
    backward: Transit,
    seal_to_destination: Sealer,
    seal_to_source: Sealer,
    point_id: str,
    expires_at: datetime | None,
    batch_bytes: int,
    progress: Callable[[CopyProgress], None] | None,
    before_commit: Callable[[], None],
) -> CopyResult:
    a, b = source.region, destination.region
    sent_before = forward.bytes_sent, backward.bytes_sent
    base = f"copy/{point_id}/"
    links = LinkTable(destination, a)

    def ingest(name: str) -> None:
        body = open_payload(
            destination.keys, name, forward.receive(name), kind="batch", source=a, destination=b
        )
        ingest_chunks(destination, links, decode_chunks(name, body), name)
        forward.discard(name)

    # B: whatever an interrupted run left in the inbox arrived; take it in first. A damaged
    # leftover must not block every later attempt: it is dropped, and its chunks are simply
    # asked for again below.
    for name in list(forward.inbox(base + "batch-")):
        try:
            ingest(name)
        except IntegrityError as exc:
            log.warning("copy %s: discarding a damaged payload from %s: %s", point_id, a, exc)
            forward.discard(name)

    # A: the offer
    offer_name = base + "offer"
    offer = make_offer(source, point_id)
    forward.send(
        offer_name,
        seal_payload(
            seal_to_destination, offer_name, offer.encode(), kind="offer", source=a, destination=b
        ),
    )

    # B: open it, ask for what is missing
    received = CopyOffer.decode(
        offer_name,
        open_payload(
            destination.keys,
            offer_name,
            forward.receive(offer_name),
            kind="offer",
            source=a,
            destination=b,
        ),
    )
    total = len(received.chunk_ids(offer_name))
    missing = missing_chunks(destination, links, received, offer_name)
    request_name = base + "request"
    backward.send(
        request_name,
        seal_payload(
            seal_to_source, request_name, b"".join(missing), kind="request", source=b, destination=a
        ),
    )

    # A: read the request and stream the chunks; B ingests each batch as it lands
    wanted_raw = open_payload(
        source.keys,
        request_name,
        backward.receive(request_name),
        kind="request",
        source=b,
        destination=a,
    )
    if len(wanted_raw) % 32:
        raise IntegrityError(request_name, "copy request has a torn chunk id")
    wanted = [wanted_raw[i : i + 32] for i in range(0, len(wanted_raw), 32)]
    run = os.urandom(4).hex()
    landed: queue.Queue[str | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def receiver() -> None:
        try:
            while (name := landed.get()) is not None:
                ingest(name)
        except BaseException as exc:
            failure.append(exc)
            while landed.get() is not None:  # drain so the sender never blocks
                pass

    thread = threading.Thread(target=receiver, name="regionvault-copy-ingest", daemon=True)
    thread.start()
    sent = 0
    try:
        batch: list[tuple[bytes, int, int, int, bytes]] = []
        size = 0
        seq = 0

        def flush() -> None:
            nonlocal batch, size, seq
            if not batch:
                return
            name = f"{base}batch-{run}-{seq:06d}"
            forward.send(
                name,
                seal_payload(
                    seal_to_destination,
                    name,
                    encode_chunks(batch),
                    kind="batch",
                    source=a,
                    destination=b,
                ),
            )
            seq += 1
            batch, size = [], 0
            if failure:
                raise failure[0]
            landed.put(name)

        for chunk in export_chunks(source, wanted):
            batch.append(chunk)
            size += len(chunk[4])
            sent += 1
            if size >= batch_bytes:
                flush()
                if progress is not None:
                    progress(CopyProgress(sent, total, forward.bytes_sent - sent_before[0]))
        flush()
    finally:
        landed.put(None)
        thread.join()
    if failure:
        raise failure[0]
    backward.discard(request_name)

    # B: the manifest, last
    before_commit()
    copy = commit_copy(
        destination, links, received, offer_name, source_region=a, expires_at=expires_at
    )
    forward.discard(offer_name)
    if progress is not None:
        progress(CopyProgress(sent, total, forward.bytes_sent - sent_before[0]))
    return CopyResult(
        copy,
        bytes_forward=forward.bytes_sent - sent_before[0],
        bytes_backward=backward.bytes_sent - sent_before[1],
        chunks_total=total,
        chunks_sent=sent,
    )
