"""Batches: the stored payloads of the chunks a destination asked for, read and verified by
the source, and the body they travel in (docs/copy.md, "Batches"). A chunk keeps its
source id, blob type, flags and raw length, and its payload as stored (still compressed
where it was); the destination re-identifies it under its own keys."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from regionvault.core.errors import IntegrityError
from regionvault.core.repository._pipeline import plan_reads, read_blobs
from regionvault.core.repository._store import Store

if TYPE_CHECKING:
    from regionvault.core.repository._index import Location

__all__ = ["BATCH_BYTES", "ExportedChunk", "decode_chunks", "encode_chunks", "export_chunks"]

#: a chunk on its way: source id, blob type, flags, raw length, stored payload
ExportedChunk = tuple[bytes, int, int, int, bytes]
_CHUNK_HEAD = struct.Struct(">32sBBII")
#: a batch of chunks is sent once it holds this many payload bytes
BATCH_BYTES = 16 << 20


def export_chunks(store: Store, chunk_ids: Iterable[bytes]) -> Iterator[ExportedChunk]:
    """The source side: the stored payloads of these chunks (still compressed where they
    were), each authenticated and checked against its id before it leaves; grouped into
    ranged gets by pack."""
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
