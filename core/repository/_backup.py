"""The backup pipeline.

    reader (calling thread)              workers (N threads)             uploader thread
    read 8 MiB -> FastCDC -> BLAKE3 id   zstd each chunk, then           vault.put(pack);
    new chunks copied into 1 MiB    -->  AES-GCM it straight into   -->  an index object
    batches; tree records -> tree        the open pack buffer            every K packs
    chunks (same path)

The reader owns every decision (dedup, file skipping, tree order), so the workers only
transform bytes. Read buffers are reused (chunks leave them by copy, only when new), the
batch queue and the two pack buffers are bounded, so memory stays constant however much data
flows. Every blocking wait polls the run's Failure: one failing thread stops them all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from itertools import islice

import blake3
from regionvault.core.errors import ComputeError
from regionvault.core.interfaces import BlockCapture, Capture, FileCapture
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import READ_BLOCK, ReadBuffers, Rechunker, chunk_file
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._pipeline import Aborted, Failure, PackWriter, qget, qput
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import KIND_TAGS, TreeWriter, encode_path, path_problem
from regionvault.core.repository.model import Progress, ProgressCallback
from regionvault.core.types import FileEntry, FileKind

__all__ = ["BackupResult", "BackupRun", "ParentLookup"]

#: a block-image extent record is closed at this length (bounds its chunk list in memory)
MAX_EXTENT = 1 << 30
#: entries looked at ahead of time to learn the totals for progress reports
_LOOKAHEAD = 100_000
#: files read ahead of the one the tree waits for
_MAX_PENDING = 64
_PROGRESS_EVERY = 0.2


class ParentLookup:
    """Finds the parent recovery point's record of a path, reading the parent's tree
    alongside the new one. Both come in capture order, so a window of read-ahead records
    (bounded in count and bytes, oldest dropped first) finds nearly every unchanged file
    without holding the parent's whole tree."""

    def __init__(
        self, records: Iterator[fmt.RawRecord], *, window: int = 50_000, max_bytes: int = 32 << 20
    ) -> None:
        self._records = records
        self._window = window
        self._max_bytes = max_bytes
        self._bytes = 0
        self._pending: OrderedDict[bytes, fmt.RawRecord] = OrderedDict()
        self._exhausted = False

    def _take(self, path: bytes) -> fmt.RawRecord | None:
        found = self._pending.pop(path, None)
        if found is not None:
            self._bytes -= len(found.ids) + len(found.path)
        return found

    def find(self, path: bytes) -> fmt.RawRecord | None:
        found = self._take(path)
        if found is not None or self._exhausted:
            return found
        for read, record in enumerate(self._records, 1):
            if record.tag == fmt.TAG_FILE:
                if record.path == path:
                    return record
                self._pending[record.path] = record
                self._bytes += len(record.ids) + len(record.path)
                while len(self._pending) > self._window or self._bytes > self._max_bytes:
                    _, dropped = self._pending.popitem(last=False)
                    self._bytes -= len(dropped.ids) + len(dropped.path)
            if read >= self._window:
                return None  # a new file, most likely; the window keeps what was read
        self._exhausted = True
        return None


@dataclass
class BackupResult:
    tree_chunks: list[bytes]
    tree_bytes: int
    entries: int
    size: int
    stats: dict[str, int] = field(default_factory=dict)


class _Batch:
    """New chunks on their way to a worker, copied out of the read buffers into one
    buffer (so read buffers are reused at once and memory is bounded by the queue)."""

    __slots__ = ("buf", "items")

    def __init__(self) -> None:
        self.buf = bytearray()
        #: chunk id, blob type, start in ``buf``, length
        self.items: list[tuple[bytes, int, int, int]] = []


#: a batch is handed to the workers once it holds this many bytes
_BATCH_BYTES = 1 << 20


