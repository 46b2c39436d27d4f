"""Tree streams: a recovery point's entries (or extents) as a stream of records, stored as
content-defined chunks (tree blobs), so trees of any size are written and read in constant
memory and unchanged stretches of a tree deduplicate between recovery points."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import Rechunker
from regionvault.core.repository.model import Extent, TreeEntry
from regionvault.core.types import FileKind

__all__ = [
    "KIND_TAGS",
    "TreeWriter",
    "decode_path",
    "encode_path",
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
MAX_PATH_BYTES = 0xFFFF


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
    from regionvault.core.errors import IntegrityError

    if record.tag == fmt.TAG_EXTENT:
        return Extent(record.offset, record.size, tuple(record.chunk_ids()))
    path = decode_path(record.path)
    problem = path_problem(path)
    if problem is not None:
        raise IntegrityError(name, f"tree entry path {path!r} {problem}")
    return TreeEntry(
        path=path,
        kind=TAG_KINDS[record.tag],
        mode=record.mode,
        mtime_ns=record.mtime_ns,
        size=record.size,
        target=decode_path(record.target) if record.tag == fmt.TAG_SYMLINK else None,
        chunks=tuple(record.chunk_ids()),
    )
