"""Honest capture (issue 13, "What to build" 2): a backup of a live file tree takes every entry
whole or names it. A file replaced or changed while it is read is read again and recorded as
read; one that keeps changing, vanishes or cannot be read is named in the recovery point; a
change to one file after it was read (a database, while its write-ahead log is read) is caught
by the check when the capture ends; and the outcome is exit status 3 ("incomplete") through
the CLI, ``tick`` and ``run``, never 0.

Events are injected at exact moments by :class:`HookedCapture`, a live directory whose entries
carry identities (device, inode, size, mtime, ctime) as the local capture's do, with hooks
before a file is opened and after each read of its bytes."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from regionvault.core import FileCapture, Instance
from regionvault.core.errors import EntryProblem
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._backup import MAX_READS
from regionvault.core.site import Region
from regionvault.core.types import CaptureIssue, FileEntry, FileKind, IssueKind
from regionvault.providers.local.compute import LocalFileCapture
from repository_support import INSTANCE, repo_for, snapshot

#: a read of a hooked file returns at most this many bytes, so hooks run between reads
READ_STEP = 64 << 10


def identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def replace_file(path: Path, data: bytes) -> None:
    """What editors and config tools do: write a temporary file, rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class _HookedFile(io.RawIOBase):
    def __init__(self, capture: HookedCapture, entry: FileEntry, opened: int, fd: int) -> None:
        self._capture = capture
        self._entry = entry
        self._opened = opened
        self._fd = fd
        self.offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        path = self._entry.path
        error = self._capture.read_errors.get(path)
        if error is not None and self.offset:
            raise error
        data = os.read(self._fd, min(len(buffer), READ_STEP))
        buffer[: len(data)] = data
        self.offset += len(data)
        hook = self._capture.after_read.get(path)
        if hook is not None and data:
            hook(self._opened, self.offset)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class HookedCapture(FileCapture):
    """A live directory: entries with identities, :meth:`open` that refuses a file that is
    not the one walked, :meth:`restat`; and hooks at exact moments (keyed by path):
    ``before_open[path](nth open)``, ``after_read[path](nth open, bytes read so far)``,
    ``open_problems[path]`` raised by :meth:`open`, ``read_errors[path]`` raised by a read
    after the first. ``walk_issues`` are what the walk reports."""

    def __init__(self, root: Path, instance: Instance = INSTANCE) -> None:
        super().__init__(instance, datetime.now(UTC))
        self.root = root
        self.before_open: dict[str, Callable[[int], None]] = {}
        self.after_read: dict[str, Callable[[int, int], None]] = {}
        self.open_problems: dict[str, EntryProblem] = {}
        self.read_errors: dict[str, OSError] = {}
        self.walk_issues: list[CaptureIssue] = []
        self.opens: Counter[str] = Counter()
        self.restats: Counter[str] = Counter()

    def entries(self) -> Iterator[FileEntry]:
        self.issues = []
        walk = LocalFileCapture(self.instance, self.taken_at, self.root).entries()
        for walked, entry in enumerate(walk):
            if walked == 1:  # the walk meets its issues on the way
                self.issues.extend(self.walk_issues)
            yield replace(entry, identity=identity(os.lstat(self.root / entry.path)))

    def open(self, entry: FileEntry) -> BinaryIO:
        self.opens[entry.path] += 1
        opened = self.opens[entry.path]
        hook = self.before_open.get(entry.path)
        if hook is not None:
            hook(opened)
        problem = self.open_problems.get(entry.path)
        if problem is not None:
            raise problem
        try:
            fd = os.open(self.root / entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise EntryProblem(entry.path, "vanished", "was removed since the walk") from None
        if entry.identity is not None and identity(os.fstat(fd)) != entry.identity:
            os.close(fd)
            raise EntryProblem(entry.path, "changed", "is not the file that was walked")
        return _HookedFile(self, entry, opened, fd)  # type: ignore[return-value]

    def restat(self, entry: FileEntry) -> FileEntry | None:
        self.restats[entry.path] += 1
        try:
            st = os.lstat(self.root / entry.path)
        except FileNotFoundError:
            return None
        kind = (
            FileKind.DIR
            if stat.S_ISDIR(st.st_mode)
            else FileKind.SYMLINK
            if stat.S_ISLNK(st.st_mode)
            else FileKind.FILE
        )
        return FileEntry(
            path=entry.path,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            mtime_ns=st.st_mtime_ns,
            size=st.st_size if kind is FileKind.FILE else 0,
            identity=identity(st),
        )


def make_tree(root: Path, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        "etc/nf.conf": b"mode = live\n" * 20,
        "var/big.bin": rng.randbytes(700 << 10),
        "var/db/app.db": rng.randbytes(300 << 10),
        "var/db/app.db-wal": rng.randbytes(200 << 10),
        "var/log/nf.log": b"started\n" * 20000,
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    make_tree(root)
    return root


@pytest.fixture
def repo(east: Region) -> Repository:
    return repo_for(east)


def files(root: Path) -> dict[str, tuple[object, ...]]:
    """Every regular file under ``root``: mode, mtime, size and content hash. (Directories
    are recorded as walked: a file renamed into one changes its mtime after that.)"""
    return {path: v for path, v in snapshot(root).items() if v[0] == "file"}


def restored(repo: Repository, point_id: str, target: Path) -> dict[str, tuple[object, ...]]:
    repo.restore(point_id, target)
    return files(target)


def manifest_doc(repo: Repository, point_id: str) -> dict[str, Any]:
    """The manifest's plaintext JSON, as stored (sealed) in the vault."""
    store = repo._ensure_open()
    name = fmt.point_name(point_id)
    doc: dict[str, Any] = json.loads(store.get_sealed(fmt.ObjectKind.MANIFEST, name))
    return doc


# --------------------------------------------------------------------------- the rename race


def test_a_file_replaced_between_walk_and_open_is_taken_as_replaced(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    new = b"rewritten by an editor\n" * 3000  # another size than the walked file's
    cap = HookedCapture(src)
    cap.before_open["var/db/app.db"] = lambda n: n == 1 and replace_file(src / "var/db/app.db", new)
    point = repo.backup(cap)
    assert point.issues == 0  # the file read is whole: nothing to name
    assert repo.load_manifest(point.id).issues == ()
    # the tree records the new file: its bytes, size and mtime, never the walked size
    assert restored(repo, point.id, tmp_path / "out") == files(src)
    assert (tmp_path / "out" / "var/db/app.db").read_bytes() == new
    assert cap.opens["var/db/app.db"] == 2


def test_a_file_replaced_between_reads_is_taken_whole_never_a_mix(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    old = (src / "var/big.bin").read_bytes()
    new = random.Random(7).randbytes(500 << 10)
    cap = HookedCapture(src)

    def swap(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:  # a first piece of the old file is read
            replace_file(src / "var/big.bin", new)

    cap.after_read["var/big.bin"] = swap
    point = repo.backup(cap)
    assert point.issues == 0
    got = restored(repo, point.id, tmp_path / "out")
    data = (tmp_path / "out" / "var/big.bin").read_bytes()
    assert data in (old, new)
    assert data == new  # the path names the new file once the old one is read
    assert got == files(src)  # size and mtime of the file read
    assert cap.opens["var/big.bin"] == 2


def test_a_file_that_keeps_changing_is_read_a_bounded_number_of_times_then_named(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    path = src / "var/log/nf.log"
    cap = HookedCapture(src)

    def append(opened: int, offset: int) -> None:
        if offset == READ_STEP:  # every read sees the log grow under it
            with path.open("ab") as f:
                f.write(f"line written during read {opened}\n".encode())

    cap.after_read["var/log/nf.log"] = append
    point = repo.backup(cap)
    assert cap.opens["var/log/nf.log"] == MAX_READS
    assert point.issues == 1
    (issue,) = repo.load_manifest(point.id).issues
    assert issue.path == "var/log/nf.log"
    assert issue.kind is IssueKind.CHANGED
    assert f"{MAX_READS} times" in issue.message
    # the last read is kept as read: the file up to the end that read found (before or
    # after its own append), with none of the abandoned reads' chunks in its record
    repo.restore(point.id, tmp_path / "out")
    kept = (tmp_path / "out" / "var/log/nf.log").read_bytes()
    now = path.read_bytes()
    last = f"line written during read {MAX_READS}\n".encode()
    assert kept in (now, now.removesuffix(last))
    assert f"line written during read {MAX_READS - 1}\n".encode() in kept
    # every other file is taken as it is
    got, want = files(tmp_path / "out"), files(src)
    del got["var/log/nf.log"], want["var/log/nf.log"]
    assert got == want


# --------------------------------------------------------------------------- entries left out


def test_vanished_and_unreadable_files_are_named_and_the_rest_committed(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    cap = HookedCapture(src)
    cap.before_open["var/db/app.db-wal"] = lambda n: (src / "var/db/app.db-wal").unlink()
    cap.open_problems["etc/nf.conf"] = EntryProblem(
        "etc/nf.conf", "unreadable", "cannot be opened: Permission denied"
    )
    cap.read_errors["var/big.bin"] = OSError(errno.EIO, "Input/output error")
    point = repo.backup(cap)
    assert point.issues == 3
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [  # in capture order
        ("etc/nf.conf", IssueKind.UNREADABLE),
        ("var/big.bin", IssueKind.UNREADABLE),
        ("var/db/app.db-wal", IssueKind.VANISHED),
    ]
    assert "Permission denied" in issues[0].message
    assert "Input/output error" in issues[1].message
    want = files(src)
    del want["etc/nf.conf"], want["var/big.bin"]
    assert restored(repo, point.id, tmp_path / "out") == want


def test_walk_issues_join_the_points_issues(repo: Repository, src: Path) -> None:
    cap = HookedCapture(src)
    walked = CaptureIssue("var/private", IssueKind.UNREADABLE, "cannot list: Permission denied")
    cap.walk_issues.append(walked)
    point = repo.backup(cap)
    assert point.issues == 1
    assert repo.load_manifest(point.id).issues == (walked,)


# --------------------------------------------------------------------------- the final check


def test_the_final_check_catches_a_file_changed_after_it_was_read(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    """A database and its write-ahead log: the database is read, then changes (a
    checkpoint) while the log is read. Each file alone was read whole; together they are
    torn, and only the check at the end can tell."""
    db = src / "var/db/app.db"
    before = db.read_bytes()
    cap = HookedCapture(src)

    def checkpoint(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:
            with db.open("r+b") as f:
                f.seek(4096)
                f.write(b"checkpointed page")

    cap.after_read["var/db/app.db-wal"] = checkpoint
    point = repo.backup(cap)
    assert cap.opens["var/db/app.db"] == 1  # read once: it had not changed by then
    assert point.issues == 1
    (issue,) = repo.load_manifest(point.id).issues
    assert (issue.path, issue.kind) == ("var/db/app.db", IssueKind.CHANGED)
    assert "after it was read" in issue.message
    repo.restore(point.id, tmp_path / "out")
    assert (tmp_path / "out/var/db/app.db").read_bytes() == before  # as read


def test_the_final_check_ignores_files_created_or_removed_after_the_walk(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    cap = HookedCapture(src)

    def churn(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:
            (src / "etc/nf.conf").unlink()  # read already: the point holds it as read
            (src / "var/db/new.tmp").write_bytes(b"created after the walk")

    cap.after_read["var/log/nf.log"] = churn
    point = repo.backup(cap)
    assert point.issues == 0
    assert "etc/nf.conf" in restored(repo, point.id, tmp_path / "out")


def test_a_snapshot_capture_is_not_checked_again(repo: Repository, src: Path) -> None:
    """Entries without an identity (a capture that cannot change) cost no restat."""
    cap = HookedCapture(src)
    original = cap.entries

    def without_identity() -> Iterator[FileEntry]:
        for entry in original():
            yield replace(entry, identity=None)

    cap.entries = without_identity  # type: ignore[method-assign]
    point = repo.backup(cap)
    assert point.issues == 0
    assert sum(cap.restats.values()) == 0


def test_an_unchanged_file_costs_one_restat(repo: Repository, src: Path) -> None:
    cap = HookedCapture(src)
    point = repo.backup(cap)
    assert point.issues == 0
    taken = list(files(src))
    assert all(cap.opens[p] == 1 for p in taken)
    # one after the read, one in the check at the end
    assert all(cap.restats[p] == 2 for p in taken)


def test_a_complete_backup_records_no_issues(repo: Repository, src: Path) -> None:
    point = repo.backup(HookedCapture(src))
    assert point.issues == 0
    assert "issues" not in manifest_doc(repo, point.id)