class BackupRun:
    """One backup's data flow: call :meth:`run` once.

    Files are read by ``settings.read_threads`` reader threads at once (the calling thread
    keeps the tree in capture order); ``FileCapture.open`` is called by one thread at a
    time, and the files it returns are read concurrently.
    """

    def __init__(
        self, store: Store, index: ChunkIndex, *, progress: ProgressCallback | None = None
    ) -> None:
        self.store = store
        self.index = index
        self.settings = store.settings
        self.failure = Failure()
        self.workers = self.settings.worker_count()
        self.readers = max(1, self.settings.read_threads)
        self._jobs = _BoundedJobs(self.workers * 4, self.failure)
        self.writer = PackWriter(store, self.failure)
        self._key = store.config.chunk_id_key
        #: guards the dedup set, the open batch and the counters (reader threads share them)
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._local = threading.local()
        self._new: set[bytes] = set()
        self._batch = _Batch()
        self._progress = progress
        self._last_report = 0.0
        self.files_done = 0
        self.files_total: int | None = None
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.chunks = 0
        self.stats = {
            "files": 0,
            "dirs": 0,
            "symlinks": 0,
            "files_unchanged": 0,
            "chunks": 0,
            "chunks_new": 0,
            "bytes_new": 0,
        }

    # -- reader side -----------------------------------------------------------------------

    def _submit(self, chunk: memoryview, blob_type: int, *, progress: bool = False) -> bytes:
        """Id a chunk; copy it into the open batch if the repository lacks it. Any reader
        thread may call this."""
        chunk_id: bytes = blake3.blake3(chunk, key=self._key).digest()
        full = None
        with self._lock:
            self.chunks += 1
            if progress:
                self.bytes_done += len(chunk)
            if chunk_id not in self.index and chunk_id not in self._new:
                self._new.add(chunk_id)
                batch = self._batch
                start = len(batch.buf)
                batch.buf += chunk
                batch.items.append((chunk_id, blob_type, start, len(chunk)))
                if len(batch.buf) >= _BATCH_BYTES:
                    full = self._take_batch()
        if full is not None:
            self._jobs.put(full)
        return chunk_id

    def _take_batch(self) -> _Batch | None:
        batch = self._batch
        if not batch.items:
            return None
        self.stats["chunks_new"] += len(batch.items)
        self.stats["bytes_new"] += len(batch.buf)
        self._batch = _Batch()
        return batch

    def _flush_batch(self) -> None:
        with self._lock:
            batch = self._take_batch()
        if batch is not None:
            self._jobs.put(batch)

    def _report(self, *, done: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if not done and now - self._last_report < _PROGRESS_EVERY:
            return
        self._last_report = now
        self._progress(
            Progress(
                operation="backup",
                files_done=self.files_done,
                files_total=self.files_total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                bytes_written=self.writer.bytes_written,
                done=done,
            )
        )

    def _entries(self, capture: FileCapture) -> Iterator[FileEntry]:
        it = capture.entries()
        head = list(islice(it, _LOOKAHEAD))
        if len(head) < _LOOKAHEAD:
            self.files_total = sum(1 for e in head if e.kind is FileKind.FILE)
            self.bytes_total = sum(e.size for e in head if e.kind is FileKind.FILE)
        yield from head
        del head
        yield from it

    def _read_file(self, capture: FileCapture, entry: FileEntry) -> tuple[bytes, int]:
        """A file's chunk ids and size (runs on a reader thread)."""
        tools = getattr(self._local, "tools", None)
        if tools is None:
            buffers = ReadBuffers(READ_BLOCK, self.store.config.chunker.max_size)
            tools = self._local.tools = (self.store.new_chunker(), buffers)
        cdc, buffers = tools
        parts: list[bytes] = []
        size = 0
        with self._open_lock:
            f = capture.open(entry)
        with f:
            for chunk in chunk_file(f, cdc, buffers, size_hint=entry.size):
                parts.append(self._submit(chunk, fmt.BlobType.DATA, progress=True))
                size += len(chunk)
        return b"".join(parts), size

    def _files(self, capture: FileCapture, tree: TreeWriter, parent: ParentLookup | None) -> int:
        label = capture.instance.id
        # records in capture order: ready bytes, or a file being read on a reader thread
        pending: deque[bytes | tuple[FileEntry, bytes, Future[tuple[bytes, int]]]] = deque()
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="regionvault-read")
        total = 0

        def drain(limit: int) -> None:
            nonlocal total
            while pending:
                head = pending[0]
                if isinstance(head, bytes):
                    pending.popleft()
                    tree.add(head)
                    continue
                entry, path, future = head
                if not future.done() and len(pending) <= limit:
                    return
                try:
                    ids, size = future.result(timeout=_PROGRESS_EVERY)
                except FutureTimeout:
                    self._report()
                    continue
                pending.popleft()
                total += size
                tree.add(fmt.encode_entry(
                    fmt.TAG_FILE, entry.mode, entry.mtime_ns, size, path, b"", ids
                ))  # fmt: skip
                self.files_done += 1
                self._report()

        try:
            for entry in self._entries(capture):
                problem = path_problem(entry.path)
                if problem is not None:
                    raise ComputeError(f"capture of {label}: entry path {entry.path!r} {problem}")
                path = encode_path(entry.path)
                tag = KIND_TAGS[FileKind(entry.kind)]
                if entry.kind is FileKind.DIR:
                    self.stats["dirs"] += 1
                    pending.append(
                        fmt.encode_entry(tag, entry.mode, entry.mtime_ns, 0, path, b"", b"")
                    )
                elif entry.kind is FileKind.SYMLINK:
                    if entry.target is None:
                        raise ComputeError(
                            f"capture of {label}: symlink {entry.path!r} has no target"
                        )
                    self.stats["symlinks"] += 1
                    target = encode_path(entry.target)
                    pending.append(
                        fmt.encode_entry(tag, entry.mode, entry.mtime_ns, 0, path, target, b"")
                    )
                else:
                    self.stats["files"] += 1
                    before = parent.find(path) if parent is not None else None
                    if before is not None and self._unchanged(before, entry):
                        self.stats["files_unchanged"] += 1
                        with self._lock:
                            self.bytes_done += before.size
                        total += before.size
                        self.files_done += 1
                        pending.append(fmt.encode_entry(
                            tag, entry.mode, entry.mtime_ns, before.size, path, b"", before.ids
                        ))  # fmt: skip
                    else:
                        future = pool.submit(self._read_file, capture, entry)
                        pending.append((entry, path, future))
                drain(_MAX_PENDING)
            drain(0)
        except BaseException:
            for item in pending:
                if not isinstance(item, bytes):
                    item[2].cancel()
            self.failure.set(Aborted())
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return total

    def _unchanged(self, before: fmt.RawRecord, entry: FileEntry) -> bool:
        if (before.size, before.mtime_ns, before.mode) != (entry.size, entry.mtime_ns, entry.mode):
            return False
        index, new = self.index, self._new
        return all(chunk_id in index or chunk_id in new for chunk_id in before.chunk_ids())

    def _blocks(self, capture: BlockCapture, tree: TreeWriter) -> int:
        label = capture.instance.id
        self.bytes_total = capture.size
        rechunker: Rechunker | None = None
        end = 0
        ext_start = ext_len = 0
        ids: list[bytes] = []

        def take(chunks: Iterator[memoryview]) -> None:
            nonlocal ext_start, ext_len, ids
            for chunk in chunks:
                ids.append(self._submit(chunk, fmt.BlobType.DATA))
                ext_len += len(chunk)
                if ext_len >= MAX_EXTENT:
                    tree.add(fmt.encode_extent(ext_start, ext_len, b"".join(ids)))
                    ext_start, ext_len, ids = ext_start + ext_len, 0, []

        def close() -> None:
            nonlocal ext_len, ids
            if rechunker is not None:
                take(rechunker.finish())
            if ext_len:
                tree.add(fmt.encode_extent(ext_start, ext_len, b"".join(ids)))
            ext_len, ids = 0, []

        for offset, data in capture.blocks():
            if offset < end or offset < 0 or offset + len(data) > capture.size:
                raise ComputeError(
                    f"capture of {label}: block at offset {offset} ({len(data)} bytes) overlaps "
                    f"the previous one or lies outside the {capture.size}-byte image"
                )
            if not data:
                continue
            if offset != end or rechunker is None:
                close()
                rechunker = Rechunker(self.store.new_chunker())
                ext_start = offset
            take(rechunker.feed(data))
            end = offset + len(data)
            self.bytes_done = end
            self._report()
        close()
        return capture.size

    # -- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        level = self.settings.compression_level
        try:
            while True:
                batch = self._jobs.get()
                if batch is None:
                    return
                view = memoryview(batch.buf)
                blobs = []
                for chunk_id, blob_type, start, length in batch.items:
                    data = view[start : start + length]
                    payload: bytes | memoryview = data
                    flags = 0
                    if level > 0:
                        packed = _crypto.compress(data, level)
                        if len(packed) < length:
                            payload, flags = packed, fmt.FLAG_ZSTD
                    blobs.append((chunk_id, blob_type, flags, length, payload))
                self.writer.add_many(blobs)
        except Aborted:
            return
        except BaseException as exc:  # reported through the run's Failure
            self.failure.set(exc)

    # -- the run ---------------------------------------------------------------------------

    def run(self, capture: Capture, parent: ParentLookup | None) -> BackupResult:
        threads = [
            threading.Thread(target=self._work, name=f"regionvault-backup-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        try:
            tree = TreeWriter(
                Rechunker(self.store.new_chunker(), threshold=1 << 20),
                lambda chunk: self._submit(chunk, fmt.BlobType.TREE),
            )
            if isinstance(capture, FileCapture):
                size = self._files(capture, tree, parent)
            elif isinstance(capture, BlockCapture):
                size = self._blocks(capture, tree)
            else:
                raise TypeError(f"cannot back up a {type(capture).__name__}")
            tree_ids = tree.finish()
            self._flush_batch()
            for _ in threads:
                self._jobs.put(None)
            for t in threads:
                while t.is_alive():
                    t.join(0.05)
            self.failure.check()
            self.writer.close()
        except BaseException as exc:
            self.failure.set(exc)
            for t in threads:
                t.join()
            self.writer.abort()
            if isinstance(exc, Aborted) and self.failure.error is not None:
                raise self.failure.error from None
            raise
        self._report(done=True)
        self.stats["chunks"] = self.chunks
        self.stats["bytes_stored"] = self.writer.bytes_written
        self.stats["packs"] = self.writer.packs_written
        return BackupResult(tree_ids, tree.bytes, tree.entries, size, dict(self.stats))


class _BoundedJobs:
    """The reader-to-workers queue of batches; waits poll the run's Failure."""

    def __init__(self, size: int, failure: Failure) -> None:
        import queue

        self._q: queue.Queue[_Batch | None] = queue.Queue(size)
        self._failure = failure

    def put(self, item: _Batch | None) -> None:
        qput(self._q, item, self._failure)

    def get(self) -> _Batch | None:
        return qget(self._q, self._failure)
