"""Restore: a recovery point's tree is streamed in order and planned in batches; the pool
fetches each batch's chunks with ranged gets grouped by pack, verifies them, and writes them
into the files at their offsets, in parallel (see :class:`ParallelWriter`).

Into a new or empty directory, the whole tree is restored inside a hidden staging directory
in it, under a marker (:data:`MARKER_NAME`) written before anything else and removed last,
its entries moved to their names once every file is complete, and the staging directory
removed on failure; a restore killed at any moment is finished by running it again. Into a
directory that already holds something, each entry is made under a temporary name and
renamed into place once complete. Either way nothing unverified ever appears under a
restored name. With ``sync``, the restore ends by making it durable (each file's writeback
started as it completes, then one :func:`sync_filesystem`) before the marker is removed;
without (the default, as restic and borg), the kernel writes it back in its own time.

Every entry is made relative to its open parent directory (:class:`_Dirs`), so no path
length limits a restore. Directories are created as met (owner-only until the end), files
completed (owner, extended attributes, mode, mtime) by the thread that writes them last,
FIFOs and device nodes made as met, symlinks after every file (so no restored file is
written through a restored link), then hard links, and directory metadata applied last,
deepest first. What this process cannot apply (owners and device nodes when not root,
sockets, extended attributes the target refuses) becomes a :class:`Notes` line, not an
error. A block image goes to a file the same way, or in order through a
:class:`~regionvault.core.repository._pipeline.Fetcher` to a :class:`BlockSink`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import grp
import json
import os
import pwd
import secrets
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from pathlib import Path
from typing import Any

from regionvault.core.errors import IntegrityError, RegionVaultError
from regionvault.core.interfaces import BlockSink
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex, Location
from regionvault.core.repository._pipeline import Fetcher, Marker, plan_reads, read_blobs
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import decode_path, path_problem
from regionvault.core.repository.model import Progress, ProgressCallback

__all__ = [
    "MARKER_NAME",
    "BlockRestorer",
    "FileRestorer",
    "Notes",
    "ParallelWriter",
    "Reporter",
    "Selection",
    "remove_tree",
    "start_writeback",
    "sync_filesystem",
]

TEMP_PREFIX = ".rv-tmp-"
#: a restore into a new or empty directory keeps this file in it until it is complete
MARKER_NAME = ".rv-restore"
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
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: directories of the tree kept open at once (each file is made relative to its own)
_DIR_CACHE = 128


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A function of the C library that Python's ``os`` lacks (Linux's ``syncfs`` and
    ``sync_file_range``), or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_SYNCFS = _libc_function("syncfs", ctypes.c_int)
_SYNC_FILE_RANGE = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
#: sync_file_range: start writing back the dirty pages, without waiting for them
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a finished file's data to disk without waiting, so the one
    :func:`sync_filesystem` at the end of a restore finds little left to wait for (a hint:
    a failure here is reported by that sync)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def sync_filesystem(fd: int) -> None:
    """Make durable everything written to the filesystem holding the open ``fd``: its
    files' data, their metadata and the renames. One ``syncfs`` costs what the writes
    themselves cost the disk, where an ``fsync`` per file would wait for each in turn; the
    restore's own writes are nearly all of what it waits for. Without ``syncfs`` (not
    Linux), ``sync`` of every filesystem. ``OSError`` when the kernel reports that data
    was lost while written back (Linux 5.8 and later say so)."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


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
        directory: _Dir | None = None,
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
        mtime_ns: int | None = None, directory: _Dir | None = None, shown: str | None = None,
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
                        _CREATE_FLAGS,
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


_NOTE_SOCKETS = "sockets not recreated (the program that listens on one makes it)"
_NOTE_DEVICES = "device nodes not created: not running as root"
_NOTE_OWNERS = "owners not restored: not running as root"
_NOTE_NO_LINK_SOURCE = "hard links not restored: the name they link to is not in the point"
#: an extended attribute failing with one of these is noted, not fatal: the target
#: filesystem lacks them (ENOTSUP), this process may not set that namespace (EPERM), or
#: (without /proc) the path to a FIFO, device or symlink is too long for setxattr
_XATTR_NOTED = frozenset(
    {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.E2BIG, errno.ERANGE,
     errno.EINVAL, errno.ENAMETOOLONG}
)  # fmt: skip


