"""The data-plane half of a cross-region copy (docs/format.md, "Copies").

The source reads one of its recovery points and hands out its tree and the stored payloads
of the chunks the destination lacks, each verified on the way out. The destination keeps a
*link table*, sealed in its own vault, from the source's chunk ids (opaque keyed hashes) to
its own; it re-identifies every arriving chunk with its own chunk-id key, writes it into its
own packs under its own fresh data key, and commits a manifest whose tree names only its own
chunk ids, with the copy's lineage.

Nothing here seals or moves bytes between regions: core/repository/copy.py does that over Transit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import threading
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
)
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import Rechunker
from regionvault.core.repository._maintenance import _protected, tree_records
from regionvault.core.repository._manifest import encode_manifest
from regionvault.core.repository._pipeline import (
    Aborted,
    Failure,
    PackWriter,
    plan_reads,
    read_blobs,
)
from regionvault.core.repository._tree import iter_records
from regionvault.core.repository.model import Problem
from regionvault.core.types import (
    CaptureIssue,
    CaptureKind,
    Instance,
    IssueKind,
    Lineage,
    ObjectInfo,
    RecoveryPoint,
    Tags,
)

if TYPE_CHECKING:
    from regionvault.core.repository._index import ChunkIndex, Location
    from regionvault.core.repository._locks import RepositoryLock
    from regionvault.core.repository._store import Store
    from regionvault.core.repository.repository import Repository
    from regionvault.core.types import DataKey

__all__ = [
    "CopyOffer",
    "ExportedChunk",
    "LinkTable",
    "RunKey",
    "commit_copy",
    "copy_lock",
    "decode_links",
    "export_chunks",
    "ingest_chunks",
    "keyed_tag",
    "make_offer",
    "prune_links",
]

log = logging.getLogger(__name__)

#: a chunk on its way: source id, blob type, flags, raw length, stored payload
ExportedChunk = tuple[bytes, int, int, int, bytes]
_CHUNK_HEAD = struct.Struct(">32sBBII")
_OFFER_MAGIC = b"RVOF"
#: where a destination keeps its links from one source region's chunk ids
LINK_PREFIX = "links/"
#: prune writes a link table's live links back in objects of at most this many pairs
LINKS_PER_OBJECT = 1 << 18
#: ... and merges a table's objects into few once it has more than this many, even when
#: none of them holds a stale link (each ingested batch writes one; a copy reads them all)
LINK_OBJECTS_MERGED_AT = 64


@dataclass(frozen=True)
class CopyOffer:
    """What the destination needs to know of a source point, besides its chunks."""

    point: dict[str, Any]
    #: the point's tree records, concatenated, naming the source's chunk ids
    tree: bytes

    def encode(self) -> bytes:
        head = json.dumps(self.point, sort_keys=True).encode()
        body = struct.pack(">I", len(head)) + head + self.tree
        return _OFFER_MAGIC + _crypto.compress(body, 3)

    @classmethod
    def decode(cls, name: str, data: bytes) -> CopyOffer:
        if data[:4] != _OFFER_MAGIC:
            raise IntegrityError(name, "not a copy offer")
        body = _crypto.zstd_d().decompress(data[4:], max_output_size=1 << 34)
        (n,) = struct.unpack_from(">I", body)
        try:
            point = json.loads(body[4 : 4 + n])
            version = int(point.get("format", 1))
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(name, f"copy offer header is malformed ({exc})") from None
        fmt.check_version(name, version)  # its tree records are of that version
        return cls(point, bytes(body[4 + n :]))

    def records(self, name: str) -> Iterator[fmt.RawRecord]:
        return iter_records([self.tree], name)

    def source_point(self) -> RecoveryPoint:
        """The source's recovery point as the offer describes it (for the destination, which
        cannot read the source's vault)."""
        p = self.point
        expires = p.get("expires_at")
        lineage = p.get("lineage")
        return RecoveryPoint(
            id=p["id"],
            region=p["region"],
            instance_id=p["instance"]["id"],
            instance_name=p["instance"]["name"],
            kind=CaptureKind(p["kind"]),
            created_at=datetime.fromisoformat(p["created_at"]),
            expires_at=None if expires is None else datetime.fromisoformat(expires),
            size=int(p["size"]),
            policy=p["policy"],
            lineage=None
            if lineage is None
            else Lineage(lineage["source_region"], lineage["source_recovery_point"]),
            tags=Tags(p["tags"]),
            function=p.get("function"),
        )

    def chunk_ids(self, name: str) -> list[bytes]:
        """Every distinct data chunk the tree names, in first-use order."""
        seen: dict[bytes, None] = {}
        for record in self.records(name):
            for chunk_id in record.chunk_ids():
                seen.setdefault(chunk_id)
        return list(seen)


