"""Streaming content-defined chunking with constant memory.

FastCDC decides a cut from the bytes after the chunk's start only, so cutting a stream piece
by piece gives exactly the chunks of one cut over the whole stream, provided the last chunk
of each piece (which may have been cut short by the piece's end) is carried over and cut
again with the next piece.

A backup reads its streams into *staging blocks* (:class:`StagingPool`) and cuts them in
place (:class:`Cutter`): chunks are handed on as ``(offset, length)`` spans of a block, and
the block is reused only once every holder has released it, so a chunk's bytes are not
copied between the read and their compression or encryption (only the one unfinished chunk
moves, when a block fills up).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import pyfastcdc

__all__ = ["PIECE", "Block", "Cutter", "Rechunker", "StagingPool", "read_full"]

#: bytes read (or copied) into a staging block at once; each such piece's final chunks go
#: to a worker together
PIECE = 1 << 20
#: a block holds this many pieces (plus one carried-over chunk)
_PIECES_PER_BLOCK = 2
_POLL = 0.05


def read_full(f: BinaryIO, view: memoryview) -> int:
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


class Block:
    """One staging buffer: streams are appended at ``pos``; ``refs`` counts its holders
    (the cutter filling it, and every batch of spans cut from it not yet done)."""

    __slots__ = ("buf", "pos", "refs", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.refs = 0


class StagingPool:
    """At most ``count`` staging blocks of ``size`` bytes, made on demand and reused.
    :meth:`take` waits for a free block (calling ``check`` between polls, which raises to
    stop the wait), so the blocks bound the data in flight."""

    def __init__(self, count: int, size: int, check: Callable[[], None]) -> None:
        self.size = size
        self._count = count
        self._made = 0
        self._check = check
        self._free: queue.SimpleQueue[Block] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def take(self) -> Block:
        try:
            block = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self._count
                if make:
                    self._made += 1
            if make:
                block = Block(self.size)
            else:
                while True:
                    try:
                        block = self._free.get(timeout=_POLL)
                        break
                    except queue.Empty:
                        self._check()
        block.pos = 0
        block.refs = 1
        return block

    def retain(self, block: Block) -> None:
        with self._lock:
            block.refs += 1

    def release(self, block: Block) -> None:
        with self._lock:
            block.refs -= 1
            free = block.refs == 0
        if free:
            self._free.put(block)


class Cutter:
    """Cuts streams into chunks inside staging blocks (one cutter per thread).

    A stream starts with :meth:`begin`; :meth:`fill` appends its bytes at the block's end,
    and :meth:`cut` returns the spans of the chunks that are now final, keeping the last,
    possibly short, chunk to be cut again with the next bytes (``final`` cuts it too). When
    a block is full, the bytes not yet cut (at most one chunk) move to a fresh block; spans
    already returned stay valid as long as their holder retains the block.
    """

    def __init__(self, pool: StagingPool, cdc: pyfastcdc.FastCDC) -> None:
        self._pool = pool
        self._cdc = cdc
        self.block: Block | None = None
        self._start = 0

    @staticmethod
    def block_size(max_chunk: int) -> int:
        return _PIECES_PER_BLOCK * PIECE + max_chunk

    def begin(self) -> None:
        if self.block is None:
            self.block = self._pool.take()
        self._start = self.block.pos

    def _room(self, want: int) -> Block:
        block = self.block
        assert block is not None
        room = len(block.buf) - block.pos
        if room < want and room < PIECE // 2:
            fresh = self._pool.take()
            kept = block.pos - self._start
            fresh.view[:kept] = block.view[self._start : block.pos]
            fresh.pos = kept
            self._start = 0
            self.block = fresh
            self._pool.release(block)
            block = fresh
        return block

    def fill(self, f: BinaryIO, want: int) -> tuple[int, int]:
        """Read up to ``want`` bytes of ``f``: ``(bytes read, bytes asked)``; fewer read
        than asked means the end of the file."""
        block = self._room(want)
        asked = min(want, len(block.buf) - block.pos)
        n = read_full(f, block.view[block.pos : block.pos + asked])
        block.pos += n
        return n, asked

    def fill_from(self, data: memoryview) -> int:
        """Copy as much of ``data`` as fits (at most a piece); the bytes copied."""
        block = self._room(min(len(data), PIECE))
        n = min(len(data), PIECE, len(block.buf) - block.pos)
        block.view[block.pos : block.pos + n] = data[:n]
        block.pos += n
        return n

    def cut(self, *, final: bool) -> list[tuple[int, int]]:
        """``(offset, length)`` in :attr:`block` of each chunk now final."""
        block = self.block
        assert block is not None
        start = self._start
        if start == block.pos:
            return []
        spans = []
        last: Any = None
        for chunk in self._cdc.cut_buf(block.view[start : block.pos]):
            if last is not None:
                spans.append((start + last.offset, last.length))
            last = chunk
        if final:
            spans.append((start + last.offset, last.length))
            self._start = block.pos
        else:
            self._start = start + last.offset
        return spans

    def close(self) -> None:
        """Give the block back (spans other holders retain stay valid)."""
        if self.block is not None:
            self._pool.release(self.block)
            self.block = None


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