class Notes:
    """What a restore could not apply, one note per kind of thing, with how many entries it
    concerns and the first of them (thread-safe: the pool's threads add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: dict[str, list[Any]] = {}

    def add(self, message: str, shown: str) -> None:
        with self._lock:
            note = self._notes.get(message)
            if note is None:
                self._notes[message] = [1, shown]
            else:
                note[0] += 1

    def lines(self) -> list[str]:
        with self._lock:
            return [
                f"{message}: {first}" + (f" and {count - 1} more" if count > 1 else "")
                for message, (count, first) in self._notes.items()
            ]


def set_owner(
    notes: Notes, shown: str, where: int | str, uid: int, gid: int, dir_fd: int | None = None
) -> None:
    """Give ``where`` (a file descriptor, or a name in ``dir_fd``, never followed) an owner;
    a refusal (no CAP_CHOWN, an id this system cannot map) is noted."""
    try:
        if isinstance(where, int):
            os.fchown(where, uid, gid)
        else:
            os.chown(where, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise RegionVaultError(f"cannot set the owner of {shown}: {exc.strerror}") from None
        notes.add(f"owners not restored ({exc.strerror})", shown)


def set_xattrs(
    notes: Notes, shown: str, where: int | str, xattrs: Iterable[tuple[bytes, bytes]]
) -> None:
    """Set extended attributes (POSIX ACLs among them) on ``where``: a file descriptor, or a
    path whose last part is not followed."""
    for name, value in xattrs:
        try:
            if isinstance(where, int):
                os.setxattr(where, name, value)
            else:
                os.setxattr(where, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _XATTR_NOTED:
                raise RegionVaultError(
                    f"cannot set extended attribute {os.fsdecode(name)} of {shown}: {exc.strerror}"
                ) from None
            notes.add(
                f"extended attributes not restored ({exc.strerror})",
                f"{shown} ({os.fsdecode(name)})",
            )


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _names(dir_fd: int) -> list[str]:
    """The names in the open directory ``dir_fd``."""
    with os.scandir(dir_fd) as entries:
        return [entry.name for entry in entries]


#: /proc/self/fd/N names an open directory for the calls that take no dir_fd (setxattr)
_PROC_FD = Path("/proc/self/fd").is_dir()


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` in the open directory ``parent_fd`` and everything under it, through
    directory descriptors (so no path length limits it), making each directory writable
    first (a restore may have made it read-only)."""
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    stack: list[tuple[int, str, int]] = []

    def enter(at: int, child: str) -> None:
        with contextlib.suppress(OSError):
            os.chmod(child, 0o700, dir_fd=at)
        stack.append((at, child, os.open(child, _DIR_FLAGS, dir_fd=at)))

    enter(parent_fd, name)
    try:
        while stack:
            at, child, fd = stack[-1]
            subdir = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdir = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if subdir is not None:
                enter(fd, subdir)
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(child, dir_fd=at)
    finally:
        for _, _, fd in stack:
            os.close(fd)


class _Dir:
    """A directory of the tree being restored, open; ``users`` counts who holds it (its
    cache entry is one of them)."""

    __slots__ = ("cached", "dirs", "fd", "rel", "users")

    def __init__(self, dirs: _Dirs, fd: int, rel: str) -> None:
        self.dirs = dirs
        self.fd = fd
        self.rel = rel
        self.users = 1
        self.cached = True

    def release(self) -> None:
        self.dirs.release(self)