def copy_lock(repo: Repository, operation: str) -> RepositoryLock:
    """A shared lock on ``repo`` for one side of a copy (use as a context manager): prune
    takes the exclusive lock, so it waits while a copy reads from or writes into ``repo``."""
    return repo._lock(exclusive=False, operation=operation)


def make_offer(repo: Repository, point_id: str) -> CopyOffer:
    """The source side: a point's metadata and tree, read and verified with its own keys."""
    store = repo._ensure_open()
    manifest = repo.load_manifest(point_id)
    p = manifest.point
    if p.kind is CaptureKind.BLOCKS and manifest.image_size is None:
        raise IntegrityError(fmt.point_name(point_id), "block point without an image size")
    state = store.load_index()
    parts: list[bytes] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for record in tree_records(store, state.index, pool, manifest):
            parts.append(_encode_record(record, fmt.point_name(point_id)))
    point: dict[str, Any] = {
        "format": fmt.FORMAT_VERSION,
        "id": p.id,
        "region": p.region,
        "instance": {"id": p.instance_id, "name": p.instance_name},
        "kind": p.kind.value,
        "tags": dict(p.tags),
        "policy": p.policy,
        "function": p.function,
        "created_at": p.created_at.isoformat(),
        "expires_at": None if p.expires_at is None else p.expires_at.isoformat(),
        "lineage": None
        if p.lineage is None
        else {
            "source_region": p.lineage.source_region,
            "source_recovery_point": p.lineage.source_recovery_point,
        },
        "taken_at": manifest.taken_at.isoformat(),
        "size": p.size,
        "image": None
        if manifest.image_size is None
        else {"size": manifest.image_size, "block_size": manifest.block_size},
        "entries": manifest.entry_count,
        "stats": dict(manifest.stats),
    }
    if p.issues:  # a copy is as complete as its source, and says so
        point["issues"] = {
            "total": p.issues,
            "listed": [
                {"path": i.path, "kind": i.kind.value, "message": i.message}
                for i in manifest.issues
            ],
        }
    return CopyOffer(point, b"".join(parts))


def _encode_record(record: fmt.RawRecord, name: str) -> bytes:
    """Every field of a record of the tree ``name`` (a point, or an offer), as the current
    format writes it: a record of a version 1 point is written as version 2, holding the
    same, with the new fields not recorded. The change token is left out: it is keyed by
    the source vault and means nothing in another (so it never crosses the link either)."""
    if record.change:
        record = dataclasses.replace(record, change=b"")
    try:
        return fmt.encode_record(record)
    except ValueError as exc:
        raise IntegrityError(name, str(exc)) from None


def export_chunks(repo: Repository, chunk_ids: Iterable[bytes]) -> Iterator[ExportedChunk]:
    """The source side: the stored payloads of these chunks (still compressed where they
    were), each authenticated and checked against its id before it leaves; grouped into
    ranged gets by pack."""
    store = repo._ensure_open()
    index = store.load_index().index
    wanted: dict[bytes, Location] = {}
    for chunk_id in chunk_ids:
        loc = index.get(chunk_id)
        if loc is None:
            raise IntegrityError(
                f"chunk {chunk_id.hex()[:16]}", "is not in any index of the source (data lost)"
            )
        wanted[chunk_id] = loc
    for pack_id, start, end, run in plan_reads(wanted, gap=256 << 10, max_read=8 << 20):
        for chunk_id, payload in read_blobs(store, index, pack_id, start, end, run, stored=True):
            loc = wanted[chunk_id]
            yield chunk_id, loc.blob_type, loc.flags, loc.raw_length, payload


def encode_chunks(chunks: Iterable[ExportedChunk]) -> bytes:
    out = bytearray()
    for chunk_id, blob_type, flags, raw_length, payload in chunks:
        out += _CHUNK_HEAD.pack(chunk_id, blob_type, flags, raw_length, len(payload))
        out += payload
    return bytes(out)


