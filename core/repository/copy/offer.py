"""The offer: what a destination needs to know of a source's recovery point besides its
chunks (its metadata, and its tree naming the source's opaque chunk ids), read and verified
by the source with its own keys (docs/copy.md, "Offer")."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._disks import encode_disks, point_format, recorded_disks
from regionvault.core.repository._manifest import tree_records
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import iter_records
from regionvault.core.repository.model import Manifest
from regionvault.core.types import CaptureKind, Lineage, RecoveryPoint, Tags

__all__ = ["CopyOffer", "encode_copied_record", "make_offer"]

_OFFER_MAGIC = b"RVOF"


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


def make_offer(store: Store, manifest: Manifest) -> CopyOffer:
    """The source side: a point's metadata and tree, read and verified with its own keys."""
    point_id = manifest.point.id
    p = manifest.point
    if p.kind is CaptureKind.BLOCKS and manifest.image_size is None:
        raise IntegrityError(fmt.point_name(point_id), "block point without an image size")
    recorded = None
    image: dict[str, Any] | None = None
    if manifest.image_size is not None:
        image = {"size": manifest.image_size, "block_size": manifest.block_size}
        if manifest.disks:
            assert manifest.block_size is not None
            recorded = recorded_disks(manifest.disks, manifest.image_size, manifest.block_size)
        if recorded is not None:
            image["disks"] = encode_disks(recorded)
    state = store.load_index()
    parts: list[bytes] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for record in tree_records(store, state.index, pool, manifest):
            parts.append(encode_copied_record(record, fmt.point_name(point_id)))
    point: dict[str, Any] = {
        # 3 only when it carries disks: a destination of version 2 then refuses the offer
        # ("upgrade") rather than commit the disks as one; else 2, which it reads
        "format": point_format(recorded),
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
        "image": image,
        "entries": manifest.entry_count,
        "stats": dict(manifest.stats),
    }
    if manifest.launch:  # the offer is sealed for the destination alone, as its manifest
        point["launch"] = dict(manifest.launch)
    if p.issues:  # a copy is as complete as its source, and says so
        point["issues"] = {
            "total": p.issues,
            "listed": [
                {"path": i.path, "kind": i.kind.value, "message": i.message}
                for i in manifest.issues
            ],
        }
    return CopyOffer(point, b"".join(parts))


def encode_copied_record(record: fmt.RawRecord, name: str) -> bytes:
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
