"""Restore: a recovery point's tree is streamed in order and planned in batches; the pool
fetches each batch's chunks with ranged gets grouped by pack, verifies them, and writes them
into temporary files at their offsets, in parallel; a file is renamed into place only once
every one of its chunks is written (see :class:`ParallelWriter`).

Directories are created as met (owner-only until the end), symlinks are made after every
file (so no restored file is written through a restored link) and directory metadata is
applied last, deepest first. A block image goes to a file the same way, or in order through
a :class:`~regionvault.core.repository._pipeline.Fetcher` to a :class:`BlockSink`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
    """A file being restored: written under a temporary name in ``directory``, renamed to
    ``final`` once complete. The temporary file is created by the first thread that needs
    it, so file creation (slow on many filesystems) runs in parallel too."""

    __slots__ = (
        "directory", "fd", "final", "lock", "mode", "mtime_ns", "name", "pending", "size", "tmp",
    )  # fmt: skip

    def __init__(
        self, name: str, directory: Path, final: Path, size: int, mode: int | None,
        mtime_ns: int | None,
    ) -> None:  # fmt: skip
        self.name = name
        self.directory = directory
        self.final = final
        self.size = size
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.tmp: Path | None = None
        self.fd = -1
        self.lock = threading.Lock()
        #: chunk writes still to do, plus one while the planner still adds to it
        self.pending = 1


class ParallelWriter:
    """Writes chunks into files at known offsets from several threads at once.

    The planner (the calling thread) creates targets and adds ``(chunk id, offset)`` to
    them; every ``batch_bytes`` the planned chunks are grouped into ranged gets that run on
    the pool, each task decrypting and verifying its chunks and writing them (zero chunks
    are left as holes) into every target that needs them. The thread that makes a target's
    last write finishes it: length, mode and mtime set, then renamed into place. At most
    ``ahead`` batches are in flight; a failure stops the rest and every unfinished
    temporary file is removed, so no unverified byte ever appears under a restored name.
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
        self._inflight: deque[list[Future[None]]] = deque()
        self._open: set[_Target] = set()
        self._failed = False
        self.bytes_read = 0

    # -- planning (calling thread) -------------------------------------------------------

    def target(
        self, name: str, directory: Path, final: Path, size: int, mode: int | None = None,
        mtime_ns: int | None = None,
    ) -> _Target:  # fmt: skip
        return _Target(name, directory, final, size, mode, mtime_ns)

    def add(self, target: _Target, chunk_id: bytes, offset: int) -> int:
        """Plan writing chunk ``chunk_id`` at ``offset`` of ``target``; its length."""
        planned = self._plan.get(chunk_id)
        if planned is None:
            loc = self.index.get(chunk_id)
            if loc is None:
                raise self.index.missing(chunk_id, self.what)
            planned = self._plan[chunk_id] = (loc, [])
            self._planned += loc.raw_length
        with self._lock:
            target.pending += 1
        planned[1].append((target, offset))
        if self._planned >= self._batch_bytes:
            self.flush()
        return planned[0].raw_length

    def release(self, target: _Target) -> None:
        """The planner is done with ``target``: it finishes once its writes are done (one
        without chunks, such as an empty file, is finished by the pool)."""
        with self._lock:
            target.pending -= 1
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
        """After a failure: stop queued work, wait for running work, remove temp files."""
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
            if target.tmp is not None:
                with contextlib.suppress(OSError):
                    target.tmp.unlink()

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
        with self._lock:
            self.bytes_read += end - start
        zero = self._zero
        for chunk_id, data in read_blobs(self.store, self.index, pack_id, start, end, run):
            targets = plan[chunk_id][1]
            n = len(data)
            if not (n <= len(zero) and zero.startswith(data)):
                view = memoryview(data)
                for target, offset in targets:
                    fd = target.fd if target.fd >= 0 else self._create(target)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], offset + done)
            self._done_with([t for t, _ in targets], n * len(targets))

    def _done_with(self, targets: list[_Target], nbytes: int = 0) -> None:
        finished = []
        with self._lock:
            self.report.bytes_done += nbytes
            for target in targets:
                target.pending -= 1
                if target.pending == 0:
                    finished.append(target)
        for target in finished:
            self._finish(target)

    def _create(self, target: _Target) -> int:
        with target.lock:
            if target.fd < 0:
                tmp = target.directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with self._lock:  # registered first, so abort() can always clean it up
                    self._open.add(target)
                    target.tmp = tmp
                target.fd = os.open(tmp, flags, 0o600)
            return target.fd

    def _finish(self, target: _Target) -> None:
        if self._failed:
            return
        if target.fd < 0:
            self._create(target)
        assert target.tmp is not None
        try:
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
        try:
            target.tmp.replace(target.final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                target.tmp.unlink()
            raise RegionVaultError(f"cannot restore {target.final}: {exc.strerror}") from None
        with self._lock:
            self.report.files_done += 1


class FileRestorer:
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
        self._dirs_ok: set[str] = {""}
        self._dir_meta: list[tuple[str, int, int]] = []
        self._symlinks: list[fmt.RawRecord] = []

    # -- paths ---------------------------------------------------------------------------

    def _ensure_dir(self, rel: str) -> Path:
        """Make sure ``root/rel`` is a real directory (never through a symlink)."""
        path = self.root / rel if rel else self.root
        if rel in self._dirs_ok:
            return path
        probe = ""
        for part in rel.split("/"):
            probe = f"{probe}/{part}" if probe else part
            if probe in self._dirs_ok:
                continue
            p = self.root / probe
            try:
                p.mkdir(0o700)
            except FileExistsError:
                st = p.lstat()
                if not stat.S_ISDIR(st.st_mode):
                    raise RegionVaultError(
                        f"restore target {p} exists and is not a directory; restore into an "
                        "empty directory"
                    ) from None
            self._dirs_ok.add(probe)
        return path

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
        writer = self.writer
        target = writer.target(
            path, directory, directory / name, record.size, record.mode, record.mtime_ns
        )
        offset = 0
        for chunk_id in record.chunk_ids():
            offset += writer.add(target, chunk_id, offset)
        if offset != record.size:
            raise IntegrityError(
                self.what,
                f"file {path!r}: its chunks hold {offset} bytes, its entry says {record.size}",
            )
        writer.release(target)

    def run(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
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
        for path, mode, mtime_ns in reversed(self._dir_meta):
            p = self.root / path
            p.chmod(stat.S_IMODE(mode))
            os.utime(p, ns=(mtime_ns, mtime_ns))
        self.writer.report.tick(done=True)

    def _symlink(self, record: fmt.RawRecord) -> None:
        path = self._entry_path(record)
        parent, _, name = path.rpartition("/")
        directory = self._ensure_dir(parent)
        tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        tmp.symlink_to(decode_path(record.target))
        try:
            with contextlib.suppress(NotImplementedError, OSError):
                os.utime(tmp, ns=(record.mtime_ns, record.mtime_ns), follow_symlinks=False)
            tmp.replace(directory / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RegionVaultError(f"cannot restore {directory / name}: {exc.strerror}") from None


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
        image = writer.target(str(target), target.parent, target, self.size)
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
