"""The built-in ``sqlite`` hook: consistent copies of every SQLite database of an instance's
data directory, made with SQLite's online backup API (:class:`SqliteCopies`), and the capture
that reads those copies in place of the live files (:class:`SubstitutedCapture`). The hook
run that drives it is :class:`regionvault.core.pipeline.hooks.HookRun`; docs/hooks.md is the
user's description."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from regionvault.core.errors import HookFailed
from regionvault.core.interfaces import FileCapture
from regionvault.core.types import CaptureIssue, FileEntry, FileKind, IssueKind

__all__ = ["SQLITE_HEADER", "SqliteCopies", "SubstitutedCapture"]

log = logging.getLogger(__name__)


#: the first 16 bytes of every SQLite database file
SQLITE_HEADER = b"SQLite format 3\x00"
#: the first 4 bytes of a write-ahead log (big- or little-endian checksums)
_WAL_MAGIC = (b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")
#: files SQLite keeps beside a database; their content is folded into a backup-API copy
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
#: what SQLite says of a file that has its header but is not a database it can read
_NOT_A_DATABASE = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})
#: SQLite's own busy wait per attempt, in seconds; attempts repeat until the deadline
_SQLITE_BUSY_WAIT = 1.0


@dataclass(frozen=True)
class _Substitute:
    #: the consistent copy the capture reads instead of the live file
    copy: Path
    #: the newest mtime of the database and its side files (the entry's mtime: what a
    #: restore gives the database back)
    mtime_ns: int
    #: the copy's identity for the backup: a nonce of this run, so its change token never
    #: matches a parent point's and every backup reads the copy again (a commit that keeps
    #: the size and the newest mtime, in the same clock tick, must reach the next point);
    #: it stays the same for the whole run (a copy does not change)
    identity: tuple[int, ...]


#: how the hook opens a file it looks at: never through a symlink, never waiting on a FIFO
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _read_head(name: str, dir_fd: int, size: int) -> tuple[bytes, os.stat_result] | None:
    """The first ``size`` bytes of the regular file ``name`` in ``dir_fd`` and its stat;
    None for anything else (a symlink, a FIFO, a device) or what cannot be opened."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.pread(fd, size, 0), st
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_sqlite(name: str, dir_fd: int) -> os.stat_result | None:
    """The stat of ``name`` (in ``dir_fd``) when it is a regular file holding an SQLite
    database, by its header, as read from the descriptor the stat is of."""
    found = _read_head(name, dir_fd, len(SQLITE_HEADER))
    if found is None:
        return None
    head, st = found
    if head == SQLITE_HEADER:
        return st
    if head:
        return None
    # an empty file whose write-ahead log holds its pages (a WAL database never checkpointed)
    wal = _read_head(f"{name}-wal", dir_fd, 4)
    return st if wal is not None and wal[0] in _WAL_MAGIC else None


@dataclass(frozen=True)
class _Found:
    path: Path
    #: its path below the data directory, as a capture names it
    rel: str
    #: (device, inode) of the file found: the one SQLite must open
    inode: tuple[int, int]


#: a directory that is gone or no longer a directory when the walk opens it: not an issue
#: (the capture finds what is there now, and no database under it)
_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
#: how the walk opens a directory: never through a symlink
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _listing(fd: int) -> tuple[list[str], list[str]]:
    """The names in the directory ``fd``, sorted: (subdirectories, regular files)."""
    dirs: list[str] = []
    files: list[str] = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
    return sorted(dirs), sorted(files)


