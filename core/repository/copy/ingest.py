"""Ingest and commit: the destination's data-plane work. Arriving chunks are re-identified
under its own chunk-id key and written into its own packs under its own fresh data key (one
per copy run, :class:`RunKey`), their links recorded once the packs are durable; the commit
writes the translated tree and, last, the copy's manifest with its lineage (docs/copy.md)."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import IntegrityError, ObjectExists, RegionVaultError
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import Rechunker
from regionvault.core.repository._disks import decode_disks
from regionvault.core.repository._links import LinkTable
from regionvault.core.repository._manifest import decode_manifest, encode_manifest
from regionvault.core.repository._pipeline import Aborted, Failure, PackWriter
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import TreeWriter
from regionvault.core.repository.copy.batches import ExportedChunk
from regionvault.core.repository.copy.names import copy_point_id
from regionvault.core.repository.copy.offer import CopyOffer, encode_copied_record
from regionvault.core.types import (
    CaptureIssue,
    CaptureKind,
    Disk,
    Instance,
    IssueKind,
    Lineage,
    RecoveryPoint,
    Tags,
)

if TYPE_CHECKING:
    from regionvault.core.types import DataKey

__all__ = ["RunKey", "commit_copy", "ingest_chunks", "missing_chunks"]


class RunKey:
    """The data key of one copy run in the destination: every pack the run writes (each
    ingested batch's, and the tree blobs of its commit) is encrypted under this one key, so
    a run asks its KeyService for one data key however many batches it takes in, and a
    restore of the copy unwraps one. The key is generated on the first pack (a run that
    writes none asks for none); it lives in memory only, with this object.

    Reusing one data key across packs is what a backup run does too, and it is sound for
    the same reason: every pack has a fresh random 256-bit salt, from which its own AES key
    is derived (docs/format.md, "Keys"), so nonces (byte offsets) repeat across packs but
    never under one AES key. Thread-safe (batches are ingested on another thread than the
    commit's)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: the run id: in every pack header, and the KeyService context of the data key
        self.run_id = os.urandom(16)
        self._key: DataKey | None = None
        #: whether a pack under the key was indexed: from then on a rotation finds the run
        #: in the index and puts its key in the keyring, so the key may outlive it
        self._indexed = False
        self._lock = threading.Lock()

    def data_key(self) -> DataKey:
        return self._current()[1]

    def _current(self) -> tuple[bytes, DataKey]:
        """``(run id, data key)``. A key no indexed pack uses yet is made again (with a new
        run id) when the master key changed since it was made: a rotation meanwhile would
        not have put it in the keyring, and packs under it would need the old master key."""
        with self._lock:
            if (
                self._key is not None
                and not self._indexed
                and self._key.key_id != self.store.keys.key_id
            ):
                self._forget_locked()
            if self._key is None:
                self._key = self.store.new_data_key(self.run_id)
            return self.run_id, self._key

    def _forget_locked(self) -> None:
        self._key = None
        self.run_id = os.urandom(16)

    def indexed(self) -> None:
        """A pack under the key is durable and indexed (called after a writer closed)."""
        with self._lock:
            if self._key is not None:
                self._indexed = True

    def aborted(self) -> None:
        """A batch under the key was abandoned: unless a pack under it is indexed, the key
        is forgotten, so that the repository's lock (which a rotation needs exclusively) is
        never released with a key that no keyring will hold in use."""
        with self._lock:
            if not self._indexed:
                self._forget_locked()

    def writer(self, store: Store, failure: Failure) -> PackWriter:
        """A pack writer whose packs carry this run's id and data key."""
        if store is not self.store:
            raise RegionVaultError("a copy run's data key belongs to another repository")
        run_id, key = self._current()
        return PackWriter(store, failure, run_id=run_id, data_key=key)


def missing_chunks(store: Store, links: LinkTable, offer: CopyOffer, name: str) -> list[bytes]:
    """The destination side: which of the offer's chunks it must be sent."""
    index = store.load_index().index
    return [cid for cid in offer.chunk_ids(name) if links.resolve(index, cid) is None]


def ingest_chunks(
    store: Store,
    links: LinkTable,
    chunks: Iterable[ExportedChunk],
    name: str,
    *,
    run: RunKey | None = None,
) -> tuple[int, int]:
    """The destination side: store arriving chunks under its own ids and keys; returns
    ``(chunks, new chunks written)``. Links are recorded only once the packs are durable.

    The packs are encrypted under ``run``'s data key (one per copy run, however many
    batches it ingests); without it, under a data key of this call's own."""
    run = run or RunKey(store)
    index = store.load_index().index
    failure = Failure()
    writer: PackWriter | None = None  # made at the first new chunk
    pairs: dict[bytes, bytes] = {}
    written: set[bytes] = set()
    count = 0
    try:
        for source_id, blob_type, flags, raw_length, payload in chunks:
            count += 1
            if flags & fmt.FLAG_ZSTD:
                plain = _crypto.decompress(name, payload, raw_length)
            else:
                plain = payload
            if len(plain) != raw_length:
                raise IntegrityError(name, f"chunk {source_id.hex()[:16]} has the wrong length")
            mine = store.chunk_id(plain)
            if mine not in index and mine not in written:
                if writer is None:
                    writer = run.writer(store, failure)
                writer.add(mine, blob_type, flags, raw_length, payload)
                written.add(mine)
            pairs[source_id] = mine
        if writer is not None:
            writer.close()
            run.indexed()
    except BaseException as exc:
        failure.set(RegionVaultError("copy ingest aborted"))
        if writer is not None:
            writer.abort()
            run.aborted()
        if isinstance(exc, Aborted) and failure.error is not None:
            raise failure.error from None  # the writer thread's error (disk full ...)
        raise
    links.save(pairs)
    return count, len(written)


def commit_copy(
    store: Store,
    links: LinkTable,
    offer: CopyOffer,
    name: str,
    *,
    source_region: str,
    expires_at: datetime | None,
    run: RunKey | None = None,
) -> RecoveryPoint:
    """The destination side: write the translated tree and the copy's manifest. The tree's
    packs are encrypted under ``run``'s data key (else under one of this call's own)."""
    run = run or RunKey(store)
    index = store.load_index().index
    failure = Failure()
    writers: list[PackWriter] = []  # the one writer, made at the first new tree chunk
    level = store.settings.compression_level
    new: set[bytes] = set()

    def store_chunk(chunk: memoryview) -> bytes:
        chunk_id = store.chunk_id(chunk)
        if chunk_id not in index and chunk_id not in new:
            new.add(chunk_id)
            payload: bytes | memoryview = bytes(chunk)
            flags = 0
            if level > 0:
                packed = _crypto.compress(chunk, level)
                if len(packed) < len(chunk):
                    payload, flags = packed, fmt.FLAG_ZSTD
            if not writers:
                writers.append(run.writer(store, failure))
            writers[0].add(chunk_id, fmt.BlobType.TREE, flags, len(chunk), payload)
        return chunk_id

    p = offer.point
    disks = None if p["image"] is None else _offered_disks(p)  # checked before any write
    try:
        tree = TreeWriter(Rechunker(store.new_chunker()), store_chunk)
        for record in offer.records(name):
            ids = bytearray()
            for source_id in record.chunk_ids():
                mine = links.resolve(index, source_id)
                if mine is None:
                    raise RegionVaultError(
                        f"copy of {p['id']}: chunk {source_id.hex()[:16]} has not arrived",
                        region=store.region,
                    )
                ids += mine
            tree.add(encode_copied_record(_with_ids(record, bytes(ids)), name))
        tree_chunks = tree.finish()
        for writer in writers:
            writer.close()
            run.indexed()
    except BaseException as exc:
        failure.set(RegionVaultError("copy commit aborted"))
        for writer in writers:
            writer.abort()
            run.aborted()
        if isinstance(exc, Aborted) and failure.error is not None:
            raise failure.error from None  # the writer thread's error (disk full ...)
        raise
    # The copy's id is a keyed hash of its lineage, so two commits of the same source point
    # (two runners at once) race on one if-absent name: exactly one copy can ever exist.
    point_id = copy_point_id(store, source_region, p["id"])
    created = datetime.now(UTC)
    kind = CaptureKind(p["kind"])
    image = p["image"]
    lineage = Lineage(source_region, p["id"])
    issues = p.get("issues") or {"total": 0, "listed": []}
    instance = Instance(
        id=p["instance"]["id"],
        name=p["instance"]["name"],
        region=p["region"],
        tags=Tags(p["tags"]),
        function=p.get("function"),
    )
    body = encode_manifest(
        store,
        point_id=point_id,
        kind=kind,
        instance_id=instance.id,
        instance_name=instance.name,
        tags=instance.tags,
        function=instance.function,
        policy=p["policy"],
        created_at=created,
        taken_at=datetime.fromisoformat(p["taken_at"]),
        expires_at=expires_at,
        lineage=lineage,
        parent=None,
        size=int(p["size"]),
        image=None if image is None else (int(image["size"]), int(image["block_size"])),
        disks=disks,
        tree_chunks=tree_chunks,
        tree_bytes=tree.bytes,
        entries=tree.entries,
        stats={str(k): int(v) for k, v in p["stats"].items()},
        # a copy is as complete as its source, and says so
        issues=[
            CaptureIssue(str(i["path"]), IssueKind(i["kind"]), str(i["message"]))
            for i in issues["listed"]
        ],
        issues_total=int(issues["total"]),
        launch=p.get("launch"),
    )
    try:
        store.put_sealed(fmt.ObjectKind.MANIFEST, fmt.point_name(point_id), body, if_absent=True)
    except ObjectExists:
        # another runner committed it first
        committed = fmt.point_name(point_id)
        body = store.get_sealed(fmt.ObjectKind.MANIFEST, committed)
        return decode_manifest(store, committed, body).point
    return RecoveryPoint(
        id=point_id,
        region=store.region,
        instance_id=instance.id,
        instance_name=instance.name,
        kind=kind,
        created_at=created,
        expires_at=expires_at,
        size=int(p["size"]),
        policy=p["policy"],
        lineage=lineage,
        tags=instance.tags,
        function=instance.function,
        issues=int(issues["total"]),
    )


def _offered_disks(p: dict[str, Any]) -> tuple[Disk, ...] | None:
    """The disks the offer of a block point carries (None: one disk, the whole image)."""
    image = p["image"]
    try:
        return decode_disks(
            image.get("disks"),
            version=int(p.get("format", 1)),
            size=int(image["size"]),
            block_size=int(image["block_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"offer of {p['id']}", f"its disks are malformed ({exc!r})") from None


def _with_ids(record: fmt.RawRecord, ids: bytes) -> fmt.RawRecord:
    return dataclasses.replace(record, ids=ids)
