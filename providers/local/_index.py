"""The local Compute's index: a SQLite cache of the instance records, so that listing a page,
finding a name and registering one more instance cost a few index lookups, not a read of
every record.

The records (``instances/<id>/instance.json``) stay the truth; the index
(``compute/index.sqlite``, WAL) holds a copy of each, by id and by
(name, id). Every change of a record goes through :meth:`InstanceIndex.changing`, under the
compute lock:

1. the id is marked *dirty* in the index (one transaction, fsynced before step 2);
2. the record is written (or removed) on disk;
3. the index row is replaced from it (or deleted) and the mark cleared, in one transaction
   (not fsynced: should a power cut lose it, the mark is still there).

A process killed anywhere in between leaves the mark. Under the lock, a dirty mark means
exactly that (a live writer clears its own before releasing the lock), so every holder of
the lock first repairs what is marked, from the records on disk (:meth:`repair`); a reader
that sees a mark takes the lock and does the same before it answers. An index that is
missing, of another schema, unreadable, whose first build was cut short, or built for
another ``instances/`` directory (its meta holds that directory's device, inode and path:
an index copied in from another root, or restored beside other records) is built again
from every record (:meth:`rebuild`): deleting ``index.sqlite*`` is always safe.

Records changed without the index (by hand, by an earlier release, or by restoring an older
index beside newer records) are caught too: each row holds its record file's (inode,
mtime_ns, size) as they were indexed, and every row a page or a name check returns is
checked against one ``stat`` of its record (a row whose record differs or is gone is read
again from disk, under the lock, and the query asked again); and the number of rows is
compared with one scan of ``instances/`` at the first page of each listing and by every
holder of the lock, whenever ``instances/``'s (mtime_ns, nlink) are not those the index was
last found in step with (a directory added or removed behind the index's back: the ids that
differ are brought in step; a change under the lock keeps the index in step). An SQLite
error is a ComputeError naming the index, never a raw one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionvault.core.errors import ComputeError
from regionvault.providers.local import _fs

__all__ = ["INDEX", "InstanceIndex", "Stats"]

log = logging.getLogger(__name__)

#: the index file, in the compute directory (SQLite adds ``-wal`` and ``-shm`` beside it)
INDEX = "index.sqlite"
#: the layout of the tables below; another value is rebuilt
SCHEMA = "3"
#: states whose instances are not listed and do not hold their name
HIDDEN = ("terminated", "pending")
#: rows fetched from SQLite at a time while a filtered page is filled
_BATCH = 256
#: times a page or name check is asked again after rows found stale were repaired
_RETRIES = 3

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    ino INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_name ON instances (name, id);
CREATE TABLE IF NOT EXISTS tags (
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (id, key)
);
CREATE TABLE IF NOT EXISTS dirty (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bare (id TEXT PRIMARY KEY);
"""
# ``bare``: instance directories without a record (one being made, a sink without a record
# yet): counted with the rows when ``instances/`` is compared with the index

#: a record file as indexed: (st_ino, st_mtime_ns, st_size); None when there is none
Stamp = tuple[int, int, int] | None

#: reads a record from disk: the record, or None when it is not there
ReadRecord = Callable[[str], "dict[str, Any] | None"]
#: the ids of the instance directories on disk
ListIds = Callable[[], "list[str]"]


@dataclass
class Stats:
    """What this index did, for tests and the benchmark to count (never to time)."""

    #: SELECT statements run for callers (listing pages, name checks, dirty checks)
    queries: int = 0
    #: records read from disk to repair or rebuild the index
    records_read: int = 0
    rebuilds: int = 0
    repaired: list[str] = field(default_factory=list)


class _Change:
    """One record change in progress (see :meth:`InstanceIndex.changing`)."""

    __slots__ = ("record", "settled")

    def __init__(self) -> None:
        self.record: Mapping[str, Any] | None = None
        self.settled = False

    def stored(self, record: Mapping[str, Any]) -> None:
        """The record is on disk as ``record``."""
        self.record, self.settled = record, True

    def removed(self) -> None:
        """The record is gone from disk."""
        self.record, self.settled = None, True


