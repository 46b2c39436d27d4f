"""Incremental block backups: which extents of a base point a new block image can take
whole, and which ranges it must read.

A capture taken with ``since`` says where its image may differ from the image of that
earlier capture (``BlockCapture.changed_ranges``); the base is the recovery point made from
that earlier capture. Outside the changed ranges the new image is the base's image byte for
byte, so a base extent that no changed range touches holds exactly the new image's bytes
there, and every byte outside the base's extents and the changed ranges is a zero in both.
The new point takes those extents whole (their chunk ids, nothing read) and reads the rest:
the changed ranges and the base extents they touch, widened to whole blocks (the unit a
capture reads in) until no kept extent lies in a block that is read. Restoring the point
gives the image a full read would have given.

Anything that leaves doubt about the base (another image size, block size or disk layout,
an extent out of place, a chunk the index lacks, an extent whose chunks do not add up to its
length, changed ranges that are not ascending, disjoint and inside the image) makes the plan
None: the caller reads the image in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository.model import Manifest
from regionvault.core.types import CaptureKind, Disk, disk_layout

__all__ = ["BlockPlan", "plan_incremental"]


@dataclass(frozen=True)
class BlockPlan:
    """What an incremental block backup takes from its base and what it reads."""

    #: the base recovery point
    base_id: str
    #: the base's extents taken whole, ascending (none lies in a block of ``spans``)
    kept: tuple[fmt.RawRecord, ...]
    #: ``(offset, length)`` to read from the capture: ascending, disjoint, block-aligned
    #: (the last may end at the image's end), not adjacent
    spans: tuple[tuple[int, int], ...]

    @property
    def bytes_from_base(self) -> int:
        return sum(record.size for record in self.kept)

    def covers(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` lies within one span (spans are merged,
        so a piece the capture read from them lies within one)."""
        lo, hi = 0, len(self.spans)
        while lo < hi:  # the last span starting at or before offset
            mid = (lo + hi) // 2
            if self.spans[mid][0] <= offset:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return False
        start, size = self.spans[lo - 1]
        return offset + length <= start + size


def base_disks(manifest: Manifest) -> tuple[Disk, ...] | None:
    """The disk layout of a block point's image (one disk, the whole image, for a point
    that records none)."""
    if manifest.image_size is None or manifest.block_size is None:
        return None
    recorded = getattr(manifest, "disks", None)  # manifests of several disks record them
    return disk_layout(recorded or None, manifest.image_size, manifest.block_size)


def _merged(ranges: Sequence[tuple[int, int]], block: int, size: int) -> list[tuple[int, int]]:
    """``(offset, end)`` pairs widened to whole blocks (clipped to ``size``), sorted and
    merged where they overlap or meet."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(
        (o - o % block, min(size, -(-(o + n) // block) * block)) for o, n in ranges
    ):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _changed_problem(changed: Sequence[tuple[int, int]], size: int) -> str | None:
    end = 0
    for offset, length in changed:
        if length <= 0 or offset < end or offset + length > size:
            return (
                f"its changed range ({offset}, {length}) is not ascending, disjoint and "
                f"inside the {size}-byte image"
            )
        end = offset + length
    return None


def _base_problem(records: Sequence[fmt.RawRecord], size: int, index: ChunkIndex) -> str | None:
    end = 0
    for record in records:
        if record.tag != fmt.TAG_EXTENT:
            return "its tree holds a file entry"
        if record.offset < end or record.size <= 0 or record.offset + record.size > size:
            return f"its extent at {record.offset} is out of place"
        end = record.offset + record.size
        total = 0
        for chunk_id in record.chunk_ids():
            where = index.get(chunk_id)
            if where is None:
                return f"a chunk of its extent at {record.offset} is not in the index"
            total += where.raw_length
        if total != record.size:
            return f"the chunks of its extent at {record.offset} do not add up to its length"
    return None


def plan_incremental(
    *,
    base: Manifest,
    records: Sequence[fmt.RawRecord],
    instance_id: str,
    size: int,
    block_size: int,
    disks: Sequence[Disk],
    changed: Sequence[tuple[int, int]],
    index: ChunkIndex,
) -> BlockPlan | str:
    """The plan for an image of ``size`` bytes (``block_size``, ``disks``) of
    ``instance_id`` that differs from the image of ``base`` (whose tree records are
    ``records``) at most within ``changed``; or why the base cannot serve (then the image
    is read in full)."""
    point = base.point
    if point.kind is not CaptureKind.BLOCKS:
        return f"it is a {point.kind} point"
    if point.instance_id != instance_id:
        return f"it is a point of {point.instance_id}"
    if (base.image_size, base.block_size) != (size, block_size):
        return (
            f"its image is {base.image_size} bytes in blocks of {base.block_size}, the "
            f"capture's {size} in blocks of {block_size}"
        )
    if base_disks(base) != tuple(disks):
        return "its image holds other disks than the capture's"
    problem = _changed_problem(changed, size) or _base_problem(records, size, index)
    if problem is not None:
        return problem
    spans = _merged(changed, block_size, size)
    touched: set[int] = set()
    while True:  # bounded: each round touches another extent, or ends
        grown = False
        j = 0
        for lo, hi in spans:
            while j < len(records) and records[j].offset + records[j].size <= lo:
                j += 1
            k = j
            while k < len(records) and records[k].offset < hi:
                if k not in touched:
                    touched.add(k)
                    grown = True
                k += 1
        if not grown:
            break
        spans = _merged(
            [(o, h - o) for o, h in spans]
            + [(records[k].offset, records[k].size) for k in touched],
            block_size,
            size,
        )
    kept = tuple(r for k, r in enumerate(records) if k not in touched)
    return BlockPlan(point.id, kept, tuple((lo, hi - lo) for lo, hi in spans))
