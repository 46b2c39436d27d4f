"""Manifests: one sealed JSON document per recovery point (docs/format.md, "Manifests"):
writing one, reading one, reading them all, and streaming a point's tree records."""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import blake3
from regionvault.core.errors import IntegrityError, ObjectNotFound
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._disks import (
    decode_disks,
    encode_disks,
    point_format,
    recorded_disks,
)
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._pipeline import Fetcher
from regionvault.core.repository._store import Store, canonical_json
from regionvault.core.repository._tree import iter_records
from regionvault.core.repository.model import Manifest, Problem
from regionvault.core.types import (
    CaptureIssue,
    CaptureKind,
    Disk,
    IssueKind,
    Lineage,
    RecoveryPoint,
    Tags,
    disk_layout,
)

__all__ = [
    "MAX_LISTED_ISSUES",
    "PointCache",
    "decode_manifest",
    "encode_manifest",
    "load_manifests",
    "load_points",
    "root_hash",
    "tree_records",
]

#: a manifest names at most this many issues (the total is always recorded)
MAX_LISTED_ISSUES = 1000


def _text(name: str) -> str:
    """``name`` as UTF-8 can hold it: a path's bytes that are not UTF-8 (surrogate-escaped)
    are written as ``\\xNN``, for the reader of an issue, not for finding the entry."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no raw byte gave
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def root_hash(store: Store, doc: Mapping[str, Any]) -> str:
    """BLAKE3, keyed with the chunk-id key, over the canonical manifest without its root hash.
    The tree enters through its chunk ids, themselves keyed hashes of the tree's bytes."""
    body = canonical_json({k: v for k, v in doc.items() if k != "root_hash"})
    return blake3.blake3(body, key=store.config.chunk_id_key).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def encode_manifest(
    store: Store,
    *,
    point_id: str,
    kind: CaptureKind,
    instance_id: str,
    instance_name: str,
    tags: Mapping[str, str],
    function: str | None = None,
    policy: str | None,
    created_at: datetime,
    taken_at: datetime,
    expires_at: datetime | None,
    lineage: Lineage | None,
    parent: str | None,
    size: int,
    image: tuple[int, int] | None,
    tree_chunks: list[bytes],
    tree_bytes: int,
    entries: int,
    stats: Mapping[str, int],
    issues: Sequence[CaptureIssue] = (),
    issues_total: int | None = None,
    disks: Sequence[Disk] | None = None,
    launch: Mapping[str, Any] | None = None,
) -> bytes:
    """The manifest's canonical body. ``issues`` (what the capture did not take whole) are
    recorded only when there are some, so a complete point's manifest is as version 1 wrote
    it; at most :data:`MAX_LISTED_ISSUES` are named, ``issues_total`` (default: how many
    were given) counts them all. ``disks`` (a block image's) are recorded only when they
    are not one disk that is the whole image, and then the manifest is of format version 3
    (:func:`~regionvault.core.repository._disks.point_format`); else of version 2."""
    recorded = None
    if image is not None and disks is not None:
        recorded = recorded_disks(disks, image[0], image[1])
    image_doc: dict[str, Any] | None = None
    if image is not None:
        image_doc = {"size": image[0], "block_size": image[1]}
        if recorded is not None:
            image_doc["disks"] = encode_disks(recorded)
    doc: dict[str, Any] = {
        "format": point_format(recorded),
        "id": point_id,
        "vault": store.vault_id,
        "repository": store.config.repository_id,
        "region": store.region,
        "kind": kind.value,
        "instance": {"id": instance_id, "name": instance_name},
        "tags": dict(tags),
        "function": function,
        "policy": policy,
        "created_at": _iso(created_at),
        "taken_at": _iso(taken_at),
        "expires_at": _iso(expires_at),
        "lineage": None
        if lineage is None
        else {
            "source_region": lineage.source_region,
            "source_recovery_point": lineage.source_recovery_point,
        },
        "parent": parent,
        "size": size,
        "image": image_doc,
        "tree": {"chunks": [c.hex() for c in tree_chunks], "bytes": tree_bytes, "entries": entries},
        "stats": dict(stats),
    }
    total = len(issues) if issues_total is None else issues_total
    if total:
        doc["issues"] = {
            "total": total,
            "listed": [
                {"path": _text(i.path), "kind": i.kind.value, "message": _text(i.message)}
                for i in issues[:MAX_LISTED_ISSUES]
            ],
        }
    if launch:  # recorded only when the capture gave some: other manifests stay as they were
        doc["launch"] = dict(launch)
    doc["root_hash"] = root_hash(store, doc)
    return canonical_json(doc)


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def decode_manifest(store: Store, name: str, body: bytes) -> Manifest:
    try:
        doc: dict[str, Any] = json.loads(body)
        fmt.check_version(name, int(doc["format"]))
        expected = root_hash(store, doc)
        if not hmac.compare_digest(expected, str(doc["root_hash"])):
            raise IntegrityError(name, "root hash does not match the manifest's content")
        point_id = doc["id"]
        if fmt.point_name(point_id) != name:
            raise IntegrityError(name, f"manifest of point {point_id} stored under another name")
        if doc["vault"] != store.vault_id or doc["repository"] != store.config.repository_id:
            raise IntegrityError(name, "manifest belongs to another vault or repository")
        lineage = doc["lineage"]
        image = doc["image"]
        created = _dt(doc["created_at"])
        taken = _dt(doc["taken_at"])
        assert created is not None and taken is not None
        disks: tuple[Disk, ...] = ()
        if image is not None:
            size, block_size = int(image["size"]), int(image["block_size"])
            recorded = decode_disks(
                image.get("disks"), version=int(doc["format"]), size=size, block_size=block_size
            )
            disks = recorded or disk_layout(None, size, block_size)
        issues = doc.get("issues") or {"total": 0, "listed": []}
        listed = tuple(
            CaptureIssue(str(i["path"]), IssueKind(i["kind"]), str(i["message"]))
            for i in issues["listed"]
        )
        point = RecoveryPoint(
            id=point_id,
            region=doc["region"],
            instance_id=doc["instance"]["id"],
            instance_name=doc["instance"]["name"],
            kind=CaptureKind(doc["kind"]),
            created_at=created,
            expires_at=_dt(doc["expires_at"]),
            size=int(doc["size"]),
            policy=doc["policy"],
            lineage=None
            if lineage is None
            else Lineage(lineage["source_region"], lineage["source_recovery_point"]),
            tags=Tags(doc["tags"]),
            function=doc.get("function"),
            issues=int(issues["total"]),
        )
        tree = doc["tree"]
        chunks = tuple(bytes.fromhex(c) for c in tree["chunks"])
        if any(len(c) != fmt.CHUNK_ID_SIZE for c in chunks):
            raise ValueError("tree chunk id of the wrong length")
        return Manifest(
            point=point,
            format_version=int(doc["format"]),
            vault_id=doc["vault"],
            taken_at=taken,
            parent=doc["parent"],
            root_hash=doc["root_hash"],
            tree_chunks=chunks,
            tree_bytes=int(tree["bytes"]),
            entry_count=int(tree["entries"]),
            image_size=None if image is None else int(image["size"]),
            block_size=None if image is None else int(image["block_size"]),
            stats={str(k): int(v) for k, v in doc["stats"].items()},
            issues=listed,
            disks=disks,
            launch=_launch(doc.get("launch")),
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise IntegrityError(name, f"manifest is malformed ({exc!r})") from None


def _launch(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("launch is not an object")
    return value


def tree_records(
    store: Store, index: ChunkIndex, pool: Executor, manifest: Manifest
) -> Iterator[fmt.RawRecord]:
    """The tree records of ``manifest``'s point, in order, streamed from the vault."""
    name = fmt.point_name(manifest.point.id)
    fetcher = Fetcher(store, index, pool, what=name, window_bytes=4 << 20, ahead=2)
    return iter_records(fetcher.chunks(manifest.tree_chunks), name)


def _read(
    store: Store, names: Sequence[str], *, tolerant: bool
) -> tuple[list[tuple[str, Manifest]], list[Problem]]:
    """The manifests named (those forgotten meanwhile left out), decrypted on up to 8
    threads when there are several; with ``tolerant``, unreadable ones as problems."""

    def read(name: str) -> Manifest | Problem | None:
        try:
            body = store.get_sealed(fmt.ObjectKind.MANIFEST, name)
            return decode_manifest(store, name, body)
        except ObjectNotFound:
            return None  # forgotten while listing
        except IntegrityError as exc:
            if not tolerant:
                raise
            return Problem(exc.object_name, exc.reason)

    if len(names) > 1:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(read, names))
    else:
        results = [read(name) for name in names]
    manifests: list[tuple[str, Manifest]] = []
    problems: list[Problem] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Manifest):
            manifests.append((name, result))
        elif isinstance(result, Problem):
            problems.append(result)
    return manifests, problems


