"""The backup pipeline (:class:`BackupRun`).

Why this module is longer than the others: a run is one object whose reader, worker and
uploader threads and the calling thread share its state (the records in flight, the staging
pool, the failure that stops them all); split across modules, each piece would reach into
that state. What is not the run's state lives apart: the parent lookup and the entries taken
(``_backup_walk``), chunking (``_chunking``), packs (``_pipeline``), the tree (``_tree``), and
what an incremental block backup takes from its base and reads (``_backup_blocks``).

    reader threads                      workers (N threads)              uploader threads
    read files back to back into    ->  BLAKE3 each chunk's id, claim   ->  vault.put(pack);
    shared staging blocks, FastCDC      the ones the repository lacks,      an index object
    cuts them in place; each piece      zstd them and AES-GCM them          every K packs
    of chunk spans goes to a worker     straight into the open pack
    calling thread: walks the capture, skips unchanged files, writes the tree in capture
    order (each record once its chunk ids are all known) and stores the tree chunks

Bytes are copied once on their way in (the read into a staging block) and once on their way
out (encryption into the pack buffer): chunks are hashed and compressed where they were read.
Staging blocks return to a bounded pool once the reader has moved on and every piece cut from
them is done, and the pack buffers are bounded too, so memory stays constant however much
data flows. Every blocking wait polls the run's Failure: one failing thread stops them all.

A file capture that can change under the backup (its entries carry an ``identity``) is
taken honestly. A reader that cannot open or read a file (``EntryProblem``) leaves it out of
the tree and records why; one that finds the file is not the one walked reads it again as it
is now (``FileCapture.restat``). Once a file is read, its identity is looked at once more
(``FileCapture.current_identity``): a file that changed while it was read is read again,
:data:`MAX_READS` times in all, and then kept as last read and named. A read that is
abandoned gives its record back empty before the next read fills it, so no chunk id of it
reaches the tree (its chunks stay stored, garbage that prune collects). When every file is
read, every entry taken is looked at once more (:class:`TakenEntries`), so a file that changed
after it was read while another was being read (a database and its write-ahead log) is
named too. A read begun within :data:`SETTLE_NS` of the file's last change could miss a
write in the same clock tick: it is read again once settled, and only a settled read gets a
change token. A hard link whose file was read as another entry than walked is read on its
own. A directory that changed while the capture ran is listed again, to name an entry moved
into it after it was listed. An entry the format cannot record is left out and named. Each
issue is recorded in the recovery point, in capture order.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import NamedTuple

import blake3
from regionvault.core.errors import ComputeError, EntryProblem
from regionvault.core.interfaces import BlockCapture, Capture, FileCapture
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._backup_blocks import BlockPlan
from regionvault.core.repository._backup_walk import (
    CHECKED_KINDS,
    ParentLookup,
    TakenEntries,
    identity_digest,
    last_change,
    why_unrecordable,
)
from regionvault.core.repository._chunking import (
    PIECE,
    Block,
    Cutter,
    Rechunker,
    StagingPool,
)
from regionvault.core.repository._disks import off_disks
from regionvault.core.repository._index import ChunkIdSet, ChunkIndex
from regionvault.core.repository._pipeline import Aborted, Failure, PackWriter
from regionvault.core.repository._store import Store
from regionvault.core.repository._tree import (
    TreeWriter,
    encode_file_entry,
    encode_path,
    path_problem,
)
from regionvault.core.repository.model import Progress, ProgressCallback
from regionvault.core.types import CaptureIssue, FileEntry, FileKind, IssueKind

__all__ = ["MAX_READS", "BackupResult", "BackupRun", "ParentLookup"]

log = logging.getLogger(__name__)

#: reads of a file that keeps changing while it is read, in all: the last read is kept, and
#: the file named as changed
MAX_READS = 3

#: a read is settled once the file's last change (its ctime) is older than the moment the
#: read began by more than this: more than a tick of the coarse clock file systems stamp
#: times with (1 to 4 ms on Linux), so a write landing during the read stamps a time the
#: look after the read tells apart. A read that is not settled is read again once it is
SETTLE_NS = 20_000_000

#: a block-image extent record is closed at this length (bounds its chunk list in memory)
MAX_EXTENT = 1 << 30
#: entries held ahead of time to learn the totals for progress reports, for a capture that
#: cannot count them itself (``FileCapture.totals``): a few MiB at most
_LOOKAHEAD = 10_000
#: files read ahead of the one the tree waits for
_MAX_PENDING = 64
_PROGRESS_EVERY = 0.2
_POLL = 0.05
#: bytes of a chunk compressed first to see whether the rest is worth compressing
_SAMPLE = 4096
#: the stats counter of each kind of entry that holds no data
_KIND_STATS = {
    FileKind.DIR: "dirs",
    FileKind.SYMLINK: "symlinks",
    FileKind.FIFO: "specials",
    FileKind.SOCKET: "specials",
    FileKind.CHARDEV: "specials",
    FileKind.BLOCKDEV: "specials",
}


def _issue_kind(problem: EntryProblem) -> IssueKind:
    try:
        return IssueKind(problem.issue)
    except ValueError:
        return IssueKind.UNREADABLE


@dataclass
class BackupResult:
    tree_chunks: list[bytes]
    tree_bytes: int
    entries: int
    size: int
    stats: dict[str, int] = field(default_factory=dict)
    #: entries the capture did not take whole, in capture order
    issues: list[CaptureIssue] = field(default_factory=list)


class _Record:
    """A tree record (a file, or an extent of an image) whose chunk ids the workers fill
    in; complete once its reader closed it and every batch of its spans is done."""

    __slots__ = (
        "changed",
        "closed",
        "draining",
        "entry",
        "fresh",
        "ids",
        "incompressible",
        "issue",
        "left",
        "offset",
        "size",
        "taken",
        "unsettled",
    )

    def __init__(self, offset: int = 0) -> None:
        self.ids: list[bytes] = []
        self.left = 0
        self.closed = False
        self.size = 0
        self.offset = offset
        #: the last new chunk of this record did not compress (a hint, not a promise)
        self.incompressible = False
        #: a file's entry as it was when the bytes of the record were read (a re-read reads
        #: the file as it is then: its size, mtime and identity go into the tree)
        self.entry: FileEntry | None = None
        #: why the file was not taken whole (recorded in the point, in capture order)
        self.issue: CaptureIssue | None = None
        #: False: the file is left out of the tree (it vanished, or could not be read)
        self.taken = True
        #: its reader waits for the workers to finish the batches of an abandoned read
        self.draining = False
        #: the file changed too recently before its last read began to vouch for it (a
        #: write within the same clock tick would not show): recorded with no change token
        self.unsettled = False
        #: the parent point held the path (the file counts as changed, not new)
        self.changed = False
        #: the new chunks (id, bytes) the current read stored or took back from an abandoned
        #: read (for the summary's counters)
        self.fresh: list[tuple[bytes, int]] = []


class _HardLink(NamedTuple):
    """A hard link's record, held in capture order until the file it links to is done: a
    link to a file left out of the tree is left out too."""

    entry: FileEntry
    record: bytes


#: spans of one record cut from one staging block: (block, record, first id slot, spans)
_Batch = tuple[Block, _Record, int, list[tuple[int, int]]]


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
        self.writer = PackWriter(store, self.failure)
        self._key = store.config.chunk_id_key
        self._level = self.settings.compression_level
        self._max_chunk = store.config.chunker.max_size
        self._staging = StagingPool(
            self.readers + self.workers + 2,
            Cutter.block_size(self._max_chunk),
            self.failure.check,
        )
        self._batches: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        #: guards the dedup set, the records' ids and counts, and the counters; notified
        #: when the record the calling thread waits for becomes complete
        self._cond = threading.Condition()
        self._open_lock = threading.Lock()
        #: files for the reader threads: (entry, its record)
        self._files_q: queue.SimpleQueue[tuple[FileEntry, _Record] | None] = queue.SimpleQueue()
        #: the record the calling thread waits for (only its completion is notified)
        self._awaited: _Record | None = None
        #: chunks this run stores (compact: it grows with the data)
        self._new = ChunkIdSet()
        #: what the capture did not take whole, in capture order
        self.issues: list[CaptureIssue] = []
        #: the entries taken that can still change, for the check once the capture ends
        self._taken = TakenEntries()
        #: the files left out of the tree, and why (few: a hard link to one is left out)
        self._left_out: dict[str, CaptureIssue] = {}
        #: the directories left out with everything below them ("dir/"), and why (rare: a
        #: directory the format cannot record)
        self._left_out_dirs: dict[str, CaptureIssue] = {}
        #: when the capture began (ns since the epoch), to tell an entry moved during it
        self._started_ns = 0
        #: the files read as another entry than the one walked (few: replaced or changed
        #: as they were read); a hard link to one is read on its own
        self._reread: set[str] = set()
        #: new chunks stored by reads since abandoned, that no kept read has used yet: id
        #: -> bytes (few: only files read again have any)
        self._orphans: dict[bytes, int] = {}
        #: reads can be abandoned (a file capture): records keep their new chunks' ids
        self._rereads = False
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
            "hardlinks": 0,
            "specials": 0,
            "files_unchanged": 0,
            "files_changed": 0,
            "chunks": 0,
            "chunks_new": 0,
            "bytes_new": 0,
        }

    # -- records ---------------------------------------------------------------------------

    def _ship(self, block: Block, record: _Record, spans: list[tuple[int, int]]) -> None:
        """Hand spans of ``record`` cut from ``block`` to the workers."""
        with self._cond:
            first = len(record.ids)
            record.ids.extend(repeat(b"", len(spans)))
            record.left += 1
        self._staging.retain(block)
        self._batches.put((block, record, first, spans))

    def _close(self, record: _Record) -> None:
        with self._cond:
            record.closed = True
            if not record.left and record is self._awaited:
                self._cond.notify_all()

    def _complete(self, record: _Record) -> bool:
        with self._cond:
            return record.closed and not record.left

    def _wait(self, record: _Record) -> bytes:
        """The record's chunk ids, once the workers have computed them all."""
        while True:
            with self._cond:
                if record.closed and not record.left:
                    self._awaited = None
                    return b"".join(record.ids)
                self._awaited = record
                self._cond.wait(_PROGRESS_EVERY)
            self.failure.check()
            self._report()

    def _blob(
        self, chunk_id: bytes, blob_type: int, data: memoryview, record: _Record | None = None
    ) -> tuple[bytes, int, int, int, bytes | memoryview]:
        """A new chunk as the pack writer takes it: compressed when that makes it smaller.
        After a chunk of the same record that did not compress, a sample of the chunk is
        tried first (random data, such as already compressed files, rarely changes its
        nature mid-file), and the chunk is stored as it is when the sample does not shrink."""
        n = len(data)
        if self._level > 0:
            if (
                record is not None
                and record.incompressible
                and n > 2 * _SAMPLE
                and len(_crypto.compress(data[:_SAMPLE], self._level)) >= _SAMPLE
            ):
                return chunk_id, blob_type, 0, n, data
            packed = _crypto.compress(data, self._level)
            if len(packed) < n:
                if record is not None:
                    record.incompressible = False
                return chunk_id, blob_type, fmt.FLAG_ZSTD, n, packed
            if record is not None:
                record.incompressible = True
        return chunk_id, blob_type, 0, n, data

    def _tree_chunk(self, chunk: memoryview) -> bytes:
        """Store one tree chunk (on the calling thread: trees are small); its id."""
        chunk_id: bytes = blake3.blake3(chunk, key=self._key).digest()
        with self._cond:
            self.chunks += 1
            new = chunk_id not in self.index and self._new.add(chunk_id)
            if new:
                self.stats["chunks_new"] += 1
                self.stats["bytes_new"] += len(chunk)
        if new:
            self.writer.add_many([self._blob(chunk_id, fmt.BlobType.TREE, chunk)])
        return chunk_id

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

    # -- files -----------------------------------------------------------------------------

    def _entries(self, capture: FileCapture) -> Iterator[FileEntry]:
        if self._progress is None:  # nobody reads totals: no second walk, no look-ahead
            yield from capture.entries()
            return
        totals = capture.totals()
        if totals is not None:
            self.files_total, self.bytes_total = totals
            yield from capture.entries()
            return
        it = capture.entries()
        head = deque(islice(it, _LOOKAHEAD))
        if len(head) < _LOOKAHEAD:
            self.files_total = sum(1 for e in head if e.kind is FileKind.FILE)
            self.bytes_total = sum(e.size for e in head if e.kind is FileKind.FILE)
        while head:  # each entry let go once taken, not when the look-ahead is through
            yield head.popleft()
        yield from it

    def _read_files(self, capture: FileCapture) -> None:
        """A reader thread: reads the files queued for it, each with its own record."""
        cutter = Cutter(self._staging, self.store.new_chunker())
        try:
            while True:
                try:
                    item = self._files_q.get(timeout=_POLL)
                except queue.Empty:
                    self.failure.check()
                    continue
                if item is None:
                    return
                self.failure.check()
                self._read_file(capture, cutter, *item)
        except Aborted:
            return
        except BaseException as exc:  # reported through the run's Failure
            self.failure.set(exc)
        finally:
            cutter.close()

    def _read_file(
        self, capture: FileCapture, cutter: Cutter, entry: FileEntry, record: _Record
    ) -> None:
        """Read and cut one file, handing its chunks to the workers; read it again while it
        changes under the read (at most :data:`MAX_READS` reads), and leave it out of the
        tree, with the reason in ``record.issue``, when it cannot be read at all."""
        reads = 0
        while True:
            reads += 1
            record.entry = entry
            began = time.time_ns()
            try:
                self._read_once(capture, cutter, entry, record)
            except EntryProblem as problem:
                self._discard(record)
                kind = _issue_kind(problem)
                if kind is IssueKind.CHANGED and reads < MAX_READS:
                    # not the file walked: read the one there now
                    fresh = self._restat(capture, entry)
                    if fresh is not None:
                        entry = fresh
                        continue
                    kind, reason = IssueKind.VANISHED, "was removed while it was being read"
                elif kind is IssueKind.CHANGED:
                    reason = f"changed while it was read, {reads} times; not taken"
                else:
                    reason = problem.reason
                self._leave_out(record, entry, kind, reason)
                break
            if entry.identity is None:
                break  # a capture that cannot change (a snapshot)
            current = self._identity_now(capture, entry)
            if current == entry.identity:
                # the file as read is the file as it is, unless a write landed in the tick
                # of its last change (its timestamps would not show it)
                changed = last_change(entry)
                if changed < began - SETTLE_NS:
                    break  # settled: the common case
                wait = changed + SETTLE_NS - time.time_ns()
                if wait > SETTLE_NS:
                    # a change stamped in the future (a clock set back): no wait settles it
                    record.unsettled = True
                    break
                if reads >= MAX_READS:
                    # changed under every read, the last one just after a change: a write
                    # in its tick would not show
                    record.issue = CaptureIssue(
                        entry.path,
                        IssueKind.CHANGED,
                        f"changed while it was read, {reads} times, and just before the "
                        "last read; the last read is kept",
                    )
                    break
                if wait > 0:
                    time.sleep(wait / 1e9)  # at most SETTLE_NS: the tick is then past
                self._discard(record)
                continue  # read again: that read begins after the tick
            now = None
            if current is not None and reads < MAX_READS:
                now = self._restat(capture, entry)  # what to read again
            elif current is not None:
                record.issue = CaptureIssue(
                    entry.path,
                    IssueKind.CHANGED,
                    f"changed while it was read, {reads} times; the last read is kept",
                )
                break
            if now is None:
                # gone before it could be looked at again: whole as read, or not
                record.issue = CaptureIssue(
                    entry.path,
                    IssueKind.VANISHED,
                    "was removed as it was read; kept as read, which may not be whole",
                )
                break
            self._discard(record)
            entry = now
        self._close(record)

    def _read_once(
        self, capture: FileCapture, cutter: Cutter, entry: FileEntry, record: _Record
    ) -> None:
        """One read of ``entry`` into ``record``; :class:`EntryProblem` when the capture
        cannot open or read it (an error reading the file is one too)."""
        with self._open_lock:
            f = capture.open(entry)
        try:
            with f:
                cutter.begin()
                left = entry.size
                while True:
                    # one byte more than the file should still hold finds its end in one read
                    n, asked = cutter.fill(f, min(PIECE, left + 1) if left >= 0 else PIECE)
                    left -= n
                    record.size += n
                    end = n < asked
                    spans = cutter.cut(final=end)
                    if spans:
                        assert cutter.block is not None
                        self._ship(cutter.block, record, spans)
                    with self._cond:
                        self.bytes_done += n
                        self.stats["bytes_read"] += n
                    if end:
                        break
        except OSError as exc:  # the source file's own read (nothing else here does I/O)
            if exc.errno in (errno.ENOENT, errno.ESTALE):
                kind, reason = IssueKind.VANISHED, "was removed while it was being read"
            else:
                kind, reason = IssueKind.UNREADABLE, f"cannot be read: {exc.strerror or exc}"
            raise EntryProblem(entry.path, kind.value, reason) from None

    def _identity_now(self, capture: FileCapture, entry: FileEntry) -> tuple[int, ...] | None:
        try:
            with self._open_lock:
                return capture.current_identity(entry)
        except EntryProblem as problem:
            log.info("capture of %s: %s", capture.instance.id, problem)
            return None

    def _restat(self, capture: FileCapture, entry: FileEntry) -> FileEntry | None:
        """The regular file at ``entry.path`` as it is now; None when it is gone, or no
        longer a regular file, or the capture cannot tell."""
        try:
            with self._open_lock:  # the capture is asked one thing at a time
                now = capture.restat(entry)
        except EntryProblem as problem:
            log.info("capture of %s: %s", capture.instance.id, problem)
            return None
        if now is None or now.kind is not FileKind.FILE:
            return None
        return now

    def _discard(self, record: _Record) -> None:
        """Give ``record`` back empty, once the workers are done with every batch of the
        read being abandoned (so none of its chunk ids lands in the next read's)."""
        while True:
            with self._cond:
                if not record.left:
                    record.draining = False
                    self.bytes_done -= record.size
                    # the summary counts a file read again once: only its last read
                    self.stats["bytes_read"] -= record.size
                    for chunk_id, n in record.fresh:
                        self._orphans[chunk_id] = n
                        self.stats["bytes_discarded"] += n
                    record.fresh = []
                    record.ids = []
                    record.size = 0
                    record.incompressible = False
                    return
                record.draining = True
                self._cond.wait(_POLL)
            self.failure.check()

    def _reclaim(self, record: _Record, unknown: list[tuple[bytes, int, int]]) -> None:
        """Count the new chunks of an abandoned read that ``record``'s read uses as its
        own (a file read again mostly finds the chunks of its first read). Under
        ``_cond``."""
        for chunk_id, _, _ in unknown:
            n = self._orphans.pop(chunk_id, None)
            if n is not None:
                self.stats["bytes_discarded"] -= n
                record.fresh.append((chunk_id, n))

    def _not_taken(self, record: _Record) -> None:
        """Count a file left out of the tree as failed, not among the files taken."""
        self.stats["files"] -= 1
        self.stats["files_failed"] += 1
        if record.changed:
            self.stats["files_changed"] -= 1

    @staticmethod
    def _leave_out(record: _Record, entry: FileEntry, kind: IssueKind, reason: str) -> None:
        record.taken = False
        record.issue = CaptureIssue(entry.path, kind, reason)

    def _files(self, capture: FileCapture, tree: TreeWriter, parent: ParentLookup | None) -> int:
        label = capture.instance.id
        self._started_ns = time.time_ns()
        # the summary's counters: the bytes of the reads kept (a file read again counts
        # once), the new bytes of the reads abandoned (stored all the same, and in
        # bytes_new), and the files left out (not counted among files)
        self.stats.update(bytes_read=0, bytes_discarded=0, files_failed=0)
        self._rereads = True
        # records in capture order: ready bytes, a file being read and hashed, or an issue
        # the walk met (so issues are recorded in capture order too)
        pending: deque[bytes | CaptureIssue | _HardLink | tuple[FileEntry, bytes, _Record]]
        pending = deque()
        walk_issues = 0
        readers = [
            threading.Thread(
                target=self._read_files, args=(capture,), name=f"regionvault-read-{i}", daemon=True
            )
            for i in range(self.readers)
        ]
        for t in readers:
            t.start()
        total = 0

        def encode(entry: FileEntry, size: int = 0, ids: bytes = b"", change: bytes = b"") -> bytes:
            try:
                return encode_file_entry(entry, size, ids, change)
            except ValueError as exc:
                raise ComputeError(f"capture of {label}: {exc}") from None

        def drain(limit: int) -> None:
            nonlocal total
            while pending:
                head = pending[0]
                if isinstance(head, bytes):
                    pending.popleft()
                    tree.add(head)
                    continue
                if isinstance(head, CaptureIssue):
                    pending.popleft()
                    self.issues.append(head)
                    continue
                if isinstance(head, _HardLink):
                    link = head.entry.link or ""
                    if link in self._reread:
                        # the file it links to is no longer the one walked (an editor
                        # saved it by renaming a new file over it): this path may still
                        # hold the old one, so it is read on its own
                        own = dataclasses.replace(head.entry, link=None)
                        record = _Record()
                        self._files_q.put((own, record))
                        pending[0] = (own, encode_path(own.path), record)
                        self.stats["hardlinks"] -= 1
                        self.stats["files"] += 1
                        continue
                    pending.popleft()
                    gone = self._gone(link)
                    if gone is None:
                        tree.add(head.record)
                        if head.entry.identity is not None:  # the final check covers it too
                            self._taken.add(
                                encode_path(head.entry.path), FileKind.FILE, head.entry.identity
                            )
                    else:
                        self.issues.append(
                            CaptureIssue(
                                head.entry.path,
                                gone.kind,
                                f"a hard link to {gone.path!r}, which was not taken",
                            )
                        )
                    continue
                entry, path, record = head
                if len(pending) <= limit and not self._complete(record):
                    return
                ids = self._wait(record)
                pending.popleft()
                if record.issue is not None:
                    self.issues.append(record.issue)
                if not record.taken:
                    assert record.issue is not None
                    self._left_out[entry.path] = record.issue
                    self._not_taken(record)
                    self.files_done += 1
                    continue
                assert record.entry is not None
                if record.entry.identity != entry.identity:
                    self._reread.add(entry.path)
                entry = record.entry  # as it was read
                problem = why_unrecordable(entry, path)  # its mtime set out of range meanwhile
                if problem is not None:
                    issue = CaptureIssue(entry.path, IssueKind.UNREADABLE, problem)
                    self.issues.append(issue)
                    self._left_out[entry.path] = issue
                    self._not_taken(record)
                    self.files_done += 1
                    continue
                if entry.identity is not None and record.issue is None:
                    self._taken.add(path, FileKind.FILE, entry.identity)
                total += record.size
                # a file that changed while it was read (or too recently before its read to
                # tell) is read again next time: no token
                unsure = record.issue is not None or record.unsettled
                change = b"" if unsure else self._change_token(entry)
                tree.add(encode(entry, record.size, ids, change))
                self.files_done += 1
                self._report()

        try:
            for entry in self._entries(capture):
                if len(capture.issues) > walk_issues:  # met by the walk on its way here
                    pending.extend(capture.issues[walk_issues:])
                    walk_issues = len(capture.issues)
                if self._left_out_dirs and self._below_left_out(entry.path):
                    continue  # named once, with the directory
                path = encode_path(entry.path)
                kind = FileKind(entry.kind)
                unrecordable = why_unrecordable(entry, path)
                if unrecordable is not None:
                    issue = CaptureIssue(entry.path, IssueKind.UNREADABLE, unrecordable)
                    pending.append(issue)
                    if kind is FileKind.DIR:
                        issue = dataclasses.replace(
                            issue, message=unrecordable + " (with all below it)"
                        )
                        pending[-1] = issue
                        self._left_out_dirs[entry.path + "/"] = issue
                    elif entry.link is None:
                        self._left_out[entry.path] = issue
                    continue
                problem = path_problem(entry.path)
                if problem is not None:
                    raise ComputeError(f"capture of {label}: entry path {entry.path!r} {problem}")
                if kind is not FileKind.FILE or entry.link is not None:
                    # no data of its own: a directory, symlink, FIFO, socket, device, or a
                    # hard link to a file recorded before it
                    self.stats[_KIND_STATS[kind] if entry.link is None else "hardlinks"] += 1
                    encoded = encode(entry, entry.size if kind is FileKind.FILE else 0)
                    pending.append(_HardLink(entry, encoded) if entry.link else encoded)
                    if entry.identity is not None and entry.link is None:
                        # a symlink is checked at the end; a directory too, for entries
                        # moved into it after it was listed; a FIFO, socket or device only
                        # counts among its directory's names then
                        self._taken.add(path, kind, entry.identity)
                else:
                    self.stats["files"] += 1
                    before = parent.find(path) if parent is not None else None
                    if before is not None and self._unchanged(before, entry):
                        self.stats["files_unchanged"] += 1
                        with self._cond:
                            self.bytes_done += before.size
                        total += before.size
                        self.files_done += 1
                        pending.append(encode(entry, before.size, before.ids, before.change))
                        if entry.identity is not None:  # the parent's bytes, as walked
                            self._taken.add(path, FileKind.FILE, entry.identity)
                    else:
                        record = _Record()
                        if before is not None:  # the parent had this path: changed, not new
                            self.stats["files_changed"] += 1
                            record.changed = True
                        self._files_q.put((entry, record))
                        pending.append((entry, path, record))
                drain(_MAX_PENDING)
            pending.extend(capture.issues[walk_issues:])
            drain(0)
        except BaseException:
            self.failure.set(Aborted())
            raise
        finally:
            for _ in readers:
                self._files_q.put(None)
            for t in readers:
                while t.is_alive():
                    t.join(_POLL)
        self.issues.extend(self._recheck(capture))
        return total

    def _below_left_out(self, path: str) -> bool:
        return path.startswith(tuple(self._left_out_dirs))

    def _gone(self, path: str) -> CaptureIssue | None:
        """Why the file at ``path`` was left out of the tree, or None if it was taken."""
        gone = self._left_out.get(path)
        if gone is None and self._left_out_dirs:
            for prefix, issue in self._left_out_dirs.items():
                if path.startswith(prefix):
                    return issue
        return gone

    def _recheck(self, capture: FileCapture) -> list[CaptureIssue]:
        """Every entry taken, looked at once more now that the capture has ended: one that
        changed since it was read (a database whose write-ahead log was read after it) is
        named. One removed since was taken whole as it was, and one created since the walk
        is not part of this point: neither is an issue. One ``current_identity`` per entry
        (the local capture: a stat) costs less than a second walk, and lists no
        directory."""
        changed: list[CaptureIssue] = []
        #: directories whose identity moved since they were listed
        moved: list[bytes] = []
        for raw, kind, digest in self._taken:
            self.failure.check()
            if kind not in CHECKED_KINDS:
                continue  # a FIFO, socket or device: only a name in its directory
            path = raw.decode("utf-8", "surrogateescape")
            entry = FileEntry(path=path, kind=kind, mode=0, mtime_ns=0)
            try:
                now = capture.current_identity(entry)
            except EntryProblem as problem:
                problem_kind = _issue_kind(problem)
                if problem_kind is IssueKind.VANISHED:
                    continue  # removed since: taken whole as it was
                # replaced on its way (a parent directory swapped for a symlink), or no
                # longer reachable: what the point holds cannot be vouched for
                changed.append(
                    CaptureIssue(
                        path,
                        problem_kind,
                        f"could not be looked at again before the capture ended "
                        f"({problem.reason}); the point holds it as read",
                    )
                )
                continue
            if now is None:
                continue
            if identity_digest(now) != digest and kind is FileKind.DIR:
                moved.append(raw)
            elif identity_digest(now) != digest:
                changed.append(
                    CaptureIssue(
                        path,
                        IssueKind.CHANGED,
                        "changed after it was read, before the capture ended; "
                        "the point holds it as read",
                    )
                )
        if moved:
            changed.extend(self._moved_in(capture, moved))
        return changed

    def _moved_in(self, capture: FileCapture, moved: list[bytes]) -> list[CaptureIssue]:
        """Entries moved into a directory after it was listed (from one not listed yet: a
        maildir's message from new/ to cur/), which the point then holds nowhere. Each
        directory whose identity moved is listed again: a name the point does not hold
        whose mtime is older than the capture is such an entry. One made since the capture
        began is not part of this point, like one created after the walk; a name replaced
        by a rename (an editor's save) is held, and costs nothing. Only such directories are
        listed, and one more pass over what was taken finds the names they held."""
        held: dict[bytes, set[bytes]] = {raw: set() for raw in moved}
        for raw, _kind, _digest in self._taken:
            cut = raw.rfind(b"/")
            names = held.get(raw[:cut] if cut >= 0 else b"")
            if names is not None:
                names.add(raw[cut + 1 :])
        named = {issue.path for issue in self.issues}
        found: list[CaptureIssue] = []
        for raw in moved:
            self.failure.check()
            path = raw.decode("utf-8", "surrogateescape")
            try:
                with self._open_lock:
                    now = capture.names(FileEntry(path=path, kind=FileKind.DIR, mode=0, mtime_ns=0))
            except EntryProblem:
                continue  # itself replaced: not the directory walked
            for name in sorted(now or (), key=encode_path):
                inner = f"{path}/{name}"
                if encode_path(name) in held[raw] or inner in named:
                    continue
                entry = FileEntry(path=inner, kind=FileKind.FILE, mode=0, mtime_ns=0)
                try:
                    with self._open_lock:
                        there = capture.restat(entry)
                except EntryProblem:
                    continue
                if there is None or there.mtime_ns >= self._started_ns - SETTLE_NS:
                    continue  # made while the capture ran: not part of this point
                found.append(
                    CaptureIssue(
                        inner,
                        IssueKind.CHANGED,
                        "moved here while the capture ran, after its directory was listed; "
                        "the point does not hold it",
                    )
                )
        return found

    def _unchanged(self, before: fmt.RawRecord, entry: FileEntry) -> bool:
        """Whether the parent's chunks of this file can stand for its data. Only the data
        is taken from the parent: the new record's metadata (mode, owners, xattrs) is the
        capture's, so a chmod, chown or xattr change shows in the new point all the same."""
        if before.link:
            return False  # a hard link in the parent: its record holds no chunks
        if (before.size, before.mtime_ns, before.mode) != (entry.size, entry.mtime_ns, entry.mode):
            return False
        if entry.identity is not None and before.change != self._change_token(entry):
            # size and mtime say nothing of a file rewritten in place with its mtime put
            # back (or within the mtime's granularity): its ctime or inode does
            return False
        index, new = self.index, self._new
        with self._cond:
            return all(chunk_id in index or chunk_id in new for chunk_id in before.chunk_ids())

    def _change_token(self, entry: FileEntry) -> bytes:
        """A keyed digest of the entry's identity, recorded with the file's data (empty for
        a capture without identities, a snapshot, where size and mtime must do)."""
        if entry.identity is None:
            return b""
        ident = repr(tuple(int(n) for n in entry.identity)).encode()
        digest: bytes = blake3.blake3(b"change\x00" + ident, key=self._key).digest(length=16)
        return digest

    # -- block images ----------------------------------------------------------------------

    def _blocks(self, capture: BlockCapture, tree: TreeWriter, plan: BlockPlan | None) -> int:
        """Cut the image's written ranges on this thread; extent records go to the tree in
        order as their ids complete. With a ``plan``, only its spans are read (through
        ``BlockCapture.read_ranges``) and its runs of the base's chunks go to the tree
        whole, in offset order among the extents read."""
        label = capture.instance.id
        self.bytes_total = capture.size
        cutter = Cutter(self._staging, self.store.new_chunker())
        window = _cut_window(capture.block_size, self._max_chunk)
        extents: deque[_Record] = deque()
        record: _Record | None = None
        end = 0
        kept: deque[fmt.RawRecord] = deque(() if plan is None else plan.kept)
        self.stats.update(bytes_read=0, bytes_from_base=0, extents_from_base=0)

        def emit(wait: bool) -> None:
            while extents and (wait or self._complete(extents[0])):
                done = extents.popleft()
                ids = self._wait(done)
                if done.size:
                    tree.add(fmt.encode_extent(done.offset, done.size, ids))

        def take(spans: list[tuple[int, int]]) -> None:
            nonlocal record
            assert record is not None and cutter.block is not None
            group: list[tuple[int, int]] = []
            for span in spans:
                group.append(span)
                record.size += span[1]
                if record.size >= MAX_EXTENT:
                    self._ship(cutter.block, record, group)
                    group = []
                    self._close(record)
                    record = _Record(record.offset + record.size)
                    extents.append(record)
            if group:
                self._ship(cutter.block, record, group)

        def close() -> None:
            nonlocal record
            if record is not None:
                take(cutter.cut(final=True))
                self._close(record)
                record = None

        def keep(before: int) -> None:
            """The base's kept runs that start before ``before``, whole: the extent being
            read ends first (a kept run never meets a span read)."""
            nonlocal end
            while kept and kept[0].offset < before:
                base = kept.popleft()
                close()
                done = _Record(base.offset)
                done.size, done.ids, done.closed = base.size, [base.ids], True
                extents.append(done)
                with self._cond:
                    self.chunks += len(base.ids) // fmt.CHUNK_ID_SIZE
                self.stats["bytes_from_base"] += base.size
                self.stats["extents_from_base"] += 1
                end = self.bytes_done = base.offset + base.size

        def pieces() -> Iterator[tuple[int, bytes]]:
            if plan is None:
                yield from capture.blocks()
                return
            for offset, data in capture.read_ranges(plan.reads):
                if data and not plan.asked(offset, len(data)):
                    raise ComputeError(
                        f"capture of {label}: block at offset {offset} ({len(data)} bytes) "
                        "lies outside the ranges it was asked to read"
                    )
                # the rest of a block read is the base's (or zeros): its chunks stand for it
                yield from plan.clip(offset, data)

        try:
            for offset, data in pieces():
                if offset < end or offset < 0 or offset + len(data) > capture.size:
                    raise ComputeError(
                        f"capture of {label}: block at offset {offset} ({len(data)} bytes) "
                        "overlaps the previous one or lies outside the "
                        f"{capture.size}-byte image"
                    )
                if not data:
                    continue
                stray = off_disks(capture.disks, offset, len(data))
                if stray is not None:
                    # a restore writes each disk apart: data between disks would be lost
                    raise ComputeError(
                        f"capture of {label}: block at offset {offset} ({len(data)} bytes) "
                        f"holds data at {stray}, which lies on none of its disks"
                    )
                keep(offset)
                if offset != end or record is None:
                    close()
                    cutter.begin()
                    record = _Record(offset)
                    extents.append(record)
                with memoryview(data) as view:
                    done = 0
                    while done < len(view):
                        # a chunk never spans a cut window: a changed block then touches
                        # only its own window's chunks, and an incremental backup reads
                        # just that window again (docs/format.md, section 9)
                        room = window - (offset + done) % window
                        done += cutter.fill_from(view[done : done + room])
                        take(cutter.cut(final=(offset + done) % window == 0))
                end = offset + len(data)
                self.stats["bytes_read"] += len(data)
                self.bytes_done = end
                emit(wait=False)
                self._report()
            close()
            keep(capture.size)
            emit(wait=True)
        finally:
            cutter.close()
        return capture.size

    # -- workers -------------------------------------------------------------------------

    def _next_batch(self) -> _Batch | None:
        while True:
            try:
                return self._batches.get(timeout=_POLL)
            except queue.Empty:
                self.failure.check()

    def _work(self) -> None:
        key = self._key
        index, new = self.index, self._new
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                block, record, first, spans = batch
                view = block.view
                ids = [blake3.blake3(view[o : o + n], key=key).digest() for o, n in spans]
                unknown = [
                    (chunk_id, o, n)
                    for chunk_id, (o, n) in zip(ids, spans, strict=True)
                    if chunk_id not in index
                ]
                with self._cond:
                    record.ids[first : first + len(ids)] = ids
                    self.chunks += len(ids)
                    fresh = [item for item in unknown if new.add(item[0])]
                    self.stats["chunks_new"] += len(fresh)
                    self.stats["bytes_new"] += sum(n for _, _, n in fresh)
                    if self._rereads:  # a file capture: a read can be abandoned
                        record.fresh.extend((c, n) for c, _, n in fresh)
                    if self._orphans and len(fresh) < len(unknown):
                        self._reclaim(record, unknown)
                if fresh:
                    self.writer.add_many(
                        [
                            self._blob(c, fmt.BlobType.DATA, view[o : o + n], record)
                            for c, o, n in fresh
                        ]
                    )
                del fresh, unknown
                self._staging.release(block)
                with self._cond:
                    record.left -= 1
                    if not record.left and (
                        record.draining or (record.closed and record is self._awaited)
                    ):
                        self._cond.notify_all()
        except Aborted:
            return
        except BaseException as exc:  # reported through the run's Failure
            self.failure.set(exc)

    # -- the run ---------------------------------------------------------------------------

    def run(
        self, capture: Capture, parent: ParentLookup | None, plan: BlockPlan | None = None
    ) -> BackupResult:
        """Back up ``capture``: a file capture against ``parent`` (its unchanged files
        are not read), a block capture in full or, with ``plan``, incrementally."""
        threads = [
            threading.Thread(target=self._work, name=f"regionvault-backup-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        try:
            # a small threshold: the tree's pending bytes stay well below a MiB
            cut = Rechunker(self.store.new_chunker(), threshold=2 * self._max_chunk)
            tree = TreeWriter(cut, self._tree_chunk)
            if isinstance(capture, FileCapture):
                size = self._files(capture, tree, parent)
            elif isinstance(capture, BlockCapture):
                size = self._blocks(capture, tree, plan)
            else:
                raise TypeError(f"cannot back up a {type(capture).__name__}")
            tree_ids = tree.finish()
            for _ in threads:
                self._batches.put(None)
            for t in threads:
                while t.is_alive():
                    t.join(_POLL)
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
        return BackupResult(
            tree_ids, tree.bytes, tree.entries, size, dict(self.stats), list(self.issues)
        )


def _cut_window(block_size: int, max_chunk: int) -> int:
    """The span of a block image that no chunk crosses: the capture's block size times the
    fewest blocks that hold a largest chunk (one 512 KiB EBS block; 128 blocks of 4 KiB).
    Chunks stay content-defined inside a window; windows start at image offset 0."""
    return block_size * max(1, -(-max_chunk // block_size))
