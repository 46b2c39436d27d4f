"""Incremental block backups: which chunks of a base point a new block image can take
whole, and which ranges it must read.

A capture taken with ``since`` says where its image may differ from the image of that
earlier capture (``BlockCapture.changed_ranges``); the base is the recovery point made from
that earlier capture. Outside the changed ranges the new image is the base's image byte for
byte: a chunk of the base that no changed range touches holds exactly the new image's bytes
where it lies (its offset and length come from the base's extent records and the index),
and every byte outside the base's extents and the changed ranges is a zero in both.

So the new point takes the untouched chunks whole (runs of them within an extent become
extent records of their own: chunk ids, nothing read), and reads the rest: the changed
ranges and the base chunks they touch (``spans``). A capture reads whole blocks, so the
ranges asked of it (``reads``) are the spans widened to blocks; what it yields outside the
spans is dropped, since there the base's chunks (or zeros) already stand for it. Restoring
the point gives the image a full read gives.

Anything that leaves doubt about the base (another image size, block size or disk layout,
an extent out of place, a chunk the index lacks, an extent whose chunks do not add up to its
length, changed ranges that are not ascending, disjoint and inside the image) means no plan:
the caller reads the image in full.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from regionvault.core.errors import RegionVaultError
from regionvault.core.interfaces import BlockCapture
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._disks import same_layout
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._manifest import decode_manifest, tree_records
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import Manifest
from regionvault.core.types import CaptureKind, Disk

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["BlockPlan", "block_plan", "plan_incremental"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockPlan:
    """What an incremental block backup takes from its base and what it reads."""

    #: the base recovery point
    base_id: str
    #: runs of the base's chunks taken whole, as extent records, ascending; none meets a span
    kept: tuple[fmt.RawRecord, ...]
    #: ``(offset, length)`` of the image the point takes from the capture: ascending,
    #: disjoint, merged (the changed ranges and the base chunks they touch)
    spans: tuple[tuple[int, int], ...]
    #: ``(offset, length)`` asked of ``BlockCapture.read_ranges``: the spans widened to
    #: whole blocks (the last may end at the image's end), merged
    reads: tuple[tuple[int, int], ...]

    def asked(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` lies within one range of ``reads``."""
        at = bisect.bisect_right(self.reads, (offset, _BIG)) - 1
        return at >= 0 and offset + length <= sum(self.reads[at])

    def clip(self, offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
        """The parts of a piece the capture read that lie within the spans."""
        end = offset + len(data)
        at = max(0, bisect.bisect_right(self.spans, (offset, _BIG)) - 1)
        while at < len(self.spans) and self.spans[at][0] < end:
            lo = max(offset, self.spans[at][0])
            hi = min(end, sum(self.spans[at]))
            if lo < hi:
                yield lo, data if (lo, hi) == (offset, end) else data[lo - offset : hi - offset]
            at += 1


#: larger than any length: ``(offset, _BIG)`` sorts after every range starting at offset
_BIG = 1 << 62


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted and merged where they overlap or meet."""
    out: list[tuple[int, int]] = []
    for o, n in sorted(ranges):
        if out and o <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], o + n) - last[0])
        elif n > 0:
            out.append((o, n))
    return out


def _widened(ranges: Sequence[tuple[int, int]], block: int, size: int) -> list[tuple[int, int]]:
    """Ranges widened to whole blocks (clipped to ``size``), merged."""
    return _merged(
        [
            (o - o % block, min(size, -(-(o + n) // block) * block) - (o - o % block))
            for o, n in ranges
        ]
    )


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


def _chunk_sizes(
    records: Sequence[fmt.RawRecord], size: int, index: ChunkIndex
) -> list[list[int]] | str:
    """Each extent's chunk lengths (from the index), or what is wrong with the base."""
    sizes: list[list[int]] = []
    end = 0
    for record in records:
        if record.tag != fmt.TAG_EXTENT:
            return "its tree holds a file entry"
        if record.offset < end or record.size <= 0 or record.offset + record.size > size:
            return f"its extent at {record.offset} is out of place"
        end = record.offset + record.size
        lengths = []
        for chunk_id in record.chunk_ids():
            where = index.get(chunk_id)
            if where is None:
                return f"a chunk of its extent at {record.offset} is not in the index"
            lengths.append(where.raw_length)
        if sum(lengths) != record.size or not all(lengths):
            return f"the chunks of its extent at {record.offset} do not add up to its length"
        sizes.append(lengths)
    return sizes


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
    if not same_layout(base.disks, disks):
        return "its image holds other disks than the capture's"
    problem = _changed_problem(changed, size)
    if problem is not None:
        return problem
    sizes = _chunk_sizes(records, size, index)
    if isinstance(sizes, str):
        return sizes
    kept: list[fmt.RawRecord] = []
    spans: list[tuple[int, int]] = list(changed)
    cid = fmt.CHUNK_ID_SIZE
    j = 0  # the first changed range that ends after the chunk looked at
    for record, lengths in zip(records, sizes, strict=True):
        run_start = run_first = 0  # the run of untouched chunks: its offset, first chunk
        at = record.offset
        for i, length in enumerate([*lengths, 0]):
            end = at + length
            while j < len(changed) and changed[j][0] + changed[j][1] <= at:
                j += 1
            # touched: a changed range starts before the chunk ends (and ends after it
            # starts); the sentinel (length 0, at the extent's end) closes the last run
            touched = i == len(lengths) or (j < len(changed) and changed[j][0] < end)
            if touched:
                if i > run_first:
                    kept.append(
                        replace(
                            record,
                            offset=record.offset + run_start,
                            size=at - record.offset - run_start,
                            ids=record.ids[run_first * cid : i * cid],
                        )
                    )
                if i < len(lengths):
                    spans.append((at, length))
                run_start, run_first = end - record.offset, i + 1
            at = end
    merged = _merged(spans)
    return BlockPlan(
        point.id, tuple(kept), tuple(merged), tuple(_widened(merged, block_size, size))
    )


def block_plan(
    store: Store,
    index: ChunkIndex,
    pool: ThreadPoolExecutor,
    capture: BlockCapture,
    instance_id: str,
    base: str,
) -> BlockPlan | None:
    """The plan for backing up ``capture`` against the point ``base``, or None (the image
    is read in full) when the capture gives no changed ranges or anything leaves doubt
    about the base (logged, naming the base and why)."""
    why: str
    try:
        changed = capture.changed_ranges()
        if changed is None:
            return None
        name = fmt.point_name(fmt.parse_hex_id(base, "base recovery point id"))
        manifest = decode_manifest(store, name, store.get_sealed(fmt.ObjectKind.MANIFEST, name))
        records = list(tree_records(store, index, pool, manifest))
    except (ValueError, RegionVaultError) as exc:
        why = f"it or the capture's changed ranges cannot be read ({exc})"
    else:
        plan = plan_incremental(
            base=manifest,
            records=records,
            instance_id=instance_id,
            size=capture.size,
            block_size=capture.block_size,
            disks=capture.disks,
            changed=changed,
            index=index,
        )
        if isinstance(plan, BlockPlan):
            return plan
        why = plan
    log.warning(
        "backup of %s in %s reads the whole image, not against base %s: %s",
        instance_id,
        store.region,
        base,
        why,
    )
    return None