def load_manifests(store: Store, *, tolerant: bool = False) -> tuple[list[Manifest], list[Problem]]:
    """Every manifest in the vault, read and authenticated now, oldest first. With
    ``tolerant``, unreadable ones are returned as problems instead of raising."""
    names = [info.name for info in store.vault.list(fmt.POINT_PREFIX)]
    read, problems = _read(store, names, tolerant=tolerant)
    manifests = [m for _, m in read]
    manifests.sort(key=lambda m: (m.point.created_at, m.point.id))
    return manifests, problems


#: what says an object is still the one that was read: a name is never rewritten (forget
#: deletes it), but a scheduled point's id is its slot's, so a forgotten one can come back
_Version = tuple[int, object, str | None]


class PointCache:
    """The recovery points of one vault's manifests, by object name, for
    :func:`load_points`.

    A manifest is immutable once written, so each is decrypted once per process instead of
    at every listing: a tick that asks for every instance's newest point lists the vault and
    decrypts only what is new since the last listing. Each entry is checked against the
    listing (size, modification time, etag), so an object written again under a forgotten
    point's name is read again; names a listing no longer shows (forgotten points) are
    dropped, and a manifest that could not be read is never kept (it is read, and reported,
    again). Only the :class:`RecoveryPoint` is kept (about 1 KiB in memory for a point with
    a few tags; the tree's chunk ids, stats and issues are not): memory is bounded by the
    vault's live points, some 10 MiB for 10,000 instances keeping one point each, 70 MiB
    keeping seven. Thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[_Version, RecoveryPoint]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: _Version) -> RecoveryPoint | None:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or entry[0] != version:
            return None
        return entry[1]

    def put(self, name: str, version: _Version, point: RecoveryPoint) -> None:
        with self._lock:
            self._entries[name] = (version, point)

    def keep_only(self, names: set[str]) -> None:
        """Drop every entry not named in ``names`` (a complete listing)."""
        with self._lock:
            for name in [n for n in self._entries if n not in names]:
                del self._entries[name]

    def discard(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def load_points(
    store: Store, cache: PointCache, *, tolerant: bool = False
) -> tuple[list[RecoveryPoint], list[Problem]]:
    """Every recovery point in the vault, oldest first, from one listing: only the
    manifests ``cache`` does not hold (as listed) are read and decrypted. With
    ``tolerant``, unreadable ones are returned as problems instead of raising. Verify and
    prune read every manifest afresh instead (:func:`load_manifests`)."""
    listed = {info.name: info for info in store.vault.list(fmt.POINT_PREFIX)}
    cache.keep_only(set(listed))
    points: list[RecoveryPoint] = []
    names: list[str] = []
    for name, info in listed.items():
        point = cache.get(name, (info.size, info.modified, info.etag))
        if point is None:
            names.append(name)
        else:
            points.append(point)
    read, problems = _read(store, names, tolerant=tolerant)
    for name, manifest in read:
        info = listed[name]
        cache.put(name, (info.size, info.modified, info.etag), manifest.point)
        points.append(manifest.point)
    points.sort(key=lambda p: (p.created_at, p.id))
    return points, problems