def decode_chunks(name: str, data: bytes | memoryview) -> Iterator[ExportedChunk]:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if pos + _CHUNK_HEAD.size > len(view):
            raise IntegrityError(name, "chunk batch ends inside a chunk header")
        chunk_id, blob_type, flags, raw_length, n = _CHUNK_HEAD.unpack_from(view, pos)
        pos += _CHUNK_HEAD.size
        if pos + n > len(view):
            raise IntegrityError(name, "chunk batch ends inside a chunk")
        yield chunk_id, blob_type, flags, raw_length, bytes(view[pos : pos + n])
        pos += n


# --------------------------------------------------------------------------- destination


class LinkTable:
    """The destination's map from one source region's chunk ids to its own, sealed in its
    vault as ``links/<source-tag>/<id>`` objects (each a batch of 64-byte pairs). A link is
    trusted only while its own chunk is still in the index (prune may have collected it)."""

    def __init__(self, repo: Repository, source_region: str) -> None:
        self.repo = repo
        self.store = repo._ensure_open()
        # the source's name goes into object names only as a keyed hash
        tag = keyed_tag(self.store, source_region)
        self.prefix = f"{LINK_PREFIX}{tag}/"
        self.links: dict[bytes, bytes] = {}
        self._load()

    def _load(self) -> None:
        for info in self.store.vault.list(self.prefix):
            try:
                body = self.store.get_sealed(fmt.ObjectKind.LINKS, info.name)
                self.links.update(decode_links(info.name, body))
            except ObjectNotFound:
                continue  # merged into another object by a prune since the listing
            except IntegrityError as exc:
                raise IntegrityError(
                    exc.object_name,
                    f"{exc.reason} (`regionvault verify --repair` removes it; the chunks it "
                    "linked are then sent again)",
                ) from None

    def resolve(self, index: ChunkIndex, source_id: bytes) -> bytes | None:
        mine = self.links.get(source_id)
        return mine if mine is not None and mine in index else None

    def save(self, pairs: dict[bytes, bytes]) -> None:
        """Record new links, after the chunks they point at are durable and indexed."""
        if not pairs:
            return
        body = b"".join(a + b for a, b in pairs.items())
        self.store.put_sealed(
            fmt.ObjectKind.LINKS, f"{self.prefix}{fmt.new_id()}", body, if_absent=True
        )
        self.links.update(pairs)


