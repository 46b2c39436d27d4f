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
missing, of another schema, unreadable, or whose first build was cut short is built again
from every record (:meth:`rebuild`): deleting ``index.sqlite*`` is always safe.
"""

from __future__ import annotations

import contextlib
import json
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

#: the index file, in the compute directory (SQLite adds ``-wal`` and ``-shm`` beside it)
INDEX = "index.sqlite"
#: the layout of the tables below; another value is rebuilt
SCHEMA = "2"
#: states whose instances are not listed and do not hold their name
HIDDEN = ("terminated", "pending")
#: rows fetched from SQLite at a time while a filtered page is filled
_BATCH = 256

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_name ON instances (name, id);
CREATE TABLE IF NOT EXISTS tags (
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (id, key)
);
CREATE TABLE IF NOT EXISTS dirty (id TEXT PRIMARY KEY);
"""

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
        read_record: ReadRecord,
        list_ids: ListIds,
        lock: Callable[[], contextlib.AbstractContextManager[None]],
        holding: Callable[[], bool],
        error: Callable[[str], ComputeError],
    ) -> None:
        self.path = compute_dir / INDEX
        self._read_record = read_record
        self._list_ids = list_ids
        self._lock = lock
        self._holding = holding
        self._error = error
        self._local = threading.local()
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
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- keeping it right -------------------------------------------------------------------

    def _meta(self, db: sqlite3.Connection) -> dict[str, str]:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def _usable(self) -> bool:
        """Built, of this schema, and nothing marked dirty."""
        try:
            db = self._connect()
            self.stats.queries += 1
            row = db.execute(
                "SELECT (SELECT value FROM meta WHERE key = 'schema'),"
                " (SELECT value FROM meta WHERE key = 'built'),"
                " EXISTS (SELECT 1 FROM dirty)"
            ).fetchone()
            return bool(row == (SCHEMA, "1", 0))
        except sqlite3.DatabaseError:
            return False

    def ready(self) -> None:
        """Make the index right before it is read: under the compute lock, repair or rebuild
        it; otherwise, when it needs either, take the lock to do so."""
        with self._failing():
            if self._holding():
                self.repair()
            elif not self._usable():
                with self._lock():
                    self.repair()

    def repair(self) -> None:
        """Under the compute lock: rebuild the index if it is not built (or not readable),
        else bring each id marked dirty up to its record on disk."""
        try:
            db = self._connect()
            meta = self._meta(db)
            if meta.get("schema") != SCHEMA or meta.get("built") != "1":
                self.rebuild()
                return
            dirty = [row[0] for row in db.execute("SELECT id FROM dirty").fetchall()]
            for instance_id in dirty:
                record = self._read_record(instance_id)
                self.stats.records_read += 1
                self.stats.repaired.append(instance_id)
                with self._transaction(db):
                    self._put(db, instance_id, record)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # locked, or cannot be opened: rebuilding would not help
            self.rebuild()  # not a database (damaged): made anew from the records

    def rebuild(self) -> None:
        """Under the compute lock: build the index anew from every record on disk (an
        unreadable index file is removed first)."""
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
        with self._transaction(db):
            db.execute("DELETE FROM instances")
            db.execute("DELETE FROM tags")
            db.execute("DELETE FROM dirty")
            db.execute("DELETE FROM meta")
            for instance_id in self._list_ids():
                self.stats.records_read += 1
                record = self._read_record(instance_id)
                if record is not None:
                    self._put(db, instance_id, record)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)", [("schema", SCHEMA), ("built", "1")]
            )

    @staticmethod
    def _put(db: sqlite3.Connection, instance_id: str, record: Mapping[str, Any] | None) -> None:
        db.execute("DELETE FROM dirty WHERE id = ?", (instance_id,))
        db.execute("DELETE FROM tags WHERE id = ?", (instance_id,))
        if record is None:
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO instances (id, name, state, record) VALUES (?, ?, ?, ?)",
                (instance_id, record["name"], record["state"], json.dumps(record)),
            )
            db.executemany(
                "INSERT INTO tags (id, key, value) VALUES (?, ?, ?)",
                [(instance_id, key, value) for key, value in record["tags"].items()],
            )

    @contextlib.contextmanager
    def changing(self, instance_id: str) -> Iterator[_Change]:
        """Under the compute lock: change ``instance_id``'s record on disk inside the block
        and say how (``stored(record)`` or ``removed()``); a block that raises, or says
        nothing, leaves the index to read the record back from disk."""
        with self._failing():
            db = self._connect()  # repaired when the lock was taken
            with self._transaction(db):
                db.execute("INSERT OR IGNORE INTO dirty (id) VALUES (?)", (instance_id,))
        change = _Change()
        try:
            yield change
        finally:
            if not change.settled:
                self.stats.records_read += 1
                change.record = self._read_record(instance_id)
            # not fsynced: lost in a power cut, it leaves the mark, and the mark a repair
            with self._failing():
                db.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._transaction(db):
                        self._put(db, instance_id, change.record)
                finally:
                    db.execute("PRAGMA synchronous=FULL")

    # -- reading ----------------------------------------------------------------------------

    def holder(self, name: str) -> str | None:
        """The id of the listed instance named ``name``, if any."""
        self.ready()
        self.stats.queries += 1
        with self._failing():
            row = (
                self._connect()
                .execute(
                    "SELECT id FROM instances WHERE name = ? AND state NOT IN (?, ?) LIMIT 1",
                    (name, *HIDDEN),
                )
                .fetchone()
            )
        return None if row is None else str(row[0])

    def page(
        self,
        after: tuple[str, str] | None,
        size: int,
        filters: Mapping[str, str | None] | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``size`` records of listed instances whose tags match ``filters`` (each
        key present and, where a value is given, equal: :meth:`Tags.matches`), in (name,
        id) order after ``after``; and whether there are more. One query, in SQL whole."""
        self.ready()
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
                f"SELECT record FROM instances WHERE {where} ORDER BY name, id LIMIT ?", args
            )
        found: list[dict[str, Any]] = []
        try:
            while True:
                with self._failing():
                    rows = cursor.fetchmany(_BATCH)
                if not rows:
                    return found, False
                for (text,) in rows:
                    if len(found) == size:
                        return found, True
                    found.append(json.loads(text))
        finally:
            cursor.close()