class _Dirs:
    """The open directories of the tree being restored, by tree path ("" is the base).

    Each is opened once with O_DIRECTORY|O_NOFOLLOW relative to its parent (made owner-only
    first where missing), so no call is given more than one name and no path length limits
    a restore, and nothing is ever made through a symlink. At most :data:`_DIR_CACHE` stay open:
    the least recently used is closed first (one still held is closed when let go), and is
    opened again, walking down from its nearest open ancestor, when needed again."""

    def __init__(self, base_fd: int, shown: str) -> None:
        self._lock = threading.Lock()
        self.base = _Dir(self, base_fd, "")
        self.shown = shown
        self._limit = max(2, _DIR_CACHE)
        self._cache: OrderedDict[str, _Dir] = OrderedDict()
        #: directories made or found by this restore: no mkdir for them again
        self._known: set[str] = set()
        self._held: set[_Dir] = set()

    def get(self, rel: str) -> _Dir:
        """The directory ``rel``, made where missing; :meth:`_Dir.release` it when done."""
        with self._lock:
            directory = self._lookup(rel)
            directory.users += 1
            return directory

    def release(self, directory: _Dir) -> None:
        with self._lock:
            directory.users -= 1
            if directory.users == 0:
                self._held.discard(directory)
                os.close(directory.fd)

    def rebase(self, base_fd: int) -> None:
        """The tree now lies in ``base_fd`` (a staging directory's entries were moved
        there); the directories open under it stay valid."""
        with self._lock:
            self.base = _Dir(self, base_fd, "")

    def close(self) -> None:
        with self._lock:
            for directory in self._held:  # every directory still open (the cached ones too)
                with contextlib.suppress(OSError):
                    os.close(directory.fd)
            self._cache.clear()
            self._held.clear()

    def _lookup(self, rel: str) -> _Dir:
        if not rel:
            return self.base
        directory = self._cache.get(rel)
        if directory is not None:
            self._cache.move_to_end(rel)
            return directory
        # walk down from the nearest open ancestor
        parent, start, cut = self.base, 0, len(rel)
        while (cut := rel.rfind("/", 0, cut)) > 0:
            ancestor = self._cache.get(rel[:cut])
            if ancestor is not None:
                parent, start = ancestor, cut + 1
                break
        while True:
            slash = rel.find("/", start)
            sub = rel if slash < 0 else rel[:slash]
            parent = self._open(parent, sub, sub[start:])
            if slash < 0:
                return parent
            start = slash + 1

    def _open(self, parent: _Dir, rel: str, name: str) -> _Dir:
        if rel not in self._known:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent.fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise RegionVaultError(
                    f"restore target {self.shown}/{rel} exists and is not a directory; "
                    "restore into an empty directory"
                ) from None
            raise RegionVaultError(f"cannot restore {self.shown}/{rel}: {exc.strerror}") from None
        self._known.add(rel)
        directory = self._cache[rel] = _Dir(self, fd, rel)
        self._held.add(directory)
        while len(self._cache) > self._limit:
            _, old = self._cache.popitem(last=False)
            old.cached = False
            old.users -= 1
            if old.users == 0:
                self._held.discard(old)
                os.close(old.fd)
        return directory


def _owner_id(lookup: Any, name: bytes, number: int) -> int:
    """The id of ``name`` on this system, else ``number`` (-1: leave it)."""
    if name:
        try:
            return int(lookup(os.fsdecode(name))[2])
        except (KeyError, UnicodeError):
            pass
    return number