def _find_databases(data_dir: Path, issues: list[CaptureIssue]) -> Iterator[_Found]:
    """Every regular file under ``data_dir`` that is an SQLite database, by its header,
    walked with directory descriptors (no path length limit, no symlink followed, one
    descriptor per level); side files (``-wal``, ``-shm``, ``-journal``) are not looked at as
    databases. A directory the walk cannot look into is named in ``issues``: the databases
    under it are captured live."""
    #: the directories being walked: (relative path, descriptor, subdirectories left)
    stack: list[tuple[str, int, Iterator[str]]] = []

    def enter(rel: str, name: str, parent: int | None) -> list[str]:
        """Open and list one directory (pushed on ``stack``); its regular files."""
        try:
            # the data directory itself as the capture opens it; below it, no symlink
            fd = os.open(name, _DIR_FLAGS if parent is not None else _ROOT_FLAGS, dir_fd=parent)
        except OSError as exc:
            if parent is None or exc.errno not in _NOT_THERE:
                _unreachable(issues, data_dir, rel, exc)
            return []
        try:
            dirs, files = _listing(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NOT_THERE:
                _unreachable(issues, data_dir, rel, exc)
            return []
        stack.append((rel, fd, iter(dirs)))
        return files

    try:
        files = enter("", os.fspath(data_dir), None)
        while stack:
            rel, fd, below = stack[-1]
            for name in files:
                if name.endswith(_SIDE_SUFFIXES):
                    continue
                st = _is_sqlite(name, fd)
                if st is not None:
                    below_data = f"{rel}/{name}" if rel else name
                    yield _Found(data_dir / below_data, below_data, (st.st_dev, st.st_ino))
            files = []
            subdir = next(below, None)
            if subdir is None:
                stack.pop()
                os.close(fd)
            else:  # its files are looked at next, then its own subdirectories
                files = enter(f"{rel}/{subdir}" if rel else subdir, subdir, fd)
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def _unreachable(issues: list[CaptureIssue], data_dir: Path, rel: str, exc: OSError) -> None:
    issues.append(
        CaptureIssue(
            rel,
            IssueKind.HOOK,
            f"hook 'sqlite' could not look into it ({exc.strerror}); databases under it "
            "are taken as they are, possibly inconsistent",
        )
    )
    log.warning("hook 'sqlite': cannot look into %s: %s", data_dir / rel, exc.strerror)


def _newest_mtime(db: Path) -> int:
    newest = 0
    for candidate in (db, *(Path(f"{db}{s}") for s in _SIDE_SUFFIXES)):
        with contextlib.suppress(OSError):
            newest = max(newest, candidate.lstat().st_mtime_ns)
    return newest


def _open_files() -> dict[int, tuple[int, int]]:
    """This process's descriptors: each one's (device, inode)."""
    found: dict[int, tuple[int, int]] = {}
    for link in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(int(link.name))
            found[int(link.name)] = (st.st_dev, st.st_ino)
    return found


class _Replaced(Exception):
    """The database's name led SQLite to another file than the one the hook found."""


def _check_name(db: Path, inode: tuple[int, int]) -> None:
    """:class:`_Replaced` unless ``db`` names the regular file ``inode`` (not following a
    symlink)."""
    try:
        st = db.lstat()
    except OSError as exc:
        raise _Replaced(f"its name leads nowhere now: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Replaced("its name leads to something else than a regular file")
    if (st.st_dev, st.st_ino) != inode:
        raise _Replaced("its name leads to another file")


@dataclass
class SqliteCopies:
    """The built-in ``sqlite`` hook's work: a consistent copy of each database under a data
    directory, made with SQLite's online backup API in one step (one read transaction, so
    concurrent writers, WAL or rollback journal, never tear it), into ``work_dir``."""

    data_dir: Path
    work_dir: Path
    #: relative path (surrogate-escaped, as a capture names it) -> its copy
    substitutes: dict[str, _Substitute] = field(default_factory=dict)
    #: relative paths of side files the copies fold in, left out of the capture
    omitted: set[str] = field(default_factory=set)
    #: databases that could not be copied and directories the walk could not look into:
    #: captured as they are, and named in the point
    issues: list[CaptureIssue] = field(default_factory=list)

    def make(self, deadline: float, label: str) -> None:
        """Copy every database; ``label`` starts the line of a :class:`HookFailed`."""
        self.work_dir.mkdir(mode=0o700, exist_ok=True)
        run = secrets.randbits(63)
        for number, found in enumerate(_find_databases(self.data_dir, self.issues)):
            db, rel = found.path, found.rel
            copy = self.work_dir / f"{number}.db"
            mtime = _newest_mtime(db)
            try:
                self._copy(db, found.inode, copy, deadline)
            except _Replaced as exc:
                copy.unlink(missing_ok=True)
                self._taken_as_is(db, rel, f"it was replaced while the hook copied it ({exc})")
                continue
            except sqlite3.DatabaseError as exc:
                copy.unlink(missing_ok=True)
                code = getattr(exc, "sqlite_errorcode", None)
                if code is not None and (code & 0xFF) == sqlite3.SQLITE_CANTOPEN:
                    # SQLite cannot open it by its name (a path longer than SQLite's own
                    # limit, or gone): the capture still reaches it through its directories
                    self._taken_as_is(db, rel, f"SQLite cannot open it ({exc})")
                    continue
                if code is None or (code & 0xFF) not in _NOT_A_DATABASE:
                    # the copy's own side (a full disk, an I/O error) or a lock held past
                    # the deadline: the backup fails rather than take a torn database
                    why = (
                        "timed out (a writer kept the database locked)"
                        if time.monotonic() >= deadline
                        else str(exc)
                    )
                    raise HookFailed(f"{label}: cannot copy {rel!r}: {why}") from None
                # a file with SQLite's header that SQLite cannot read (damaged, encrypted
                # past its header): taken as it is, and said so
                self._taken_as_is(db, rel, f"could not copy it ({exc})")
                continue
            self.substitutes[rel] = _Substitute(copy, mtime, (run, number))
            self.omitted.update(f"{rel}{s}" for s in _SIDE_SUFFIXES)

    def _taken_as_is(self, db: Path, rel: str, why: str) -> None:
        self.issues.append(
            CaptureIssue(
                rel,
                IssueKind.HOOK,
                f"hook 'sqlite' {why}; taken as it is, possibly inconsistent",
            )
        )
        log.warning("hook 'sqlite': %s: %s; taken as it is", db, why)

    @staticmethod
    def _copy(db: Path, inode: tuple[int, int], copy: Path, deadline: float) -> None:
        def check(status: int, remaining: int, total: int) -> None:
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("deadline passed")

        # SQLite opens the database by its name, which the instance's users can point at
        # another file (a symlink to a database they may not read) after the walk looked at
        # it: the file SQLite holds open must be the one found, before anything is read
        try:
            before: dict[int, tuple[int, int]] | None = _open_files()
        except OSError:
            before = None  # no /proc: the name is looked at again instead
        # an ordinary connection, as any reader of the application's: it takes part in
        # SQLite's locking (and would recover a crashed writer's hot journal first, as the
        # application's next reader must); a read-only one would leave -wal and -shm files
        # behind beside a database no one has open. mode=rw: one removed since the walk is
        # not created again
        try:
            source = sqlite3.connect(
                f"file:{_uri_path(db)}?mode=rw", uri=True, timeout=_SQLITE_BUSY_WAIT
            )
        except sqlite3.DatabaseError:
            _check_name(db, inode)  # a FIFO put in its place fails SQLite's open
            raise
        try:
            opened = set() if before is None else set(_open_files().items()) - set(before.items())
            if not opened:
                # no /proc, or SQLite took a descriptor it kept of this inode (this process
                # has the database open elsewhere: closing one would drop its locks)
                _check_name(db, inode)
            elif all(ino != inode for _, ino in opened):
                raise _Replaced("SQLite opened another file by its name")
            target = sqlite3.connect(copy)
            try:
                # pages=-1: the whole database in one step, under one read transaction;
                # BUSY steps (a writer holding the lock) are retried until the deadline
                source.backup(target, pages=-1, progress=check, sleep=0.05)
                target.commit()
            finally:
                target.close()
        finally:
            source.close()


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(os.fsencode(path.absolute()), safe="/")


class SubstitutedCapture(FileCapture):
    """A file capture whose SQLite databases read from consistent copies.

    Wraps whatever capture the provider made: :meth:`entries` yields its entries, with each
    substituted database's size that of its copy (its path, mode, owner and xattrs the live
    file's; its mtime the newest of the database and its side files; its identity the
    copy's, new in every run, so every backup reads it again) and the side files (``-wal``,
    ``-shm``, ``-journal``) left out. A hard link to a side file left out is not a link to
    nothing: the first such name becomes a file of its own (read live, as without the hook)
    and the others link to it. :meth:`open` of a substituted database opens its copy;
    :meth:`restat` gives a substituted entry as it is (a copy does not change) and asks the
    wrapped capture about every other, as :meth:`current_identity` does."""

    def __init__(self, inner: FileCapture, copies: SqliteCopies) -> None:
        super().__init__(inner.instance, inner.taken_at)
        self.inner = inner
        self._copies = copies

    @property
    def issues(self) -> list[CaptureIssue]:
        return self.inner.issues

    @issues.setter
    def issues(self, value: list[CaptureIssue]) -> None:
        pass  # FileCapture.__init__'s start: the wrapped capture keeps the issues

    def _substitute(self, entry: FileEntry) -> _Substitute | None:
        if entry.kind is not FileKind.FILE or entry.link is not None:
            return None
        return self._copies.substitutes.get(entry.path)

    def entries(self) -> Iterator[FileEntry]:
        omitted = self._copies.omitted
        #: a side file left out -> the later name of it that now holds its data
        holder: dict[str, str] = {}
        for entry in self.inner.entries():
            if entry.path in omitted:
                continue
            if entry.link is not None and entry.link in omitted:
                first = holder.setdefault(entry.link, entry.path)
                yield replace(entry, link=None if first == entry.path else first)
                continue
            sub = self._substitute(entry)
            if sub is None:
                second = self._copies.substitutes.get(entry.path)
                if second is not None and entry.link is not None:
                    # a second name of a database: a link to the first name's copy; as the
                    # copy's, its identity holds for the whole run (as current_identity says)
                    entry = replace(entry, identity=second.identity)
                yield entry
                continue
            copied = sub.copy.stat()
            yield replace(
                entry,
                size=copied.st_size,
                mtime_ns=sub.mtime_ns,
                identity=sub.identity,
                # the copy is what is read, and nothing writes it: its own last change
                # (not the live database's) says when a read of it is settled
                changed_ns=copied.st_ctime_ns,
                source=sub.copy,
            )

    def open(self, entry: FileEntry) -> BinaryIO:
        sub = self._substitute(entry)
        if sub is None or entry.source != sub.copy:
            return self.inner.open(entry)
        return sub.copy.open("rb")

    def restat(self, entry: FileEntry) -> FileEntry | None:
        sub = self._substitute(entry)
        if sub is not None and entry.source == sub.copy:
            return entry
        return self.inner.restat(entry)

    def current_identity(self, entry: FileEntry) -> tuple[int, ...] | None:
        # by path: the engine's final check names an entry by its path alone
        sub = self._substitute(entry)
        if sub is not None:
            return sub.identity
        return self.inner.current_identity(entry)  # the wrapped capture's cheaper look

    def totals(self) -> tuple[int, int] | None:
        return self.inner.totals()

    def close(self) -> None:
        self.inner.close()
