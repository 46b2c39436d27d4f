"""Tree streams: a recovery point's entries (or extents) as a stream of records, stored as
content-defined chunks (tree blobs), so trees of any size are written and read in constant
memory and unchanged stretches of a tree deduplicate between recovery points."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import Rechunker
from regionvault.core.repository.model import Extent, TreeEntry
from regionvault.core.types import FileEntry, FileKind

__all__ = [
    "KIND_TAGS",
    "TreeWriter",
    "decode_path",
    "encode_file_entry",
    "encode_path",
    "entry_record",
    "iter_records",
    "path_problem",
    "to_public",
]

KIND_TAGS = {
    FileKind.FILE: fmt.TAG_FILE,
    FileKind.DIR: fmt.TAG_DIR,
    FileKind.SYMLINK: fmt.TAG_SYMLINK,
    FileKind.FIFO: fmt.TAG_FIFO,
    FileKind.SOCKET: fmt.TAG_SOCKET,
    FileKind.CHARDEV: fmt.TAG_CHARDEV,
    FileKind.BLOCKDEV: fmt.TAG_BLOCKDEV,
}
TAG_KINDS = {tag: kind for kind, tag in KIND_TAGS.items()}
MAX_PATH_BYTES = fmt.MAX_PATH_BYTES


def encode_path(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def decode_path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name an entry of a file tree, or None."""
    if not path:
        return "is empty"
    if "\x00" in path:
        return "contains NUL"
    if path.startswith("/"):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' part"
    if len(encode_path(path)) > MAX_PATH_BYTES:
        return "is too long"
    return None


def _name(value: str | None) -> bytes:
    """A user or group name as recorded: empty when there is none, or when it is longer
    than the format keeps (such a name is not a name any system resolves)."""
    raw = b"" if value is None else encode_path(value)
    return raw if len(raw) <= fmt.MAX_NAME_BYTES else b""


def entry_record(entry: FileEntry, size: int, ids: bytes, change: bytes = b"") -> fmt.RawRecord:
    """The tree record of a captured entry: its metadata from the capture, and for a regular
    file the ``size`` and chunk ``ids`` its data was stored as. ``ValueError`` says why an
    entry cannot be recorded."""
    kind = FileKind(entry.kind)
    target = b""
    if kind is FileKind.SYMLINK:
        if entry.target is None:
            raise ValueError(f"symlink {entry.path!r} has no target")
        target = encode_path(entry.target)
    link = b""
    if entry.link is not None:
        problem = path_problem(entry.link)
        if problem is not None or kind is FileKind.DIR:
            raise ValueError(f"hard link {entry.path!r} to {entry.link!r}: not a link")
        link = encode_path(entry.link)
    return fmt.RawRecord(
        tag=KIND_TAGS[kind],
        mode=entry.mode,
        mtime_ns=entry.mtime_ns,
        size=size,
        path=encode_path(entry.path),
        target=target,
        offset=0,
        ids=ids,
        uid=-1 if entry.uid is None else entry.uid,
        gid=-1 if entry.gid is None else entry.gid,
        user=_name(entry.user),
        group=_name(entry.group),
        rdev=entry.rdev if kind in (FileKind.CHARDEV, FileKind.BLOCKDEV) else 0,
        link=link,
        xattrs=tuple(sorted(entry.xattrs)),
        change=change,
    )


def encode_file_entry(
    entry: FileEntry, size: int = 0, ids: bytes = b"", change: bytes = b""
) -> bytes:
    """:func:`entry_record` encoded as the tree stores it (format version 2)."""
    return fmt.encode_record(entry_record(entry, size, ids, change))


class TreeWriter:
    """Encode records and cut them into tree chunks; ``store_chunk`` stores one chunk and
    returns its id."""

    def __init__(self, rechunker: Rechunker, store_chunk: Callable[[memoryview], bytes]) -> None:
        self._rechunker = rechunker
        self._store = store_chunk
        self.chunk_ids: list[bytes] = []
        self.bytes = 0
        self.entries = 0

    def add(self, record: bytes) -> None:
        self.bytes += len(record)
        self.entries += 1
        for chunk in self._rechunker.feed(record):
            self.chunk_ids.append(self._store(chunk))

    def finish(self) -> list[bytes]:
        for chunk in self._rechunker.finish():
            self.chunk_ids.append(self._store(chunk))
        return self.chunk_ids


def iter_records(chunks: Iterable[bytes], name: str) -> Iterator[fmt.RawRecord]:
    """Decode the records of a tree stream given as its chunks, in order."""
    buf = bytearray()
    for data in chunks:
        buf += data
        records, used = fmt.decode_records(buf, name, final=False)
        del buf[:used]
        yield from records
    records, used = fmt.decode_records(buf, name, final=True)
    yield from records


def to_public(record: fmt.RawRecord, name: str) -> TreeEntry | Extent:
    if record.tag == fmt.TAG_EXTENT:
        return Extent(record.offset, record.size, tuple(record.chunk_ids()))
    path = decode_path(record.path)
    problem = path_problem(path)
    if problem is not None:
        raise IntegrityError(name, f"tree entry path {path!r} {problem}")
    link = None
    if record.link:
        link = decode_path(record.link)
        problem = path_problem(link)
        if problem is not None:
            raise IntegrityError(name, f"tree entry {path!r} links to {link!r}, which {problem}")
    return TreeEntry(
        path=path,
        kind=TAG_KINDS[record.tag],
        mode=record.mode,
        mtime_ns=record.mtime_ns,
        size=record.size,
        target=decode_path(record.target) if record.tag == fmt.TAG_SYMLINK else None,
        chunks=tuple(record.chunk_ids()),
        uid=None if record.uid < 0 else record.uid,
        gid=None if record.gid < 0 else record.gid,
        user=decode_path(record.user) if record.user else None,
        group=decode_path(record.group) if record.group else None,
        rdev=record.rdev,
        link=link,
        xattrs=record.xattrs,
    )