class FileRestorer:
    """Restores a file tree into ``root`` (see the module docstring for how) and says what it
    could not apply (:meth:`run` returns the notes).

    Owners are restored when running as root: by name when that user or group exists on
    this system, else by number. Device nodes are made only as root, sockets never (the
    program that listens on one makes it); FIFOs always. Each of these, and an extended
    attribute the target filesystem or this process cannot set, is a note, not an error.

    Into a new or empty directory the restore keeps a marker (:data:`MARKER_NAME`) in it
    from before its staging directory exists until everything is in place: a re-run of the
    same restore (same ``point_id``, same selection) after a kill at any moment clears what
    the killed one left and restores again; any other restore refuses that target."""

    def __init__(
        self,
        writer: ParallelWriter,
        root: Path,
        *,
        what: str,
        point_id: str = "",
        sync: bool = False,
    ) -> None:
        self.writer = writer
        self.root = root
        self.what = what
        self.point_id = point_id
        #: make the restore durable before it ends (one syncfs); off (the default, as restic
        #: and borg): the kernel's writeback
        self.sync = sync
        self.notes = writer.notes
        self.is_root = os.geteuid() == 0
        self._euid = os.geteuid()
        self._egid = os.getegid()
        self._root_fd = -1
        self._marker_fd = -1
        #: the marker in ``root`` is this restore's (written, or taken over from a killed one)
        self._marked = False
        self._staging: str | None = None
        self._dirs: _Dirs | None = None
        self._dir_meta: list[tuple[str, fmt.RawRecord]] = []
        self._symlinks: list[tuple[str, fmt.RawRecord]] = []
        #: hard links: (path, the earlier path it links to)
        self._links: list[tuple[str, str]] = []
        #: entries deliberately not made (sockets; devices when not root): the note said why
        self._absent: dict[str, str] = {}
        self._owner_ids: dict[tuple[int, int, bytes, bytes], tuple[int, int]] = {}

    @property
    def dirs(self) -> _Dirs:
        assert self._dirs is not None
        return self._dirs

    # -- entries -------------------------------------------------------------------------

    def _entry_path(self, raw: bytes) -> str:
        path = decode_path(raw)
        problem = path_problem(path)
        if problem is not None:
            raise IntegrityError(self.what, f"tree entry path {path!r} {problem}")
        return path

    def _shown(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _owner(self, record: fmt.RawRecord, shown: str) -> tuple[int, int] | None:
        """(uid, gid) to give an entry, None to leave it (not recorded, or not root)."""
        if record.uid < 0 and record.gid < 0 and not record.user and not record.group:
            return None
        key = (record.uid, record.gid, record.user, record.group)
        ids = self._owner_ids.get(key)
        if ids is None:
            ids = self._owner_ids[key] = (
                _owner_id(pwd.getpwnam, record.user, record.uid),
                _owner_id(grp.getgrnam, record.group, record.gid),
            )
        if self.is_root:
            return ids
        uid, gid = ids
        if (uid >= 0 and uid != self._euid) or (gid >= 0 and gid != self._egid):
            self.notes.add(_NOTE_OWNERS, shown)
        return None

    def _temp_name(self) -> str:
        return f"{TEMP_PREFIX}{secrets.token_hex(8)}"

    def _file(self, path: str, record: fmt.RawRecord) -> None:
        parent, _, name = path.rpartition("/")
        directory = self.dirs.get(parent)
        shown = self._shown(path)
        writer = self.writer
        if self._staging is not None:
            target = writer.target(
                name, None, record.size, record.mode, record.mtime_ns, directory, shown
            )
        else:
            target = writer.target(
                self._temp_name(), name, record.size, record.mode, record.mtime_ns,
                directory, shown,
            )  # fmt: skip
        target.owner = self._owner(record, shown)
        target.xattrs = record.xattrs
        offset = 0
        for chunk_id in record.chunk_ids():
            offset += writer.add(target, chunk_id, offset)
        if offset != record.size:
            raise IntegrityError(
                self.what,
                f"file {path!r}: its chunks hold {offset} bytes, its entry says {record.size}",
            )
        writer.release(target)

    def _metadata(self, dir_fd: int, name: str, shown: str, record: fmt.RawRecord) -> None:
        """Owner, extended attributes, mode (not of a symlink) and mtime of an entry made
        by name: a FIFO, a device node or a symlink."""
        owner = self._owner(record, shown)
        if owner is not None:
            set_owner(self.notes, shown, name, *owner, dir_fd=dir_fd)
        if record.xattrs:
            set_xattrs(self.notes, shown, self._xattr_path(dir_fd, name, shown), record.xattrs)
        if record.tag != fmt.TAG_SYMLINK:
            os.chmod(name, stat.S_IMODE(record.mode), dir_fd=dir_fd)
        os.utime(name, ns=(record.mtime_ns, record.mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)  # fmt: skip

    def _xattr_path(self, dir_fd: int, name: str, shown: str) -> str:
        """A path to ``name`` in the open directory ``dir_fd`` for setxattr, which takes no
        dir_fd: through /proc (short whatever the depth; the /proc link is followed, ``name``
        is not), else the whole path (then limited by PATH_MAX: a longer one is noted)."""
        if _PROC_FD:
            return f"/proc/self/fd/{dir_fd}/{name}"
        base = self.root if self._staging is None else self.root / self._staging
        parent = shown[len(str(self.root)) + 1 :].rpartition("/")[0]
        return f"{base}/{parent}/{name}" if parent else f"{base}/{name}"

    def _made(self, path: str, record: fmt.RawRecord, make: Any) -> None:
        """Make the entry ``path`` with ``make(name, dir_fd)`` and give it its metadata:
        under its name in a staging directory, else under a temporary name renamed to it."""
        parent, _, name = path.rpartition("/")
        directory = self.dirs.get(parent)
        shown = self._shown(path)
        made = name if self._staging is not None else self._temp_name()
        try:
            make(made, directory.fd)
            self._metadata(directory.fd, made, shown, record)
            if made != name:
                os.replace(made, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except OSError as exc:
            if made != name:
                with contextlib.suppress(OSError):
                    os.unlink(made, dir_fd=directory.fd)
            raise RegionVaultError(f"cannot restore {shown}: {exc.strerror}") from None
        finally:
            directory.release()

    def _node(self, path: str, record: fmt.RawRecord) -> None:
        """A FIFO or a device node (made), or a socket (noted)."""
        tag = record.tag
        if tag == fmt.TAG_SOCKET:
            self.notes.add(_NOTE_SOCKETS, self._shown(path))
            self._absent[path] = _NOTE_SOCKETS
            return
        if tag != fmt.TAG_FIFO and not self.is_root:
            self.notes.add(_NOTE_DEVICES, self._shown(path))
            self._absent[path] = _NOTE_DEVICES
            return

        denied = []

        def make(name: str, dir_fd: int) -> None:
            if tag == fmt.TAG_FIFO:
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
                return
            kind = stat.S_IFCHR if tag == fmt.TAG_CHARDEV else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, record.rdev, dir_fd=dir_fd)
            except PermissionError:
                denied.append(True)
                raise

        try:
            self._made(path, record, make)
        except RegionVaultError:
            if not denied:
                raise
            # root without CAP_MKNOD (a container): noted like not being root
            note = "device nodes not created: not permitted here"
            self.notes.add(note, self._shown(path))
            self._absent[path] = note

    def _symlink(self, path: str, record: fmt.RawRecord) -> None:
        target = decode_path(record.target)

        def make(name: str, dir_fd: int) -> None:
            os.symlink(target, name, dir_fd=dir_fd)

        self._made(path, record, make)

    def _hard_link(self, path: str, source: str) -> None:
        if source in self._absent:
            self.notes.add(self._absent[source], self._shown(path))
            return
        src_parent, _, src_name = source.rpartition("/")
        parent, _, name = path.rpartition("/")
        src_dir = self.dirs.get(src_parent)
        directory = self.dirs.get(parent)
        made = name if self._staging is not None else self._temp_name()
        try:
            os.link(
                src_name, made, src_dir_fd=src_dir.fd, dst_dir_fd=directory.fd,
                follow_symlinks=False,
            )  # fmt: skip
            if made != name:
                os.replace(made, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except OSError as exc:
            if made != name:
                with contextlib.suppress(OSError):
                    os.unlink(made, dir_fd=directory.fd)
            if exc.errno == errno.ENOENT and not _exists(src_name, src_dir.fd):
                # a point whose backup left the first name out (an older point of the sqlite
                # hook, which omitted a -wal with a second name): the rest is still restored
                self.notes.add(_NOTE_NO_LINK_SOURCE, self._shown(path))
                return
            raise RegionVaultError(
                f"cannot restore {self._shown(path)} (a hard link to {source}): {exc.strerror}"
            ) from None
        finally:
            directory.release()
            src_dir.release()

    def _entry(self, path: str, record: fmt.RawRecord) -> None:
        """Restore a non-directory entry (a file now; a symlink after every file)."""
        tag = record.tag
        if tag == fmt.TAG_FILE:
            self._file(path, record)
        elif tag == fmt.TAG_SYMLINK:
            self._symlinks.append((path, record))
        elif tag in (fmt.TAG_FIFO, fmt.TAG_SOCKET, fmt.TAG_CHARDEV, fmt.TAG_BLOCKDEV):
            self._node(path, record)
        else:
            raise IntegrityError(self.what, f"tree entry {path!r} has unknown tag {tag}")

    @staticmethod
    def _selected(path: str, selection: Selection | None) -> bool:
        return selection is None or (path in selection and not selection.ancestor(path))

    def _tree(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        report = self.writer.report
        for record in records:
            if record.tag == fmt.TAG_EXTENT:
                raise IntegrityError(self.what, "file tree holds a block extent")
            path = self._entry_path(record.path)
            if selection is not None:
                if path not in selection:
                    continue
                if record.tag != fmt.TAG_DIR and selection.ancestor(path):
                    continue
            if path == MARKER_NAME and self._staging is not None:
                raise self._marker_entry_refused()
            if record.tag == fmt.TAG_DIR:
                self.dirs.get(path).release()
                self._dir_meta.append((path, record))
            elif record.link:
                self._links.append((path, self._entry_path(record.link)))
            else:
                self._entry(path, record)
            report.tick()

    def _link_sources(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        """Hard links whose earlier path the selection left out: that entry is restored at
        the first such link, and the others link to it (a second pass over the tree)."""
        if selection is None:
            return
        wanted: dict[str, list[str]] = {}
        for path, source in self._links:
            if not self._selected(source, selection):
                wanted.setdefault(source, []).append(path)
        if not wanted:
            return
        moved: dict[str, str] = {}
        for record in records:
            path = decode_path(record.path)
            paths = wanted.pop(path, None)
            if paths is None:
                continue
            if record.link or record.tag == fmt.TAG_DIR:
                raise IntegrityError(
                    self.what, f"hard link to {path!r}, which is a directory or a link"
                )
            self._entry(paths[0], record)
            moved[path] = paths[0]
            if not wanted:
                break
        for paths in wanted.values():  # no such entry: noted, as in a whole restore
            for path in paths:
                self.notes.add(_NOTE_NO_LINK_SOURCE, self._shown(path))
        self._links = [
            (path, moved.get(source, source))
            for path, source in self._links
            if path != moved.get(source) and source not in wanted
        ]

    def _apply_dir_meta(self) -> None:
        """Directory owners, extended attributes, modes and mtimes: last (nothing is made in
        them afterwards), deepest first (a read-only parent stays writable until then)."""
        for path, record in reversed(self._dir_meta):
            directory = self.dirs.get(path)
            shown = self._shown(path)
            try:
                owner = self._owner(record, shown)
                if owner is not None:
                    set_owner(self.notes, shown, directory.fd, *owner)
                if record.xattrs:
                    set_xattrs(self.notes, shown, directory.fd, record.xattrs)
                os.fchmod(directory.fd, stat.S_IMODE(record.mode))
                os.utime(directory.fd, ns=(record.mtime_ns, record.mtime_ns))
            except OSError as exc:
                raise RegionVaultError(f"cannot restore {shown}: {exc.strerror}") from None
            finally:
                directory.release()

    # -- the run -------------------------------------------------------------------------

    def run(
        self,
        records: Callable[[], Iterator[fmt.RawRecord]],
        selection: Selection | None,
    ) -> list[str]:
        """Restore the tree ``records()`` streams (called again only when a hard link's
        earlier path lies outside ``selection``); the notes of what was not applied."""
        try:
            self._begin(selection)
            if self._staging is not None:
                self._refuse_marker_entry(records, selection)
            try:
                self._tree(records(), selection)
                self._link_sources(records(), selection)
                self.writer.close()
            except BaseException:
                self.writer.abort()
                raise
            for path, record in self._symlinks:
                self._symlink(path, record)
            for path, source in self._links:
                self._hard_link(path, source)
            if self._staging is not None:
                self._publish()
            self._apply_dir_meta()
            self._end()
        except BaseException:
            self._discard()
            raise
        finally:
            self._close()
        self.writer.report.tick(done=True)
        return self.notes.lines()

    def _marker_entry_refused(self) -> RegionVaultError:
        return RegionVaultError(
            f"cannot restore {self.root / MARKER_NAME} into a new or empty directory: it is "
            "the name of the restore marker (restore the point's other paths)"
        )

    def _refuse_marker_entry(
        self, records: Callable[[], Iterator[fmt.RawRecord]], selection: Selection | None
    ) -> None:
        """Under a marker, a top-level entry named like it cannot be put in place: refused
        before anything is restored. Capture order lists the top level by the bytes of its
        names, so the tree is read only up to the first name after the marker's (the
        restore checks every record again as it meets it)."""
        if selection is not None:
            if any(p.split("/")[0] == MARKER_NAME for p in selection.paths):
                raise self._marker_entry_refused()
            return
        marker = MARKER_NAME.encode()
        stream = records()
        try:
            for record in stream:
                if b"/" in record.path:
                    continue
                if record.path == marker:
                    raise self._marker_entry_refused()
                if record.path > marker:
                    return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # left part-read: its reads end now

    def _begin(self, selection: Selection | None) -> None:
        """Open ``root`` (made if missing). Restore into a staging directory, under a
        marker, when it is new, empty, or holds this same restore's marker; in place (each
        entry under a temporary name first) when it holds anything else."""
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionVaultError(f"cannot restore into {root}: {exc.strerror}") from None
        paths = None if selection is None else selection.paths
        marker = self._take_marker()
        if marker is None and _names(self._root_fd):
            self._dirs = _Dirs(self._root_fd, str(root))
            return
        if marker is not None:
            staging = self._resume(marker, paths)
        else:
            staging = self._temp_name()
            self._write_marker(staging, paths)
        self._marked = True
        os.mkdir(staging, 0o700, dir_fd=self._root_fd)
        self._staging = staging
        staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=self._root_fd)
        self._dirs = _Dirs(staging_fd, str(root))

    def _take_marker(self) -> dict[str, Any] | None:
        """Another restore's marker in ``root``, locked for this one, as it says (an empty
        dict for one cut short while it was written); None when there is none. An entry of
        that name that is not a regular file is no marker, and is never opened (a FIFO
        would hang the read, a device act on the open)."""
        try:
            st = os.stat(MARKER_NAME, dir_fd=self._root_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return None
            fd = os.open(MARKER_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self._root_fd)  # fmt: skip
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegionVaultError(
                f"cannot read {self.root / MARKER_NAME}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
            os.close(fd)
            return None
        self._marker_fd = fd
        self._lock_marker()
        raw = b""
        while chunk := os.read(fd, 1 << 16):
            raw += chunk
        try:
            marker = json.loads(raw)
        except ValueError:
            return {}
        return marker if isinstance(marker, dict) else {}

    def _lock_marker(self) -> None:
        try:
            fcntl.flock(self._marker_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegionVaultError(
                f"restore target {self.root} is in use: another restore into it is running"
            ) from None

    def _write_marker(self, staging: str, paths: list[str] | None) -> None:
        """Write the marker durably before anything else is made in ``root``."""
        data = json.dumps(
            {"restore": self.point_id, "paths": paths, "staging": staging}, sort_keys=True
        ).encode()
        if self._marker_fd < 0:
            try:
                self._marker_fd = os.open(
                    MARKER_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=self._root_fd,
                )
            except FileExistsError:
                raise RegionVaultError(
                    f"restore target {self.root} is in use: another restore into it is running"
                ) from None
            self._lock_marker()
        fd = self._marker_fd
        os.ftruncate(fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.fsync(fd)
        os.fsync(self._root_fd)

    def _resume(self, marker: dict[str, Any], paths: list[str] | None) -> str:
        """A killed restore's marker: if it is this same restore's, clear what it left and
        return its staging name; else refuse."""
        if not marker:
            # cut short while being written, so before anything else was made
            if [n for n in _names(self._root_fd) if n != MARKER_NAME]:
                raise RegionVaultError(
                    f"restore target {self.root} holds an unreadable restore marker "
                    f"{MARKER_NAME} and other entries: empty it, or restore elsewhere"
                )
            fresh = self._temp_name()
            self._write_marker(fresh, paths)
            return fresh
        staging = marker.get("staging")
        if marker.get("restore") != self.point_id or marker.get("paths") != paths:
            what = f"{marker.get('restore')}"
            if marker.get("paths"):
                what += f" (paths {', '.join(map(str, marker['paths']))})"
            raise RegionVaultError(
                f"restore target {self.root} holds an unfinished restore of point {what}: "
                "re-run that restore to finish it, or empty the directory"
            )
        if not (
            isinstance(staging, str)
            and staging.startswith(TEMP_PREFIX)
            and path_problem(staging) is None
            and "/" not in staging
        ):
            raise RegionVaultError(f"restore marker {self.root / MARKER_NAME} is damaged")
        self._clear_root()
        return staging

    def _clear_root(self) -> None:
        """Remove everything in ``root`` but the marker: a restore under a marker began with
        ``root`` empty, so all of it is that restore's."""
        for name in _names(self._root_fd):
            if name != MARKER_NAME:
                remove_tree(self._root_fd, name)

    def _publish(self) -> None:
        """Move every entry of the staging directory to its name in ``root``."""
        assert self._staging is not None
        staging_fd = self.dirs.base.fd
        for name in sorted(_names(staging_fd)):
            if name == MARKER_NAME:
                raise RegionVaultError(
                    f"cannot restore {self.root / name}: the name of the restore marker"
                )
            try:
                os.rename(name, name, src_dir_fd=staging_fd, dst_dir_fd=self._root_fd)
            except OSError as exc:
                raise RegionVaultError(
                    f"cannot restore {self.root / name}: {exc.strerror}"
                ) from None
        os.rmdir(self._staging, dir_fd=self._root_fd)
        self._staging = None
        self.dirs.rebase(self._root_fd)
        os.close(staging_fd)

    def _end(self) -> None:
        """The restore is complete: with ``sync``, made durable (one ``syncfs`` of the
        target's filesystem, which holds all of a restore under a marker), then its marker
        goes last, so a power loss before then leaves a marker and a re-run restores
        again."""
        try:
            if self.sync:
                sync_filesystem(self._root_fd)
        except OSError as exc:
            raise RegionVaultError(
                f"cannot restore into {self.root}: {exc.strerror} (writing the data back)"
            ) from None
        if self._marker_fd >= 0:
            os.unlink(MARKER_NAME, dir_fd=self._root_fd)
            os.fsync(self._root_fd)

    def _discard(self) -> None:
        """After a failure: under a marker, leave ``root`` as empty as it was (the marker
        last, and only if the rest went); else the writer removed its temporary files."""
        if not self._marked:
            return
        try:
            self._clear_root()
            os.unlink(MARKER_NAME, dir_fd=self._root_fd)
        except OSError:
            pass  # the marker stays: a re-run of this restore clears the rest

    def _close(self) -> None:
        if self._dirs is not None:
            base = self._dirs.base
            self._dirs.close()
            if base.fd != self._root_fd:
                with contextlib.suppress(OSError):
                    os.close(base.fd)
        for fd in (self._marker_fd, self._root_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._marker_fd = self._root_fd = -1


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
