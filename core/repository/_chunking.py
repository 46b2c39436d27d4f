"""Streaming content-defined chunking with constant memory.

FastCDC decides a cut from the bytes after the chunk's start only, so cutting a stream piece
by piece gives exactly the chunks of one cut over the whole stream, provided the last chunk
of each piece (which may have been cut short by the piece's end) is carried over and cut
again with the next piece. Chunks are memoryviews into reused read buffers: a consumer copies
what it keeps (the backup copies only new chunks, into the batch it hands to a worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import pyfastcdc

__all__ = ["ReadBuffers", "Rechunker", "chunk_file"]

#: bytes read from a file at once (a file smaller than this is read in one call)
READ_BLOCK = 8 << 20


def _read_full(f: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``f``; fewer bytes only at end of file."""
    done = 0
    total = len(view)
    readinto = getattr(f, "readinto", None)
    while done < total:
        if readinto is not None:
            n = readinto(view[done:])
        else:
            data = f.read(total - done)
            n = len(data)
            view[done : done + n] = data
        if not n:
            break
        done += n
    return done


class ReadBuffers:
    """Two read buffers used in turn: a block is read into one while the carried-over tail
    of the previous block still sits in the other. Chunks read through them are only valid
    until the next block is read, so consumers copy what they keep."""

    def __init__(self, block: int, carry: int) -> None:
        self.block = block
        self._bufs = (bytearray(block + carry), bytearray(block + carry))
        self._turn = 0

    def next(self) -> bytearray:
        self._turn ^= 1
        return self._bufs[self._turn]


def chunk_file(
    f: BinaryIO, cdc: pyfastcdc.FastCDC, buffers: ReadBuffers, *, size_hint: int
) -> Iterator[memoryview]:
    """The chunks of everything ``f`` yields, read a block at a time into ``buffers``
    (each chunk is valid only until the next one is asked for)."""
    carry: memoryview | None = None
    want = min(buffers.block, max(size_hint, 0) + 1)
    while True:
        buf = buffers.next()
        keep = 0
        if carry is not None:
            keep = len(carry)
            buf[:keep] = carry
            carry = None
        got = _read_full(f, memoryview(buf)[keep : keep + want])
        total = keep + got
        if total == 0:
            return
        eof = got < want
        last: Any = None
        for chunk in cdc.cut_buf(memoryview(buf)[:total]):
            if last is not None:
                yield last.data
            last = chunk
        if eof:
            if last is not None:
                yield last.data
            return
        carry = last.data
        want = buffers.block


class Rechunker:
    """Cut a stream given as pieces (tree records, block-image data) into chunks."""

    def __init__(self, cdc: pyfastcdc.FastCDC, *, threshold: int = 4 << 20) -> None:
        self._cdc = cdc
        self._threshold = threshold
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Add ``data``; yield the chunks that are now final (possibly none)."""
        self._buf += data
        if len(self._buf) >= self._threshold:
            yield from self._cut(final=False)

    def finish(self) -> Iterator[memoryview]:
        """Yield the remaining chunks; the stream is over."""
        if self._buf:
            yield from self._cut(final=True)

    def _cut(self, *, final: bool) -> Iterator[memoryview]:
        buf, self._buf = self._buf, bytearray()
        last: Any = None
        for chunk in self._cdc.cut_buf(buf):
            if last is not None:
                yield last.data
            last = chunk
        if last is None:
            return
        if final:
            yield last.data
        else:
            self._buf += last.data
