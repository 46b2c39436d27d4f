"""Restore: a recovery point's tree is streamed in order and planned in batches; the pool
fetches each batch's chunks with ranged gets grouped by pack, verifies them, and writes them
into the files at their offsets, in parallel (see :class:`ParallelWriter`).

Into a new or empty directory, the whole tree is restored inside a hidden staging directory
in it, its entries moved to their names once every file is complete, and the staging
directory removed on failure; into a directory that already holds something, each file is
written under a temporary name and renamed into place once complete. Either way nothing
unverified ever appears under a restored name.

Directories are created as met (owner-only until the end), symlinks are made after every
file (so no restored file is written through a restored link) and directory metadata is
applied last, deepest first. A block image goes to a file the same way, or in order through
a :class:`~regionvault.core.repository._pipeline.Fetcher` to a :class:`BlockSink`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from pathlib import Path

from regionvault.core.errors import IntegrityError, RegionVaultError
from regionvault.core.interfaces import BlockSink
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex, Location
from regionvault.core.repository._pipeline import Fetcher, Marker, plan_reads, read_blobs
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import decode_path, path_problem
from regionvault.core.repository.model import Progress, ProgressCallback

__all__ = ["BlockRestorer", "FileRestorer", "ParallelWriter", "Reporter", "Selection"]

TEMP_PREFIX = ".rv-tmp-"
_PROGRESS_EVERY = 0.2
#: a BlockSink gets writes of about this size
_SINK_WRITE = 4 << 20
#: consecutive chunks of one file are written with one call, up to this many bytes ...
_COALESCE_BYTES = 2 << 20
#: ... or this many pieces (well below IOV_MAX)
_COALESCE_PIECES = 512
#: writes queued for a file beyond this many bytes wait for its writer (bounds memory)
_QUEUE_BYTES = 8 << 20
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Selection:
    """Which tree paths a restore takes: the given paths, everything under them, and the
    directories above them."""

    def __init__(self, paths: Iterable[str]) -> None:
        cleaned = []
        for path in paths:
            p = path.strip("/")
            problem = path_problem(p)
            if problem is not None:
                raise RegionVaultError(f"restore path {path!r} {problem}")
            cleaned.append(p)
        self.paths = sorted(set(cleaned))
        self._ancestors = {
            "/".join(p.split("/")[:i]) for p in self.paths for i in range(1, p.count("/") + 1)
        }
        self.matched: set[str] = set()

    def __contains__(self, path: str) -> bool:
        for sel in self.paths:
            if path == sel or path.startswith(sel + "/"):
                self.matched.add(sel)
                return True
        return path in self._ancestors

    def ancestor(self, path: str) -> bool:
        return path in self._ancestors


class Reporter:
    def __init__(self, callback: ProgressCallback | None, files: int | None, size: int | None):
        self.callback = callback
        self.files_total = files
        self.bytes_total = size
        self.files_done = 0
        self.bytes_done = 0
        self._last = 0.0

    def tick(self, *, done: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not done and now - self._last < _PROGRESS_EVERY:
            return
        self._last = now
        self.callback(
            Progress(
                operation="restore",
                files_done=self.files_done,
                files_total=self.files_total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                done=done,
            )
        )


class _Target:
    """A file being restored at ``path``: created by the first thread that needs it (file
    creation is slow on many filesystems, so it runs in parallel too). With ``final`` set,
    ``path`` is a temporary name renamed to ``final`` once the file is complete.

    One thread writes a file at a time (the kernel serializes writes to one file anyway, and
    a thread waiting for that only spins): a thread that finds the file busy queues its
    writes, and the writing thread does them before it lets go, so no thread waits unless
    the queue is full."""

    __slots__ = (
        "fd", "final", "hole", "lock", "mode", "mtime_ns", "path", "pending", "planned",
        "queue", "queued", "size", "writing",
    )  # fmt: skip

    def __init__(
        self, path: str, final: str | None, size: int, mode: int | None, mtime_ns: int | None
    ) -> None:
        self.path = path
        self.final = final
        self.size = size
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.fd = -1
        self.lock = threading.Condition(threading.Lock())
        #: chunk writes handed to the pool and not yet done, plus one while the planner
        #: still adds to it
        self.pending = 1
        #: chunk writes planned but not yet counted in ``pending`` (planner thread only)
        self.planned = 0
        #: a zero chunk was left as a hole (the file's length must then be set)
        self.hole = False
        #: a thread is writing the file; writes queued for it: (pieces, offset, chunks)
        self.writing = False
        self.queue: deque[tuple[list[bytes], int, int]] = deque()
        self.queued = 0


class ParallelWriter:
    """Writes chunks into files at known offsets from several threads at once.

    The planner (the calling thread) creates targets and adds ``(chunk id, offset)`` to
    them; every ``batch_bytes`` the planned chunks are grouped into ranged gets that run on
    the pool, each task decrypting and verifying its chunks and writing them (zero chunks
    are left as holes, consecutive chunks of a file go out in one call) into every target
    that needs them. The thread that makes a target's last write finishes it: length, mode
    and mtime set, then (for a temporary name) renamed into place. At most ``ahead``
    batches are in flight; a failure stops the rest, closes every unfinished file and
    removes the temporary ones (a staging directory is its :class:`FileRestorer`'s to
    remove), so no unverified byte ever appears under a restored name.
    """

    def __init__(
        self,
        store: Store,
        index: ChunkIndex,
        pool: Executor,
        *,
        what: str,
        zero: bytes,
        report: Reporter,
        batch_bytes: int,
        ahead: int,
        max_read: int,
        gap: int = 256 << 10,
    ) -> None:
        self.store = store
        self.index = index
        self.pool = pool
        self.what = what
        self._zero = zero
        self.report = report
        self._batch_bytes = batch_bytes
        self._ahead = max(1, ahead)
        self._max_read = max_read
        self._gap = gap
        self._lock = threading.Lock()
        self._plan: dict[bytes, tuple[Location, list[tuple[_Target, int]]]] = {}
        self._planned = 0
        self._touched: list[_Target] = []
        self._inflight: deque[list[Future[None]]] = deque()
        self._open: set[_Target] = set()
        self._failed = False
        self.bytes_read = 0

    # -- planning (calling thread) -------------------------------------------------------

    def target(
        self, path: str, final: str | None, size: int, mode: int | None = None,
        mtime_ns: int | None = None,
    ) -> _Target:  # fmt: skip
        """A file to restore at ``path`` (renamed to ``final`` once complete, if given)."""
        return _Target(path, final, size, mode, mtime_ns)

    def add(self, target: _Target, chunk_id: bytes, offset: int) -> int:
        """Plan writing chunk ``chunk_id`` at ``offset`` of ``target``; its length."""
        planned = self._plan.get(chunk_id)
        if planned is None:
            loc = self.index.get(chunk_id)
            if loc is None:
                raise self.index.missing(chunk_id, self.what)
            planned = self._plan[chunk_id] = (loc, [])
            self._planned += loc.raw_length
        if not target.planned:
            self._touched.append(target)
        target.planned += 1
        planned[1].append((target, offset))
        if self._planned >= self._batch_bytes:
            self.flush()
        return planned[0].raw_length

    def release(self, target: _Target) -> None:
        """The planner is done with ``target``: it finishes once its writes are done (one
        without chunks, such as an empty file, is finished by the pool)."""
        with self._lock:
            target.pending += target.planned - 1
            target.planned = 0
            last = target.pending == 0
        if last:
            future = self.pool.submit(self._finish, target)
            if self._inflight:
                self._inflight[-1].append(future)
            else:
                self._inflight.append([future])

    def flush(self) -> None:
        plan, self._plan, self._planned = self._plan, {}, 0
        if not plan:
            return
        with self._lock:  # count the planned writes before any of them can run
            for target in self._touched:
                target.pending += target.planned
                target.planned = 0
        self._touched = []
        wanted = {chunk_id: loc for chunk_id, (loc, _) in plan.items()}
        futures = [
            self.pool.submit(self._task, pack_id, start, end, run, plan)
            for pack_id, start, end, run in plan_reads(
                wanted, gap=self._gap, max_read=self._max_read
            )
        ]
        self._inflight.append(futures)
        while len(self._inflight) > self._ahead:
            self._wait(self._inflight[0])  # on failure it stays, for abort() to wait on
            self._inflight.popleft()

    def _wait(self, futures: list[Future[None]]) -> None:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_PROGRESS_EVERY, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
            self.report.tick()

    def close(self) -> None:
        """Run what is planned and wait for every write and finish."""
        self.flush()
        while self._inflight:
            self._wait(self._inflight[0])
            self._inflight.popleft()

    def abort(self) -> None:
        """After a failure: stop queued work, wait for running work, close every file and
        remove every temporary one."""
        self._failed = True
        for futures in self._inflight:
            for future in futures:
                future.cancel()
        for futures in self._inflight:
            wait(futures)
        self._inflight.clear()
        with self._lock:
            targets, self._open = self._open, set()
        for target in targets:
            with contextlib.suppress(OSError):
                os.close(target.fd)
            if target.final is not None:
                with contextlib.suppress(OSError):
                    Path(target.path).unlink()

    # -- work (pool threads) ---------------------------------------------------------------

    def _task(
        self,
        pack_id: str,
        start: int,
        end: int,
        run: list[tuple[bytes, Location]],
        plan: dict[bytes, tuple[Location, list[tuple[_Target, int]]]],
    ) -> None:
        if self._failed:
            return
        zero = self._zero
        holes: dict[_Target, int] = {}
        nbytes = 0
        # a run of consecutive chunks of one file, written with one call
        seq: _Target | None = None
        seq_start = seq_end = count = 0
        pieces: list[bytes] = []
        for chunk_id, data in read_blobs(self.store, self.index, pack_id, start, end, run):
            targets = plan[chunk_id][1]
            n = len(data)
            nbytes += n * len(targets)
            hole = n <= len(zero) and zero.startswith(data)
            for target, offset in targets:
                if hole:
                    target.hole = True
                    holes[target] = holes.get(target, 0) + 1
                    continue
                if (
                    target is seq
                    and offset == seq_end
                    and len(pieces) < _COALESCE_PIECES
                    and seq_end - seq_start < _COALESCE_BYTES
                ):
                    pieces.append(data)
                    seq_end += n
                    count += 1
                    continue
                if seq is not None:
                    self._write(seq, pieces, seq_start, count)
                seq, seq_start, seq_end, pieces, count = target, offset, offset + n, [data], 1
        if seq is not None:
            self._write(seq, pieces, seq_start, count)
        del pieces
        finished = []
        with self._lock:
            self.bytes_read += end - start
            self.report.bytes_done += nbytes
            for target, skipped in holes.items():
                target.pending -= skipped
                if target.pending == 0:
                    finished.append(target)
        for target in finished:
            self._finish(target)

    def _write(self, target: _Target, pieces: list[bytes], offset: int, chunks: int) -> None:
        """Write ``pieces`` (``chunks`` planned writes) at ``offset``, or queue them for the
        thread writing the file now."""
        total = sum(len(p) for p in pieces)
        with target.lock:
            while target.writing and target.queued >= _QUEUE_BYTES:
                if self._failed:
                    return  # the restore is being aborted: its files are removed anyway
                target.lock.wait(_PROGRESS_EVERY)
            if target.writing:
                target.queue.append((pieces, offset, chunks))
                target.queued += total
                return
            target.writing = True
        try:
            while True:
                fd = target.fd if target.fd >= 0 else self._create(target)
                written = os.pwritev(fd, pieces, offset)
                if written < total:  # a short write: finish it piece by piece
                    data = memoryview(b"".join(pieces))
                    while written < total:
                        written += os.pwrite(fd, data[written:], offset + written)
                with self._lock:
                    target.pending -= chunks
                    last = target.pending == 0
                if last:
                    self._finish(target)
                with target.lock:
                    target.lock.notify_all()
                    if not target.queue:
                        target.writing = False
                        return
                    pieces, offset, chunks = target.queue.popleft()
                    total = sum(len(p) for p in pieces)
                    target.queued -= total
        except BaseException:
            with target.lock:  # let no thread wait for a writer that is gone
                target.writing = False
                target.queue.clear()
                target.queued = 0
                target.lock.notify_all()
            raise

    def _create(self, target: _Target) -> int:
        with target.lock:
            if target.fd < 0:
                with self._lock:  # registered first, so abort() can always clean it up
                    self._open.add(target)
                try:
                    target.fd = os.open(target.path, _CREATE_FLAGS, 0o600)
                except OSError as exc:
                    name = target.final if target.final is not None else target.path
                    raise RegionVaultError(f"cannot restore {name}: {exc.strerror}") from None
            return target.fd

    def _finish(self, target: _Target) -> None:
        if self._failed:
            return
        if target.fd < 0:
            self._create(target)
        try:
            if target.hole or target.mode is None:
                os.ftruncate(target.fd, target.size)  # trailing holes
            if target.mode is not None:
                os.fchmod(target.fd, stat.S_IMODE(target.mode))
            if target.mtime_ns is not None:
                os.utime(target.fd, ns=(target.mtime_ns, target.mtime_ns))
            if target.mode is None:
                os.fsync(target.fd)  # an image: durable before it is in place
        finally:
            with self._lock:
                self._open.discard(target)
            os.close(target.fd)
        if target.final is not None:
            tmp = Path(target.path)
            try:
                tmp.replace(target.final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise RegionVaultError(f"cannot restore {target.final}: {exc.strerror}") from None
        with self._lock:
            self.report.files_done += 1


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


class FileRestorer:
    """Restores a file tree into ``root`` (see the module docstring for how)."""

    def __init__(
        self,
        writer: ParallelWriter,
        root: Path,
        *,
        what: str,
    ) -> None:
        self.writer = writer
        self.root = root
        self.what = what
        #: where entries are made: a staging directory inside ``root``, or ``root`` itself
        self._base = str(root)
        self._staging: str | None = None
        self._dirs_ok: set[str] = {""}
        self._dir_meta: list[tuple[str, int, int]] = []
        self._symlinks: list[fmt.RawRecord] = []

    # -- paths ---------------------------------------------------------------------------

    def _ensure_dir(self, rel: str) -> str:
        """Make sure ``base/rel`` is a real directory (never through a symlink); its path."""
        if rel in self._dirs_ok:
            return f"{self._base}/{rel}" if rel else self._base
        probe = ""
        for part in rel.split("/"):
            probe = f"{probe}/{part}" if probe else part
            if probe in self._dirs_ok:
                continue
            p = Path(self._base, probe)
            try:
                p.mkdir(0o700)
            except FileExistsError:
                st = p.lstat()
                if not stat.S_ISDIR(st.st_mode):
                    raise RegionVaultError(
                        f"restore target {self.root / probe} exists and is not a directory; "
                        "restore into an empty directory"
                    ) from None
            self._dirs_ok.add(probe)
        return f"{self._base}/{rel}"

    def _entry_path(self, record: fmt.RawRecord) -> str:
        path = decode_path(record.path)
        problem = path_problem(path)
        if problem is not None:
            raise IntegrityError(self.what, f"tree entry path {path!r} {problem}")
        return path

    # -- the run -------------------------------------------------------------------------

    def _file(self, path: str, record: fmt.RawRecord) -> None:
        parent, _, name = path.rpartition("/")
        directory = self._ensure_dir(parent)
        final = f"{directory}/{name}"
        writer = self.writer
        if self._staging is not None:
            target = writer.target(final, None, record.size, record.mode, record.mtime_ns)
        else:
            tmp = f"{directory}/{TEMP_PREFIX}{secrets.token_hex(8)}"
            target = writer.target(tmp, final, record.size, record.mode, record.mtime_ns)
        offset = 0
        for chunk_id in record.chunk_ids():
            offset += writer.add(target, chunk_id, offset)
        if offset != record.size:
            raise IntegrityError(
                self.what,
                f"file {path!r}: its chunks hold {offset} bytes, its entry says {record.size}",
            )
        writer.release(target)

    def _begin(self) -> None:
        """Restore into a staging directory when ``root`` is new or empty."""
        existed = self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if existed and not _is_empty_dir(self.root):
            return
        staging = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        staging.mkdir(0o700)
        self._staging = self._base = str(staging)

    def _publish(self) -> None:
        """Move every entry of the staging directory to its name in ``root``."""
        assert self._staging is not None
        staging = Path(self._staging)
        for entry in sorted(staging.iterdir()):
            try:
                entry.rename(self.root / entry.name)
            except OSError as exc:
                raise RegionVaultError(
                    f"cannot restore {self.root / entry.name}: {exc.strerror}"
                ) from None
        staging.rmdir()
        self._staging = None
        self._base = str(self.root)

    def run(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        self._begin()
        try:
            try:
                for record in records:
                    if record.tag == fmt.TAG_EXTENT:
                        raise IntegrityError(self.what, "file tree holds a block extent")
                    path = self._entry_path(record)
                    if selection is not None:
                        if path not in selection:
                            continue
                        if record.tag != fmt.TAG_DIR and selection.ancestor(path):
                            continue
                    if record.tag == fmt.TAG_DIR:
                        self._ensure_dir(path)
                        self._dir_meta.append((path, record.mode, record.mtime_ns))
                    elif record.tag == fmt.TAG_SYMLINK:
                        self._symlinks.append(record)
                    else:
                        self._file(path, record)
                    self.writer.report.tick()
                self.writer.close()
            except BaseException:
                self.writer.abort()
                raise
            for record in self._symlinks:
                self._symlink(record)
            if self._staging is not None:
                self._publish()
        except BaseException:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            raise
        for path, mode, mtime_ns in reversed(self._dir_meta):
            p = self.root / path
            p.chmod(stat.S_IMODE(mode))
            os.utime(p, ns=(mtime_ns, mtime_ns))
        self.writer.report.tick(done=True)

    def _symlink(self, record: fmt.RawRecord) -> None:
        path = self._entry_path(record)
        parent, _, name = path.rpartition("/")
        directory = self._ensure_dir(parent)
        final = Path(directory, name)
        staged = self._staging is not None
        link = final if staged else Path(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            link.symlink_to(decode_path(record.target))
            with contextlib.suppress(NotImplementedError, OSError):
                os.utime(link, ns=(record.mtime_ns, record.mtime_ns), follow_symlinks=False)
            if not staged:
                link.replace(final)
        except OSError as exc:
            if not staged:
                with contextlib.suppress(OSError):
                    link.unlink()
            raise RegionVaultError(f"cannot restore {self.root / path}: {exc.strerror}") from None


class BlockRestorer:
    """Restores a block image into a file (holes stay holes) or a :class:`BlockSink`."""

    def __init__(self, *, what: str, image_size: int, report: Reporter) -> None:
        self.what = what
        self.size = image_size
        self.report = report

    def _checked(self, records: Iterator[fmt.RawRecord]) -> Iterator[fmt.RawRecord]:
        end = 0
        for record in records:
            if record.tag != fmt.TAG_EXTENT:
                raise IntegrityError(self.what, "block image tree holds a file entry")
            if record.offset < end or record.offset + record.size > self.size:
                raise IntegrityError(self.what, f"extent at {record.offset} is out of place")
            end = record.offset + record.size
            yield record

    def to_file(
        self, records: Iterator[fmt.RawRecord], target: Path, writer: ParallelWriter
    ) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        image = writer.target(str(tmp), str(target), self.size)
        try:
            for record in self._checked(records):
                offset = record.offset
                for chunk_id in record.chunk_ids():
                    offset += writer.add(image, chunk_id, offset)
                if offset != record.offset + record.size:
                    raise IntegrityError(
                        self.what, f"extent at {record.offset} holds {offset - record.offset} "
                        f"bytes, its record says {record.size}",
                    )  # fmt: skip
            writer.release(image)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.report.tick(done=True)

    def _chunks(
        self, records: Iterator[fmt.RawRecord], fetcher: Fetcher
    ) -> Iterator[tuple[int, bytes | None]]:
        """``(offset, data)`` of every chunk in order; ``(end, None)`` where an extent ends."""

        def items() -> Iterator[bytes | Marker]:
            for record in self._checked(records):
                yield Marker(record)
                yield from record.chunk_ids()

        pos = end = 0
        started = False
        for item in fetcher.stream(items()):
            if isinstance(item, Marker):
                if started:
                    if pos != end:
                        raise IntegrityError(self.what, f"extent ending at {end} is short")
                    yield pos, None
                record = item.value
                pos, end, started = record.offset, record.offset + record.size, True
            else:
                data = item[1]
                if pos + len(data) > end:
                    raise IntegrityError(self.what, f"extent ending at {end} has too many bytes")
                yield pos, data
                pos += len(data)
                self.report.bytes_done = pos
                self.report.tick()
        if started:
            if pos != end:
                raise IntegrityError(self.what, f"extent ending at {end} is short")
            yield pos, None

    def to_sink(self, records: Iterator[fmt.RawRecord], sink: BlockSink, fetcher: Fetcher) -> None:
        """Write the extents in order, in pieces aligned to the sink's block size (partial
        blocks at extent edges are completed with zeros: a sink starts zeroed). The caller,
        who owns the sink, commits it."""
        if sink.size < self.size:
            raise RegionVaultError(
                f"block sink of {sink.size} bytes is smaller than the {self.size}-byte image"
            )
        bs = sink.block_size
        buf = bytearray()
        buf_start = 0

        def flush(final: bool) -> None:
            nonlocal buf, buf_start
            if final:
                pad = -len(buf) % bs
                if buf_start + len(buf) + pad > sink.size:
                    pad = max(0, sink.size - buf_start - len(buf))
                n = len(buf)
                if n:
                    sink.write(buf_start, bytes(buf) + bytes(pad))
                buf, buf_start = bytearray(), buf_start + n + pad
                return
            n = len(buf) - len(buf) % bs
            if n:
                sink.write(buf_start, bytes(buf[:n]))
                del buf[:n]
                buf_start += n

        for offset, data in self._chunks(records, fetcher):
            if data is None:
                continue
            if offset != buf_start + len(buf):
                aligned = offset - offset % bs
                if buf and aligned <= buf_start + len(buf):
                    buf += bytes(offset - (buf_start + len(buf)))  # same block: zero gap
                else:
                    flush(final=True)
                    buf_start = aligned
                    buf = bytearray(offset - aligned)
            buf += data
            if len(buf) >= _SINK_WRITE:
                flush(final=False)
        flush(final=True)
        self.report.tick(done=True)