class InstanceIndex:
    """The index of one compute directory; see the module documentation.

    ``read_record`` and ``list_ids`` reach the records on disk; ``lock`` is the compute
    lock, and ``holding()`` says whether this thread holds it."""

    def __init__(
        self,
        compute_dir: Path,
        *,
        instances_dir: Path,
        record_name: str,
        read_record: ReadRecord,
        list_ids: ListIds,
        lock: Callable[[], contextlib.AbstractContextManager[None]],
        holding: Callable[[], bool],
        error: Callable[[str], ComputeError],
    ) -> None:
        self.path = compute_dir / INDEX
        self.instances_dir = instances_dir
        self._instances_str = str(instances_dir)
        self._record_name = record_name
        self._read_record = read_record
        self._list_ids = list_ids
        self._lock = lock
        self._holding = holding
        self._error = error
        self._local = threading.local()
        #: ``instances/``'s entries as the index last found them in step (read by _usable)
        self._stored_entries: str | None = None
        #: every connection this process opened (one per thread), for :meth:`close_all`
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self.stats = Stats()

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: a connection never crosses one)."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "db", None)
        if held is not None and held[0] == os.getpid():
            with self._opened_lock:
                open_still = held[1] in self._opened  # not closed by close_all
            if open_still:
                return held[1]
        _fs.ensure_dir(self.path.parent)
        # used by its own thread alone; check_same_thread=False only lets close_all close it
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_TABLES)
        except BaseException:
            db.close()
            raise
        self._local.db = (os.getpid(), db)
        with self._opened_lock:
            self._opened.append(db)
        return db

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """An SQLite error as a one-line ComputeError naming the index."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(f"instance index {self.path}: {exc}") from None

    def close(self) -> None:
        """Close this thread's connection (the next use opens another)."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "db", None)
        if held is not None:
            self._local.db = None
            if held[0] == os.getpid():
                with self._opened_lock:
                    if held[1] in self._opened:
                        self._opened.remove(held[1])
                held[1].close()

    def close_all(self) -> None:
        """Close every connection this process opened; a thread's next use opens another."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for db in opened:
            db.close()

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # the block's error is the one to tell
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- what is on disk --------------------------------------------------------------------

    def _stamp(self, instance_id: str) -> Stamp:
        """The record file of ``instance_id`` as it is now: one ``stat``, no read."""
        try:
            st = os.stat(f"{self._instances_str}/{instance_id}/{self._record_name}")  # noqa: PTH116 (once per listed row: no Path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _dir_key(self) -> str:
        """Which ``instances/`` directory this is: device, inode and resolved path."""
        try:
            st = os.stat(self._instances_str)  # noqa: PTH116
        except FileNotFoundError:
            return "none"
        except OSError as exc:
            raise self._error(
                f"instance index {self.path}: cannot stat {self._instances_str}: "
                f"{exc.strerror or exc}"
            ) from None
        return f"{st.st_dev}:{st.st_ino}:{os.path.realpath(self._instances_str)}"

    def _entries(self) -> str:
        """The state of ``instances/``'s entries: its (mtime_ns, nlink), one ``stat`` (both
        change when an instance directory is made or removed)."""
        try:
            st = os.stat(self._instances_str)  # noqa: PTH116
        except OSError:
            return "none"
        return f"{st.st_mtime_ns}:{st.st_nlink}"

    def _in_step(self, db: sqlite3.Connection, stored: str | None) -> bool:
        """Whether the index holds every directory of ``instances/``: yes when the entries
        are as ``stored`` (as last found in step), else counted (one scan)."""
        if stored is not None and stored == self._entries():
            return True
        return self._counts_match(db, self._list_ids())

    def _counts_match(self, db: sqlite3.Connection, ids: list[str]) -> bool:
        """Whether the index holds as many ids (rows and bare directories) as ``ids``."""
        self.stats.queries += 1
        row = db.execute(
            "SELECT (SELECT count(*) FROM instances) + (SELECT count(*) FROM bare)"
        ).fetchone()
        return bool(row[0] == len(ids))

    # -- keeping it right -------------------------------------------------------------------

    def _meta(self, db: sqlite3.Connection) -> dict[str, str]:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def _usable(self) -> bool:
        """Built, of this schema, for this ``instances/``, and nothing marked dirty."""
        try:
            db = self._connect()
            self.stats.queries += 1
            row = db.execute(
                "SELECT (SELECT value FROM meta WHERE key = 'schema'),"
                " (SELECT value FROM meta WHERE key = 'built'),"
                " (SELECT value FROM meta WHERE key = 'dir'),"
                " EXISTS (SELECT 1 FROM dirty),"
                " (SELECT value FROM meta WHERE key = 'entries')"
            ).fetchone()
            self._stored_entries = row[4]
            return bool(row[:4] == (SCHEMA, "1", self._dir_key(), 0))
        except sqlite3.DatabaseError:
            return False

    def ready(self, *, count: bool = False) -> None:
        """Make the index right before it is read: under the compute lock, repair or rebuild
        it; otherwise, when it needs either, take the lock to do so. With ``count``, also
        compare its rows with the directories in ``instances/`` (a listing's first page)."""
        with self._failing():
            if self._holding():
                self._repair()
            elif not self._usable() or (
                count and not self._in_step(self._connect(), self._stored_entries)
            ):
                with self._lock():
                    self._repair()

    def repair(self) -> None:
        """Under the compute lock: rebuild the index if it is not built (or not readable, or
        of another ``instances/``), else bring each id marked dirty up to its record on disk,
        and the ids in step with ``instances/``."""
        with self._failing():
            self._repair()

    def _repair(self) -> None:
        try:
            db = self._connect()
            meta = self._meta(db)
            if (
                meta.get("schema") != SCHEMA
                or meta.get("built") != "1"
                or meta.get("dir") != self._dir_key()
            ):
                self._rebuild()
                return
            dirty = [row[0] for row in db.execute("SELECT id FROM dirty").fetchall()]
            self._refresh(db, dirty)
            entries = self._entries()  # before the scan: a change during it differs next time
            if meta.get("entries") == entries:
                return
            ids = self._list_ids()
            if not self._counts_match(db, ids):
                known = {
                    row[0]
                    for row in db.execute("SELECT id FROM instances UNION SELECT id FROM bare")
                }
                on_disk = set(ids)
                self._refresh(db, sorted(on_disk.symmetric_difference(known)))
            with self._transaction(db):
                self._set_entries(db, entries)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # locked, full, or cannot be opened: rebuilding would not help
            self._rebuild()  # not a database (damaged): made anew from the records

    def _refresh(self, db: sqlite3.Connection, ids: list[str]) -> None:
        """Under the lock: the rows of ``ids`` read again from their records on disk."""
        for instance_id in ids:
            stamp = self._stamp(instance_id)  # before the read: a later change differs
            record = self._read_record(instance_id)
            self.stats.records_read += 1
            self.stats.repaired.append(instance_id)
            with self._transaction(db):
                self._put(db, instance_id, record, stamp)

    def rebuild(self) -> None:
        """Under the compute lock: build the index anew from every record on disk (an
        unreadable index file is removed first)."""
        with self._failing():
            self._rebuild()

    def _rebuild(self) -> None:
        try:
            db = self._connect()
            self._meta(db)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # locked, or cannot be opened: not a damaged file
            self.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").unlink()
            db = self._connect()
        self.stats.rebuilds += 1
        directory, entries = self._dir_key(), self._entries()
        with self._transaction(db):
            for table in ("instances", "tags", "dirty", "bare", "meta"):
                db.execute(f"DELETE FROM {table}")
            for instance_id in self._list_ids():
                self.stats.records_read += 1
                stamp = self._stamp(instance_id)
                self._put(db, instance_id, self._read_record(instance_id), stamp)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema", SCHEMA), ("built", "1"), ("dir", directory)],
            )
            self._set_entries(db, entries)

    @staticmethod
    def _set_entries(db: sqlite3.Connection, entries: str) -> None:
        """``instances/``'s entries as they were when the index was last found in step."""
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('entries', ?)", (entries,))

    def _put(
        self,
        db: sqlite3.Connection,
        instance_id: str,
        record: Mapping[str, Any] | None,
        stamp: Stamp,
    ) -> None:
        db.execute("DELETE FROM dirty WHERE id = ?", (instance_id,))
        db.execute("DELETE FROM tags WHERE id = ?", (instance_id,))
        db.execute("DELETE FROM bare WHERE id = ?", (instance_id,))
        if record is None or stamp is None:
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            if os.path.isdir(f"{self._instances_str}/{instance_id}"):  # noqa: PTH112
                db.execute("INSERT INTO bare (id) VALUES (?)", (instance_id,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO instances (id, name, state, record, ino, mtime_ns, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (instance_id, record["name"], record["state"], json.dumps(record), *stamp),
            )
            db.executemany(
                "INSERT INTO tags (id, key, value) VALUES (?, ?, ?)",
                [(instance_id, key, value) for key, value in record["tags"].items()],
            )

    @contextlib.contextmanager
    def changing(self, instance_id: str) -> Iterator[_Change]:
        """Under the compute lock: change ``instance_id``'s record on disk inside the block
        and say how (``stored(record)`` or ``removed()``); a block that raises, or says
        nothing, leaves the index to read the record back from disk.

        Once the mark is set, the block's outcome is the change's: should the row update
        after it fail (disk full, say), the mark stays, the next holder of the lock (or a
        reader, who takes it) repairs the row from the record, and the failure is logged,
        not raised."""
        with self._failing():
            db = self._connect()  # repaired when the lock was taken
            with self._transaction(db):
                db.execute("INSERT OR IGNORE INTO dirty (id) VALUES (?)", (instance_id,))
                row = db.execute("SELECT value FROM meta WHERE key = 'entries'").fetchone()
            # in step before this change (found so when the lock was taken): then so after it
            in_step = row is not None and row[0] == self._entries()
        change = _Change()
        try:
            yield change
        finally:
            try:
                if not change.settled:
                    self.stats.records_read += 1
                    change.record = self._read_record(instance_id)
                stamp = self._stamp(instance_id) if change.record is not None else None
                # not fsynced: lost in a power cut, it leaves the mark, and the mark a repair
                db.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._transaction(db):
                        self._put(db, instance_id, change.record, stamp)
                        if in_step:
                            self._set_entries(db, self._entries())
                finally:
                    db.execute("PRAGMA synchronous=FULL")
            except (sqlite3.Error, ComputeError) as exc:
                log.warning(
                    "instance index %s: row of %s left to be repaired: %s",
                    self.path,
                    instance_id,
                    exc.args[0] if exc.args else exc,
                )

    # -- reading ----------------------------------------------------------------------------

    def _stale(self, rows: list[tuple[str, int, int, int]]) -> list[str]:
        """The ids among ``rows`` (id, ino, mtime_ns, size) whose record is not as indexed."""
        return [row[0] for row in rows if self._stamp(row[0]) != row[1:]]

    def _repaired(self, stale: list[str]) -> None:
        """Read the ``stale`` rows again from their records, under the lock."""
        with self._failing():
            if self._holding():
                self._refresh(self._connect(), stale)
            else:
                with self._lock():
                    self._refresh(self._connect(), stale)

    def _too_busy(self) -> ComputeError:
        return self._error(
            f"instance index {self.path}: records in {self._instances_str} kept changing "
            f"while read ({_RETRIES} tries); try again"
        )

    def holder(self, name: str) -> str | None:
        """The id of the listed instance named ``name``, if any."""
        self.ready()
        for _ in range(_RETRIES):
            self.stats.queries += 1
            with self._failing():
                rows = (
                    self._connect()
                    .execute(
                        "SELECT id, ino, mtime_ns, size FROM instances"
                        " WHERE name = ? AND state NOT IN (?, ?)",
                        (name, *HIDDEN),
                    )
                    .fetchall()
                )
            stale = self._stale(rows)
            if not stale:
                return None if not rows else str(rows[0][0])
            self._repaired(stale)
        raise self._too_busy()

    def page(
        self,
        after: tuple[str, str] | None,
        size: int,
        filters: Mapping[str, str | None] | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``size`` records of listed instances whose tags match ``filters`` (each
        key present and, where a value is given, equal: :meth:`Tags.matches`), in (name,
        id) order after ``after``; and whether there are more. One query, in SQL whole;
        each row returned is checked against a ``stat`` of its record (and asked again
        once the ones that differ are repaired)."""
        self.ready(count=after is None)
        for _ in range(_RETRIES):
            rows, more = self._query(after, size, filters)
            stale = self._stale([row[1:] for row in rows])
            if not stale:
                return [json.loads(row[0]) for row in rows], more
            self._repaired(stale)
        raise self._too_busy()

    def _query(
        self,
        after: tuple[str, str] | None,
        size: int,
        filters: Mapping[str, str | None] | None,
    ) -> tuple[list[tuple[str, str, int, int, int]], bool]:
        self.stats.queries += 1
        where = "state NOT IN (?, ?)"
        args: list[Any] = list(HIDDEN)
        if after is not None:
            where += " AND (name, id) > (?, ?)"
            args += list(after)
        for key, value in (filters or {}).items():
            if value is None:
                where += (
                    " AND EXISTS (SELECT 1 FROM tags t WHERE t.id = instances.id AND t.key = ?)"
                )
                args.append(key)
            else:
                where += (
                    " AND EXISTS (SELECT 1 FROM tags t WHERE t.id = instances.id"
                    " AND t.key = ? AND t.value = ?)"
                )
                args += [key, value]
        args.append(size + 1)
        with self._failing():
            cursor = self._connect().execute(
                "SELECT record, id, ino, mtime_ns, size FROM instances"
                f" WHERE {where} ORDER BY name, id LIMIT ?",
                args,
            )
        found: list[tuple[str, str, int, int, int]] = []
        try:
            while True:
                with self._failing():
                    rows = cursor.fetchmany(_BATCH)
                if not rows:
                    return found, False
                for row in rows:
                    if len(found) == size:
                        return found, True
                    found.append(row)
        finally:
            cursor.close()
