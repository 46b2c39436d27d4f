"""Threads of a run: shared failure state, polling queue operations, the pack writer, and the
ordered fetcher restores and tree readers use.

Every blocking wait polls a shared :class:`Failure`, so when any thread fails the others stop
within a fraction of a second and the first error is the one reported.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from regionvault.core.errors import IntegrityError, ObjectNotFound
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex, Location
from regionvault.core.repository._store import Store
from regionvault.core.types import DataKey

__all__ = [
    "Aborted",
    "Failure",
    "Fetcher",
    "Marker",
    "PackWriter",
    "plan_reads",
    "qget",
    "qput",
    "read_blobs",
]

T = TypeVar("T")
_POLL = 0.05
#: a pack is also closed at this many blobs, which bounds its blob table (46 bytes each)
MAX_PACK_ENTRIES = 65536


class Aborted(Exception):
    """Another thread of the run failed; this one stops."""


class Failure:
    """The first error of a run, shared by its threads."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def set(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, Aborted):
                self.error = exc
            self._event.set()

    @property
    def failed(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Aborted

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def qput(q: queue.Queue[T], item: T, failure: Failure) -> None:
    while True:
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            failure.check()


def qget(q: queue.Queue[T], failure: Failure) -> T:
    while True:
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            failure.check()


def join(thread: threading.Thread) -> None:
    while thread.is_alive():
        thread.join(timeout=_POLL)


# --------------------------------------------------------------------------- pack writer


@dataclass
class _OpenPack:
    pack_id: str
    buf: mmap.mmap
    view: memoryview
    header: fmt.PackHeader
    key: _crypto.PackKey
    pos: int
    entries: list[fmt.BlobEntry] = field(default_factory=list)


class PackWriter:
    """Packs blobs, encrypting each straight into the pack buffer; full packs go to an
    uploader threads. ``upload_threads + 1`` pack buffers (anonymous mmaps, reused) bound its
    memory.

    ``add`` is thread-safe. The run's data key is generated on the first blob (one KeyService
    call per run), unless the caller hands one in with its ``run_id`` (a copy run's packs
    share one across writers), and its wrapped form goes into every pack header. An index object is
    written after every ``index_every_packs`` durable packs and by :meth:`close`.
    """

    def __init__(
        self,
        store: Store,
        failure: Failure,
        *,
        write_index: bool = True,
        keep_packs: bool = False,
        run_id: bytes | None = None,
        data_key: DataKey | None = None,
    ) -> None:
        self.store = store
        self.failure = failure
        self.run_id = os.urandom(16) if run_id is None else run_id
        self._target = store.settings.pack_size
        self._max_blob = store.config.chunker.max_size + fmt.GCM_TAG
        self._write_index = write_index
        self._index_every = max(1, store.settings.index_every_packs)
        self._mutex = threading.Lock()
        self._cur: _OpenPack | None = None
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._allocated = 0
        self._uploaders = max(1, store.settings.upload_threads)
        # one buffer fills while each uploader puts one: memory is (uploaders + 1) packs
        self._max_buffers = self._uploaders + 1
        self._uploads: queue.Queue[tuple[mmap.mmap, int, fmt.IndexPack] | None] = queue.Queue(
            self._uploaders
        )
        self._threads: list[threading.Thread] = []
        self._upload_lock = threading.Lock()
        self._data_key = data_key
        self._unindexed: list[fmt.IndexPack] = []
        self._closed = False
        self._keep_packs = keep_packs
        #: the packs this writer made durable (with ``keep_packs``), how many, their bytes,
        #: and the index objects that list them
        self.packs: list[fmt.IndexPack] = []
        self.packs_written = 0
        self.index_ids: list[str] = []
        self.bytes_written = 0

    # -- writing -------------------------------------------------------------------------

    def add(
        self,
        chunk_id: bytes,
        blob_type: int,
        flags: int,
        raw_length: int,
        payload: bytes | memoryview,
    ) -> None:
        self.add_many([(chunk_id, blob_type, flags, raw_length, payload)])

    def add_many(self, blobs: list[tuple[bytes, int, int, int, bytes | memoryview]]) -> None:
        """Add ``(chunk id, blob type, flags, raw length, payload)`` blobs."""
        with self._mutex:
            for chunk_id, blob_type, flags, raw_length, payload in blobs:
                n = len(payload) + fmt.GCM_TAG
                if n > self._max_blob:
                    raise ValueError(f"blob of {n} bytes is larger than the chunker allows")
                cur = self._cur if self._cur is not None else self._open()
                off = cur.pos
                cur.key.encrypt_blob_into(
                    cur.view[off : off + n], off, chunk_id, blob_type, flags, raw_length, payload
                )
                cur.pos = off + n
                cur.entries.append(fmt.BlobEntry(chunk_id, blob_type, flags, off, n, raw_length))
                if cur.pos >= self._target or len(cur.entries) >= MAX_PACK_ENTRIES:
                    self._finish()

    def _capacity(self, header_size: int) -> int:
        table = 4 + fmt.BLOB_ENTRY.size * MAX_PACK_ENTRIES + fmt.GCM_TAG
        return self._target + self._max_blob + header_size + table + fmt.PACK_FOOTER.size

    def _open(self) -> _OpenPack:
        if self._data_key is None:
            self._data_key = self.store.new_data_key(self.run_id)
        data_key = self._data_key
        salt = os.urandom(_crypto.SALT_SIZE)
        _, commitment = _crypto.derive(data_key.plaintext, salt)
        header = fmt.PackHeader.build(
            run_id=self.run_id, salt=salt, commitment=commitment, wrapped_key=data_key.wrapped
        )
        buf = self._take_buffer(self._capacity(header.size))
        view = memoryview(buf)
        view[: header.size] = header.raw
        pack_id = fmt.new_id()
        key = _crypto.PackKey.make(
            vault_id=self.store.vault_id,
            name=fmt.pack_name(pack_id),
            header=header,
            data_key=data_key.plaintext,
        )
        self._cur = _OpenPack(pack_id, buf, view, header, key, header.size)
        return self._cur

    def _take_buffer(self, capacity: int) -> mmap.mmap:
        while True:
            try:
                buf = self._free.get_nowait()
            except queue.Empty:
                if self._allocated < self._max_buffers:
                    self._allocated += 1
                    return mmap.mmap(-1, capacity)
                buf = qget(self._free, self.failure)
            if len(buf) >= capacity:
                return buf
            self._allocated -= 1  # too small for this header: drop it, make a new one

    def _finish(self) -> None:
        cur = self._cur
        assert cur is not None
        self._cur = None
        table = fmt.encode_blob_table(cur.entries)
        sealed = cur.key.encrypt_table(cur.pos, table)
        end = cur.pos + len(sealed)
        cur.view[cur.pos : end] = sealed
        cur.view[end : end + fmt.PACK_FOOTER.size] = fmt.PACK_FOOTER.pack(
            len(sealed), fmt.PACK_END_MAGIC
        )
        size = end + fmt.PACK_FOOTER.size
        cur.view.release()
        pack = fmt.IndexPack(cur.pack_id, size, cur.header.raw, cur.entries)
        if not self._threads:
            self._threads = [
                threading.Thread(
                    target=self._upload_loop, name=f"regionvault-pack-upload-{i}", daemon=True
                )
                for i in range(self._uploaders)
            ]
            for thread in self._threads:
                thread.start()
        qput(self._uploads, (cur.buf, size, pack), self.failure)

    def _upload_loop(self) -> None:
        try:
            while True:
                item = qget(self._uploads, self.failure)
                if item is None:
                    return
                buf, size, pack = item
                with memoryview(buf) as view:
                    self.store.vault.put(fmt.pack_name(pack.pack_id), view[:size])
                self._free.put(buf)
                with self._upload_lock:
                    if self._keep_packs:
                        self.packs.append(pack)
                    self.packs_written += 1
                    self.bytes_written += size
                    if not self._write_index:
                        continue
                    # an index object lists only packs already durable
                    self._unindexed.append(pack)
                    if len(self._unindexed) >= self._index_every:
                        batch, self._unindexed = self._unindexed, []
                        self.index_ids.append(self.store.write_index(batch))
        except BaseException as exc:  # reported through the run's Failure
            self.failure.set(exc)

    # -- ending --------------------------------------------------------------------------

    def close(self) -> list[fmt.IndexPack]:
        """Write the last pack, wait until every pack is durable, index the rest. Returns
        the packs written when made with ``keep_packs``."""
        with self._mutex:
            if self._closed:
                return self.packs
            self._closed = True
            if self._cur is not None:
                if self._cur.entries:
                    self._finish()
                else:
                    self._cur.view.release()
                    self._cur = None
        for _ in self._threads:
            qput(self._uploads, None, self.failure)
        for thread in self._threads:
            join(thread)
        self.failure.check()
        if self._unindexed:
            self.index_ids.append(self.store.write_index(self._unindexed))
            self._unindexed = []
        return self.packs

    def abort(self) -> None:
        """Stop after a failure (the run's Failure is set): let the uploader end."""
        with self._mutex:
            self._closed = True
            if self._cur is not None:
                self._cur.view.release()
                self._cur = None
        for thread in self._threads:
            join(thread)


# --------------------------------------------------------------------------- reading


def plan_reads(
    wanted: dict[bytes, Location], *, gap: int, max_read: int
) -> Iterator[tuple[str, int, int, list[tuple[bytes, Location]]]]:
    """Ranged gets that fetch ``wanted`` chunks: ``(pack id, start, end, blobs)``, blobs of
    one pack merged when the gap between them is at most ``gap`` bytes and the whole read at
    most ``max_read`` bytes."""
    by_pack: dict[str, list[tuple[bytes, Location]]] = {}
    for chunk_id, loc in wanted.items():
        by_pack.setdefault(loc.pack_id, []).append((chunk_id, loc))
    for pack_id, blobs in by_pack.items():
        blobs.sort(key=lambda item: item[1].offset)
        start = end = 0
        run: list[tuple[bytes, Location]] = []
        for chunk_id, loc in blobs:
            blob_end = loc.offset + loc.length
            if run and (loc.offset - end > gap or blob_end - start > max_read):
                yield pack_id, start, end, run
                run = []
            if run:
                end = max(end, blob_end)
            else:
                start, end = loc.offset, blob_end
            run.append((chunk_id, loc))
        if run:
            yield pack_id, start, end, run


def read_blobs(
    store: Store, index: ChunkIndex, pack_id: str, start: int, end: int,
    blobs: list[tuple[bytes, Location]], *, stored: bool = False,
) -> Iterator[tuple[bytes, bytes]]:  # fmt: skip
    """``(chunk id, verified chunk)`` of ``blobs``, read from the pack with one ranged get;
    with ``stored``, the blob's stored payload (still compressed where it was) instead of the
    chunk, verified all the same."""
    name = fmt.pack_name(pack_id)
    info = index.packs[pack_id]
    try:
        data = store.vault.get(name, offset=start, length=end - start)
    except ObjectNotFound:
        raise IntegrityError(name, "pack is missing, yet an index lists it") from None
    if len(data) != end - start:
        raise IntegrityError(name, "pack is shorter than its index says")
    key = store.pack_key(pack_id, info.header)
    with memoryview(data) as view:
        for chunk_id, loc in blobs:
            rel = loc.offset - start
            payload, chunk = store.open_blob(
                key, chunk_id, loc.blob_type, loc.flags, loc.offset, loc.raw_length,
                view[rel : rel + loc.length],
            )  # fmt: skip
            yield chunk_id, payload if stored else chunk


# --------------------------------------------------------------------------- fetcher


@dataclass(frozen=True, slots=True)
class Marker:
    """Passes through a :class:`Fetcher` stream in order, between chunks."""

    value: Any


_Window = tuple[list[Any], list["Future[dict[bytes, bytes]]"]]


class Fetcher:
    """Turns a stream of chunk ids (and markers) into the chunks' verified bytes, in order.

    Items are taken in windows of about ``window_bytes``; each window's chunks are grouped by
    pack, adjacent blobs merged into ranged gets (gaps up to ``gap`` bytes are read through,
    a get is at most ``max_read`` bytes), and the gets run on ``pool`` while earlier windows
    are consumed. Every chunk is authenticated, decompressed and checked against its id
    before it is yielded.
    """

    def __init__(
        self,
        store: Store,
        index: ChunkIndex,
        pool: Executor,
        *,
        what: str,
        window_bytes: int = 16 << 20,
        ahead: int = 3,
        gap: int = 256 << 10,
        max_read: int = 8 << 20,
    ) -> None:
        self.store = store
        self.index = index
        self.pool = pool
        self.what = what
        self.window_bytes = window_bytes
        self.ahead = max(1, ahead)
        self.gap = gap
        self.max_read = max_read
        self.bytes_read = 0
        self._lock = threading.Lock()

    def stream(self, items: Iterable[bytes | Marker]) -> Iterator[tuple[bytes, bytes] | Marker]:
        windows = self._windows(iter(items))
        pending: deque[_Window] = deque()
        try:
            while True:
                while len(pending) < self.ahead:
                    window = next(windows, None)
                    if window is None:
                        break
                    pending.append((window, self._submit(window)))
                if not pending:
                    return
                window, futures = pending.popleft()
                found: dict[bytes, bytes] = {}
                for future in futures:
                    found.update(future.result())
                # a chunk is let go at its last use, so a window drains as it is consumed
                last = {item[0]: i for i, item in enumerate(window) if not isinstance(item, Marker)}
                for i, item in enumerate(window):
                    if isinstance(item, Marker):
                        yield item
                    elif last[item[0]] == i:
                        yield item[0], found.pop(item[0])
                    else:
                        yield item[0], found[item[0]]
                del found, window
        finally:
            for _, futures in pending:
                for future in futures:
                    future.cancel()

    def chunks(self, ids: Iterable[bytes]) -> Iterator[bytes]:
        for item in self.stream(ids):
            assert not isinstance(item, Marker)
            yield item[1]

    def _windows(self, items: Iterator[bytes | Marker]) -> Iterator[list[Any]]:
        window: list[Any] = []
        size = 0
        for item in items:
            if isinstance(item, Marker):
                window.append(item)
                size += 512
            else:
                loc = self.index.get(item)
                if loc is None:
                    raise self.index.missing(item, self.what)
                window.append((item, loc))
                size += loc.raw_length
            if size >= self.window_bytes or len(window) >= 16384:
                yield window
                window, size = [], 0
        if window:
            yield window

    def _submit(self, window: list[Any]) -> list[Future[dict[bytes, bytes]]]:
        wanted = {item[0]: item[1] for item in window if not isinstance(item, Marker)}
        return [
            self.pool.submit(self._read, pack_id, start, end, run)
            for pack_id, start, end, run in plan_reads(wanted, gap=self.gap, max_read=self.max_read)
        ]

    def _read(
        self, pack_id: str, start: int, end: int, blobs: list[tuple[bytes, Location]]
    ) -> dict[bytes, bytes]:
        with self._lock:
            self.bytes_read += end - start
        return dict(read_blobs(self.store, self.index, pack_id, start, end, blobs))
