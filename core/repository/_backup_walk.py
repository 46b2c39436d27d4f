"""What a file backup keeps of the entries it walks, beside the run itself: the parent
point's records, found by path as the capture walks (:class:`ParentLookup`); every entry
taken, for the check once the capture ends (:class:`TakenEntries`); and the rules for one
entry (when it last changed, whether the format can record it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from regionvault.core.repository import _format as fmt
from regionvault.core.repository._tree import encode_path
from regionvault.core.types import FileEntry, FileKind

__all__ = [
    "CHECKED_KINDS",
    "ParentLookup",
    "TakenEntries",
    "identity_digest",
    "last_change",
    "why_unrecordable",
]


class ParentLookup:
    """Finds the parent recovery point's record of a path, reading the parent's tree
    alongside the new one. Both come in capture order, so a window of read-ahead records
    (bounded in count and bytes, oldest dropped first) finds nearly every unchanged file
    without holding the parent's whole tree.

    While the parent's files come in depth-first name order (the order of every capture
    that walks its directories sorted, such as the local provider's), a path not found
    stops the read-ahead at the first record ordered after it: a new file then costs one
    record read ahead, not a window's worth held for the rest of the backup. That starts
    once a few files came in that order, and a parent seen out of it turns it off for the
    rest of the run (a record missed all the same only costs reading that file again)."""

    #: parent files seen in order before a miss may stop the read-ahead early
    _ORDERED = 4

    #: what a held record costs besides its path and chunk ids (the objects around them)
    _OVERHEAD = 256

    def __init__(
        self, records: Iterator[fmt.RawRecord], *, window: int = 50_000, max_bytes: int = 16 << 20
    ) -> None:
        self._records = records
        self._window = window
        self._max_bytes = max_bytes
        self._bytes = 0
        self._pending: OrderedDict[bytes, fmt.RawRecord] = OrderedDict()
        self._exhausted = False
        #: the last parent file's path, split at "/", while the parent's files are in order
        self._last: list[bytes] | None = []
        self._in_order = 0

    def _cost(self, record: fmt.RawRecord) -> int:
        cost = len(record.ids) + len(record.path) + self._OVERHEAD
        if record.xattrs:  # a version 2 record's attributes are held with it
            cost += sum(len(name) + len(value) for name, value in record.xattrs)
        return cost

    def _take(self, path: bytes) -> fmt.RawRecord | None:
        found = self._pending.pop(path, None)
        if found is not None:
            self._bytes -= self._cost(found)
        return found

    def find(self, path: bytes) -> fmt.RawRecord | None:
        found = self._take(path)
        if found is not None or self._exhausted:
            return found
        key = path.split(b"/")
        for read, record in enumerate(self._records, 1):
            if record.tag == fmt.TAG_FILE:
                past = False
                if self._last is not None:
                    parts = record.path.split(b"/")
                    if parts > self._last:
                        self._last = parts
                        self._in_order += 1
                        past = self._in_order > self._ORDERED and parts > key
                    else:
                        self._last = None  # not in depth-first name order
                if record.path == path:
                    return record
                self._pending[record.path] = record
                self._bytes += self._cost(record)
                while len(self._pending) > self._window or self._bytes > self._max_bytes:
                    _, dropped = self._pending.popitem(last=False)
                    self._bytes -= self._cost(dropped)
                if past:
                    return None  # ordered after ``path``: the parent has no such file
            if read >= self._window:
                return None  # a new file, most likely; the window keeps what was read
        self._exhausted = True
        return None


def identity_digest(identity: tuple[int, ...]) -> bytes:
    # compared within this process only, against the same entry's identity: the tuple's own
    # 64-bit hash tells a change apart (a cryptographic digest costs ten times as much)
    return (hash(identity) & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


#: the kinds of entry the check at the end compares with their identity as taken
CHECKED_KINDS = frozenset((FileKind.FILE, FileKind.SYMLINK, FileKind.DIR))


def last_change(entry: FileEntry) -> int:
    """When ``entry`` last changed as the file system stamped it: its ctime where the capture
    tells it (every write moves it, and no one can set it), else its mtime."""
    return entry.mtime_ns if entry.changed_ns is None else entry.changed_ns


def why_unrecordable(entry: FileEntry, path: bytes) -> str | None:
    """Why the format cannot record ``entry`` (``path``: its encoded path), or None: such an
    entry is left out and named, never a reason to fail the whole backup."""
    if not -(1 << 63) <= entry.mtime_ns < 1 << 63:
        return (
            f"cannot be recorded: its mtime ({entry.mtime_ns} ns from 1970) is out of the "
            "format's range (years 1677 to 2262)"
        )
    if len(path) > fmt.MAX_PATH_BYTES:
        return f"cannot be recorded: its path is longer than {fmt.MAX_PATH_BYTES} bytes"
    if entry.target is not None and len(encode_path(entry.target)) > fmt.MAX_PATH_BYTES:
        return f"cannot be recorded: its symlink target is longer than {fmt.MAX_PATH_BYTES} bytes"
    return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class TakenEntries:
    """Every entry a backup took that can still change (it has an identity), in capture
    order, for the check once the capture ends: its path, kind and a digest of its identity
    as taken. Paths are front-coded (the bytes shared with the previous path are counted,
    not stored), so an entry costs about the length of its own name plus ten bytes, and no
    Python object is held per entry."""

    _KINDS: ClassVar[tuple[FileKind, ...]] = tuple(FileKind)
    _CODES: ClassVar[dict[FileKind, int]] = {kind: code for code, kind in enumerate(_KINDS)}

    def __init__(self) -> None:
        self._buf = bytearray()
        self._last = b""
        self.count = 0

    def add(self, path: bytes, kind: FileKind, identity: tuple[int, ...]) -> None:
        last = self._last
        # a walk lists siblings one after another: they share their directory's prefix
        cut = path.rfind(b"/") + 1
        if cut and last[:cut] == path[:cut]:
            shared = cut
        else:
            # entering or leaving a directory: the longest shared prefix, by bisection
            shared, high = 0, min(len(last), len(path))
            while shared < high:
                mid = (shared + high + 1) // 2
                if last[:mid] == path[:mid]:
                    shared = mid
                else:
                    high = mid - 1
        suffix = path[shared:]
        buf = self._buf
        if shared < 0x80 and len(suffix) < 0x80:  # nearly always: one byte each
            buf.append(shared)
            buf.append(len(suffix))
        else:
            buf += _varint(shared)
            buf += _varint(len(suffix))
        buf += suffix
        buf.append(self._CODES[kind])
        buf += identity_digest(identity)
        self._last = path
        self.count += 1

    def __iter__(self) -> Iterator[tuple[bytes, FileKind, bytes]]:
        buf = memoryview(self._buf)
        pos = 0
        path = b""

        def varint() -> int:
            nonlocal pos
            n = shift = 0
            while True:
                byte = buf[pos]
                pos += 1
                n |= (byte & 0x7F) << shift
                if byte < 0x80:
                    return n
                shift += 7

        end = len(buf)
        while pos < end:
            shared, length = buf[pos], buf[pos + 1]
            if shared < 0x80 and length < 0x80:  # nearly always: one byte each
                pos += 2
            else:
                shared = varint()
                length = varint()
            path = path[:shared] + bytes(buf[pos : pos + length])
            pos += length
            kind = self._KINDS[buf[pos]]
            digest = bytes(buf[pos + 1 : pos + 9])
            pos += 9
            yield path, kind, digest