def decode_links(name: str, body: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(body) % 64:
        raise IntegrityError(name, "link table has a torn entry")
    for i in range(0, len(body), 64):
        yield body[i : i + 32], body[i + 32 : i + 64]


@dataclass
class LinkPruneReport:
    """What :func:`prune_links` did."""

    #: links dropped (their own chunk is in no live index any more)
    links_dropped: int = 0
    objects_written: int = 0
    objects_deleted: int = 0
    #: link objects a WORM lock or legal hold kept although they hold stale links
    skipped: list[Problem] = field(default_factory=list)
    #: link objects that do not authenticate (left alone, and logged)
    unreadable: list[str] = field(default_factory=list)


def prune_links(store: Store, live: Container[bytes], now: datetime) -> LinkPruneReport:
    """Drop the links whose own chunk is not in ``live`` (the chunk ids of the index a prune
    just made), called by prune under its exclusive lock.

    Per link table (``links/<tag>/``), when any of its objects holds a stale link (or it has
    more than :data:`LINK_OBJECTS_MERGED_AT` objects), the live links of all its objects are
    written into new objects first, and only then are the old objects deleted: a crash in
    between leaves each live link in two objects, which readers merge, never one lost. A
    table left with no live link is simply deleted. Objects under a WORM lock or legal hold
    are neither read into the new objects nor deleted (their stale links are harmless: a link
    counts only while its chunk is indexed); those with stale links are reported. An object
    that does not authenticate is left alone, with a logged warning."""
    report = LinkPruneReport()
    tables: dict[str, list[ObjectInfo]] = {}
    for info in store.vault.list(LINK_PREFIX):
        tag, _, object_id = info.name[len(LINK_PREFIX) :].partition("/")
        if object_id:
            tables.setdefault(tag, []).append(info)
    for tag, infos in sorted(tables.items()):
        kept: dict[bytes, bytes] = {}
        merged: list[str] = []  # unprotected objects whose live links go into ``kept``
        stale = 0
        for info in infos:
            try:
                pairs = list(
                    decode_links(info.name, store.get_sealed(fmt.ObjectKind.LINKS, info.name))
                )
            except ObjectNotFound:
                continue
            except IntegrityError as exc:
                log.warning("prune: leaving an unreadable link object alone: %s", exc)
                report.unreadable.append(info.name)
                continue
            dead = sum(1 for _, mine in pairs if mine not in live)
            reason = _protected(info, now)
            if reason is not None:
                if dead:
                    report.skipped.append(Problem(info.name, reason))
                continue
            stale += dead
            merged.append(info.name)
            kept.update((theirs, mine) for theirs, mine in pairs if mine in live)
        needed = -(-len(kept) // LINKS_PER_OBJECT)
        if not stale and len(merged) <= needed + LINK_OBJECTS_MERGED_AT:
            continue
        report.links_dropped += stale
        # new objects first, then the old ones go
        pairs_kept = list(kept.items())
        for start in range(0, len(pairs_kept), LINKS_PER_OBJECT):
            body = b"".join(a + b for a, b in pairs_kept[start : start + LINKS_PER_OBJECT])
            name = f"{LINK_PREFIX}{tag}/{fmt.new_id()}"
            store.put_sealed(fmt.ObjectKind.LINKS, name, body, if_absent=True)
            report.objects_written += 1
        for name in merged:
            try:
                store.vault.delete(name)
            except RetentionLocked as exc:  # locked since it was listed
                report.skipped.append(Problem(name, exc.reason))
            else:
                report.objects_deleted += 1
    return report


def copy_point_id(store: Store, source_region: str, source_point: str) -> str:
    """The id a copy of ``source_point`` from ``source_region`` has in this repository."""
    return keyed_tag(store, f"copy:{source_region}:{source_point}")


def keyed_tag(store: Store, text: str) -> str:
    """A name part for ``text`` that does not reveal it: BLAKE3 keyed with the vault's
    chunk-id key, 128 bits in hex."""
    import blake3

    return blake3.blake3(b"links:" + text.encode(), key=store.config.chunk_id_key).hexdigest()[:32]


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
        self._lock = threading.Lock()

    def data_key(self) -> DataKey:
        with self._lock:
            if self._key is None:
                self._key = self.store.new_data_key(self.run_id)
            return self._key

    def writer(self, store: Store, failure: Failure) -> PackWriter:
        """A pack writer whose packs carry this run's id and data key."""
        if store is not self.store:
            raise RegionVaultError("a copy run's data key belongs to another repository")
        writer = PackWriter(store, failure)
        # PackWriter asks for a data key of its own on its first pack unless it holds one
        writer.run_id = self.run_id
        writer._data_key = self.data_key()
        return writer


def missing_chunks(repo: Repository, links: LinkTable, offer: CopyOffer, name: str) -> list[bytes]:
    """The destination side: which of the offer's chunks it must be sent."""
    index = repo._ensure_open().load_index().index
    return [cid for cid in offer.chunk_ids(name) if links.resolve(index, cid) is None]


def ingest_chunks(
    repo: Repository,
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
    store = repo._ensure_open()
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
    except BaseException as exc:
        failure.set(RegionVaultError("copy ingest aborted"))
        if writer is not None:
            writer.abort()
        if isinstance(exc, Aborted) and failure.error is not None:
            raise failure.error from None  # the writer thread's error (disk full ...)
        raise
    links.save(pairs)
    return count, len(written)


def commit_copy(
    repo: Repository,
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
    store = repo._ensure_open()
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

    from regionvault.core.repository._tree import TreeWriter

    p = offer.point
    try:
        tree = TreeWriter(Rechunker(store.new_chunker()), store_chunk)
        for record in offer.records(name):
            ids = bytearray()
            for source_id in record.chunk_ids():
                mine = links.resolve(index, source_id)
                if mine is None:
                    raise RegionVaultError(
                        f"copy of {p['id']}: chunk {source_id.hex()[:16]} has not arrived",
                        region=repo.region,
                    )
                ids += mine
            tree.add(_encode_record(_with_ids(record, bytes(ids)), name))
        tree_chunks = tree.finish()
        for writer in writers:
            writer.close()
    except BaseException as exc:
        failure.set(RegionVaultError("copy commit aborted"))
        for writer in writers:
            writer.abort()
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
    )
    try:
        store.put_sealed(fmt.ObjectKind.MANIFEST, fmt.point_name(point_id), body, if_absent=True)
    except ObjectExists:
        return repo.load_manifest(point_id).point  # another runner committed it first
    return RecoveryPoint(
        id=point_id,
        region=repo.region,
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


def _with_ids(record: fmt.RawRecord, ids: bytes) -> fmt.RawRecord:
    return dataclasses.replace(record, ids=ids)
