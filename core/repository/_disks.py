"""The disks of a block image in the format (docs/format.md, "Manifests", version 3): what
a manifest records of them, where data may lie, and the file names a restore into a
directory gives them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from regionvault.core.repository import _format as fmt
from regionvault.core.types import Disk, disk_layout

__all__ = [
    "decode_disks",
    "disk_file_names",
    "encode_disks",
    "off_disks",
    "point_format",
    "recorded_disks",
    "same_layout",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def recorded_disks(disks: Sequence[Disk], size: int, block_size: int) -> tuple[Disk, ...] | None:
    """What a manifest records of ``disks``: None for one disk that is the whole image (a
    one-disk point's manifest is then what format version 2 wrote, byte for byte) and for
    an empty image, else the layout. The name of a lone whole-image disk is not kept: it
    is informative only."""
    if not disks:  # an empty image's
        return None
    layout = disk_layout(disks, size, block_size)
    if len(layout) == 1 and layout[0].offset == 0 and layout[0].size == size:
        return None
    return layout


def point_format(disks: Sequence[Disk] | None) -> int:
    """The format version a point's manifest (and a copy offer of it) says: 3 when it
    records disks, so that a reader of version 2 refuses it ("upgrade") instead of
    restoring its disks as one; 2 otherwise, which every reader since version 2 reads."""
    return fmt.FORMAT_VERSION_DISKS if disks else fmt.FORMAT_VERSION_WITHOUT_DISKS


def same_layout(a: Sequence[Disk], b: Sequence[Disk]) -> bool:
    """Whether two layouts put disks of the same sizes at the same offsets (names, which
    are informative and not kept for a lone whole-image disk, do not count)."""
    return [(d.offset, d.size) for d in a] == [(d.offset, d.size) for d in b]


def encode_disks(disks: Sequence[Disk]) -> list[dict[str, Any]]:
    return [{"name": d.name, "offset": d.offset, "size": d.size} for d in disks]


def decode_disks(
    value: Any, *, version: int, size: int, block_size: int
) -> tuple[Disk, ...] | None:
    """The disks a manifest or offer records (None when it records none). ValueError when
    they are malformed, out of place, or recorded by a version before 3."""
    if value is None:
        return None
    if version < fmt.FORMAT_VERSION_DISKS:
        raise ValueError(f"disks recorded by format version {version}, which has none")
    if not isinstance(value, list) or not value:
        raise ValueError("disks is not a non-empty list")
    disks = []
    for item in value:
        name, offset, length = item["name"], item["offset"], item["size"]
        if not isinstance(name, str) or type(offset) is not int or type(length) is not int:
            raise ValueError(f"disk {item!r} is malformed")
        disks.append(Disk(name, offset, length))
    layout = recorded_disks(disks, size, block_size)
    if layout is None:
        raise ValueError("disks recorded for an image of one whole disk")
    return layout


def off_disks(disks: Sequence[Disk], offset: int, length: int) -> int | None:
    """The first offset of ``[offset, offset + length)`` that lies on no disk (in a gap
    between disks, or past the last), or None when the whole range lies on disks."""
    pos, end = offset, offset + length
    for disk in disks:
        if pos >= end:
            return None
        if disk.end <= pos:
            continue
        if disk.offset > pos:
            return pos
        pos = disk.end
    return pos if pos < end else None


def disk_file_names(disks: Iterable[Disk]) -> list[str]:
    """The file each disk restores to in a directory: ``disk<N>-<name>.img``, N its place
    (0 boots), its name with anything but letters, digits, ``.``, ``_`` and ``-`` made
    ``-`` ("/dev/xvdb" gives ``disk1-dev-xvdb.img``)."""
    names = []
    for n, disk in enumerate(disks):
        safe = _UNSAFE.sub("-", disk.name).strip("-.")
        names.append(f"disk{n}-{safe}.img" if safe else f"disk{n}.img")
    return names
