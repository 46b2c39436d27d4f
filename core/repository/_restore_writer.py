"""The restore's writer (:class:`ParallelWriter`): the pool fetches a batch's chunks with
ranged gets grouped by pack, verifies them, and writes them into the files at their
offsets, in parallel; a file is completed (owner, extended attributes, mode, mtime) by the
thread that writes its last piece. :class:`Reporter` turns what was written into progress."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait

from regionvault.core.errors import RegionVaultError
from regionvault.core.repository._index import ChunkIndex, Location
from regionvault.core.repository._pipeline import plan_reads, read_blobs
from regionvault.core.repository._restore_fs import (
    CREATE_FLAGS,
    Notes,
    OpenDir,
    set_owner,
    set_xattrs,
    start_writeback,
)
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import Progress, ProgressCallback

__all__ = ["ParallelWriter", "Reporter"]

_PROGRESS_EVERY = 0.2
#: consecutive chunks of one file are written with one call, up to this many bytes ...
_COALESCE_BYTES = 2 << 20
#: ... or this many pieces (well below IOV_MAX)
_COALESCE_PIECES = 512
#: writes queued for a file beyond this many bytes wait for its writer (bounds memory)
_QUEUE_BYTES = 8 << 20


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
    """A file being restored as ``path`` in the open directory ``directory`` (a path of
    its own when ``directory`` is None): created by the first thread that needs it (file
    creation is slow on many filesystems, so it runs in parallel too). With ``final`` set,
    ``path`` is a temporary name renamed to ``final`` once the file is complete. ``shown``
    names it in errors and notes.

    One thread writes a file at a time (the kernel serializes writes to one file anyway, and
    a thread waiting for that only spins): a thread that finds the file busy queues its
    writes, and the writing thread does them before it lets go, so no thread waits unless
    the queue is full."""

    __slots__ = (
        "directory", "fd", "final", "hole", "lock", "mode", "mtime_ns", "owner", "path",
        "pending", "planned", "queue", "queued", "shown", "size", "writing", "xattrs",
    )  # fmt: skip

    def __init__(
        self,
        path: str,
        final: str | None,
        size: int,
        mode: int | None,
        mtime_ns: int | None,
        directory: OpenDir | None = None,
        shown: str | None = None,
    ) -> None:
        self.path = path
        self.final = final
        self.size = size
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.directory = directory
        self.shown = shown if shown is not None else (final if final is not None else path)
        #: (uid, gid) to give the file, or None to leave it
        self.owner: tuple[int, int] | None = None
        self.xattrs: tuple[tuple[bytes, bytes], ...] = ()
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
        #: start each finished file's writeback (a restore that syncs at its end waits less)
        self.writeback = False
        #: what could not be applied (owners, extended attributes), for the report
        self.notes = Notes()

    # -- planning (calling thread) -------------------------------------------------------

    def target(
        self, path: str, final: str | None, size: int, mode: int | None = None,
        mtime_ns: int | None = None, directory: OpenDir | None = None, shown: str | None = None,
    ) -> _Target:  # fmt: skip
        """A file to restore at ``path`` (in ``directory``, renamed to ``final`` once
        complete, if given); the writer releases ``directory`` when the file is done."""
        return _Target(path, final, size, mode, mtime_ns, directory, shown)

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
                directory = target.directory
                with contextlib.suppress(OSError):
                    os.unlink(target.path, dir_fd=None if directory is None else directory.fd)

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
                directory = target.directory
                try:
                    target.fd = os.open(
                        target.path,
                        CREATE_FLAGS,
                        0o600,
                        dir_fd=None if directory is None else directory.fd,
                    )
                except OSError as exc:
                    raise RegionVaultError(
                        f"cannot restore {target.shown}: {exc.strerror}"
                    ) from None
            return target.fd

    def _finish(self, target: _Target) -> None:
        if self._failed:
            return
        if target.fd < 0:
            self._create(target)
        fd = target.fd
        try:
            if target.hole or target.mode is None:
                os.ftruncate(fd, target.size)  # trailing holes
            if target.owner is not None:
                # before the mode: chown clears the setuid and setgid bits
                set_owner(self.notes, target.shown, fd, *target.owner)
            if target.xattrs:
                # after the last write and the chown, which clear security.capability
                set_xattrs(self.notes, target.shown, fd, target.xattrs)
            if target.mode is not None:
                os.fchmod(fd, stat.S_IMODE(target.mode))
            if target.mtime_ns is not None:
                os.utime(fd, ns=(target.mtime_ns, target.mtime_ns))
            if target.mode is None:
                os.fsync(fd)  # an image: durable before it is in place
            elif self.writeback:
                start_writeback(fd)
        finally:
            with self._lock:
                self._open.discard(target)
            os.close(fd)
        directory = target.directory
        dir_fd = None if directory is None else directory.fd
        if target.final is not None:
            try:
                os.replace(target.path, target.final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(target.path, dir_fd=dir_fd)
                raise RegionVaultError(f"cannot restore {target.shown}: {exc.strerror}") from None
        if directory is not None:
            directory.release()
        with self._lock:
            self.report.files_done += 1
