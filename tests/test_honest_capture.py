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
import functools
import io
import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from cli_support import ok, run
from click.testing import Result
from clock_support import clear_of_day_end
from regionvault.core import FileCapture, Instance
from regionvault.core.errors import EntryProblem
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._backup import MAX_READS, SETTLE_NS
from regionvault.core.site import Region, Site
from regionvault.core.types import CaptureIssue, FileEntry, FileKind, IssueKind
from regionvault.providers.local.compute import LocalCompute, LocalFileCapture
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
        self.looks: Counter[str] = Counter()
        self.listed: Counter[str] = Counter()

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

    def current_identity(self, entry: FileEntry) -> tuple[int, ...] | None:
        self.looks[entry.path] += 1
        try:
            return identity(os.lstat(self.root / entry.path))
        except FileNotFoundError:
            return None

    def names(self, entry: FileEntry) -> list[str] | None:
        self.listed[entry.path] += 1
        try:
            return [p.name for p in (self.root / entry.path).iterdir()]
        except FileNotFoundError:
            return None

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


def settle() -> None:
    """Let the files just written settle: a backup reads a file changed within
    :data:`SETTLE_NS` before its read began once more (a write in the same clock tick would
    not show in its timestamps), and these tests count reads."""
    time.sleep(2 * SETTLE_NS / 1e9)


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
    settle()
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

    def editor(opened: int) -> None:
        if opened == 1:
            replace_file(src / "var/db/app.db", new)

    cap.before_open["var/db/app.db"] = editor
    point = repo.backup(cap)
    assert point.issues == 0  # the file read is whole: nothing to name
    assert repo.load_manifest(point.id).issues == ()
    # the tree records the new file: its bytes, size and mtime, never the walked size
    assert restored(repo, point.id, tmp_path / "out") == files(src)
    assert (tmp_path / "out" / "var/db/app.db").read_bytes() == new
    # the walked file, then the new one; once more when that read began within SETTLE_NS
    # of the write (a write in the same clock tick would not show), which a loaded machine
    # may not manage: the read then settled already
    assert cap.opens["var/db/app.db"] in (2, 3)


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
    # the third read: the new file's second read began within SETTLE_NS of its writing
    assert cap.opens["var/big.bin"] in (2, 3)


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

    def remove(opened: int) -> None:
        (src / "var/db/app.db-wal").unlink()

    cap.before_open["var/db/app.db-wal"] = remove
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


def test_a_file_removed_as_it_is_read_is_kept_as_read_and_named(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    wal = src / "var/db/app.db-wal"
    data = wal.read_bytes()
    cap = HookedCapture(src)

    def remove(opened: int, offset: int) -> None:
        if offset == len(data):  # the last bytes are read: nothing can look at it again
            wal.unlink()

    cap.after_read["var/db/app.db-wal"] = remove
    point = repo.backup(cap)
    (issue,) = repo.load_manifest(point.id).issues
    assert (issue.path, issue.kind) == ("var/db/app.db-wal", IssueKind.VANISHED)
    repo.restore(point.id, tmp_path / "out")
    assert (tmp_path / "out/var/db/app.db-wal").read_bytes() == data


def test_a_hard_link_to_a_file_left_out_is_left_out_and_named(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    os.link(src / "var/big.bin", src / "var/db/big-link.bin")
    cap = HookedCapture(src)
    links = [e for e in cap.entries() if e.link is not None]
    assert [(e.path, e.link) for e in links] == [("var/db/big-link.bin", "var/big.bin")]
    cap.open_problems["var/big.bin"] = unreadable("var/big.bin")
    point = repo.backup(cap)
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [
        ("var/big.bin", IssueKind.UNREADABLE),
        ("var/db/big-link.bin", IssueKind.UNREADABLE),
    ]
    assert "a hard link to 'var/big.bin'" in issues[1].message
    got = restored(repo, point.id, tmp_path / "out")
    assert "var/big.bin" not in got and "var/db/big-link.bin" not in got
    # taken whole, the link is kept, and restores as a link
    point = repo.backup(HookedCapture(src))
    assert point.issues == 0
    repo.restore(point.id, tmp_path / "whole")
    a, b = (tmp_path / "whole/var/big.bin").stat(), (tmp_path / "whole/var/db/big-link.bin").stat()
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


def test_the_local_capture_tells_an_identity_with_one_stat(src: Path) -> None:
    cap = LocalFileCapture(INSTANCE, datetime.now(UTC), src)
    entries = {e.path: e for e in cap.entries()}
    wal = entries["var/db/app.db-wal"]
    assert cap.current_identity(wal) == wal.identity
    (src / "var/db/app.db-wal").write_bytes(b"checkpointed")
    restatted = cap.restat(wal)
    assert restatted is not None and cap.current_identity(wal) == restatted.identity
    assert cap.current_identity(wal) != wal.identity
    (src / "var/db/app.db-wal").unlink()
    assert cap.current_identity(wal) is None


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
    assert sum(cap.restats.values()) + sum(cap.looks.values()) == 0


def test_an_unchanged_file_costs_two_looks_at_its_identity(repo: Repository, src: Path) -> None:
    cap = HookedCapture(src)
    point = repo.backup(cap)
    assert point.issues == 0
    taken = list(files(src))
    assert all(cap.opens[p] == 1 for p in taken)
    # one after the read, one in the check at the end; no restat (a whole entry)
    assert all(cap.looks[p] == 2 for p in taken)
    assert sum(cap.restats.values()) == 0


def test_a_capture_without_a_cheaper_look_is_restatted(repo: Repository, src: Path) -> None:
    """``current_identity``'s default asks ``restat``."""
    cap = HookedCapture(src)
    cap.current_identity = functools.partial(FileCapture.current_identity, cap)  # type: ignore[method-assign]
    cap.after_read["var/db/app.db-wal"] = lambda opened, offset: (
        opened == 1 and offset == READ_STEP and (src / "var/db/app.db").touch()
    )
    point = repo.backup(cap)
    (issue,) = repo.load_manifest(point.id).issues
    assert (issue.path, issue.kind) == ("var/db/app.db", IssueKind.CHANGED)
    assert all(cap.restats[p] == 2 for p in files(src))


def test_a_complete_backup_records_no_issues(repo: Repository, src: Path) -> None:
    point = repo.backup(HookedCapture(src))
    assert point.issues == 0
    assert "issues" not in manifest_doc(repo, point.id)


# --------------------------------------------------------------------------- through the CLI


class Injected:
    """What every capture the local provider makes in a test is hooked with (see
    :class:`HookedCapture`)."""

    def __init__(self) -> None:
        self.before_open: dict[str, Callable[[int], None]] = {}
        self.after_read: dict[str, Callable[[int, int], None]] = {}
        self.open_problems: dict[str, EntryProblem] = {}
        self.captures: list[HookedCapture] = []


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch) -> Injected:
    injected = Injected()
    local_capture = LocalCompute.capture

    def capture(self: LocalCompute, instance_id: str, **kwargs: Any) -> HookedCapture:
        plain = local_capture(self, instance_id, **kwargs)
        assert isinstance(plain, LocalFileCapture)
        hooked = HookedCapture(plain.root, plain.instance)
        hooked.before_open = injected.before_open
        hooked.after_read = injected.after_read
        hooked.open_problems = injected.open_problems
        injected.captures.append(hooked)
        return hooked

    monkeypatch.setattr(LocalCompute, "capture", capture)
    return injected


@pytest.fixture
def nf_data(workdir: Path) -> Path:
    root = workdir / "nf-data"
    root.mkdir()
    make_tree(root)
    for i in range(7):
        (root / f"sessions/s{i}.bin").parent.mkdir(exist_ok=True)
        (root / f"sessions/s{i}.bin").write_bytes(random.Random(i).randbytes(4096))
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", root)
    return root


def unreadable(path: str) -> EntryProblem:
    return EntryProblem(path, "unreadable", "cannot be opened: Permission denied")


def assert_incomplete(result: Result, *named: str) -> str:
    """Exit 3, the point id alone on the last line of standard output, the entries named
    on standard error as warnings, no traceback; the point id."""
    assert result.exit_code == 3, (result.stdout, result.stderr)
    point = result.stdout.splitlines()[-1]
    assert len(point) == 32 and int(point, 16) >= 0
    assert "Traceback" not in result.stderr + result.stdout
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert all(line.startswith("regionvault: warning: ") for line in warnings), warnings
    for path in named:
        assert any(f"regionvault: warning: {path}: " in line for line in warnings), path
    return point


def test_backup_names_what_it_did_not_take_and_exits_3(
    injected: Injected, nf_data: Path, workdir: Path
) -> None:
    log = nf_data / "var/log/nf.log"

    def append(opened: int, offset: int) -> None:
        if offset == READ_STEP:
            with log.open("ab") as f:
                f.write(b"still logging\n")

    injected.after_read["var/log/nf.log"] = append
    for i in range(7):
        injected.open_problems[f"sessions/s{i}.bin"] = unreadable(f"sessions/s{i}.bin")
    result = run("backup", "nf1")
    point = assert_incomplete(result, "sessions/s0.bin", "sessions/s4.bin")
    lines = result.stderr.splitlines()
    assert "incomplete: 8 entries not taken whole" in lines[0]
    # the summary comes last: the 7 unreadable files are not counted new, the log read
    # twice is counted once, and every byte stored was read, so no ratio below 1
    summary = lines.pop()
    assert summary.startswith("files: 5 new, 0 changed, 0 unchanged, 7 not taken; "), summary
    assert float(summary.rsplit(" ", 1)[1].rstrip("x").replace(",", "")) >= 1.0, summary
    # the first few are named, in capture order, then counted
    assert lines[1:] == [
        *(
            f"regionvault: warning: sessions/s{i}.bin: cannot be opened: Permission denied"
            for i in range(5)
        ),
        "regionvault: warning: ... and 3 more",
    ]
    # what was taken is committed, and restores as it was
    out = workdir / "out"
    restore = ok("restore", point, "--region", "east", "--target", out)
    # ... and says so again: the point itself is not whole
    assert restore.stderr.splitlines()[:2] == [
        f"regionvault: warning: point {point} is incomplete: 8 entries not taken whole "
        "when it was backed up",
        "regionvault: warning: sessions/s0.bin: cannot be opened: Permission denied",
    ]
    want = files(nf_data)
    for i in range(7):
        del want[f"sessions/s{i}.bin"]
    del want["var/log/nf.log"]
    got = files(out)
    assert got.pop("var/log/nf.log")[0] == "file"  # kept as last read
    assert got == want
    # points and status say the point is incomplete
    (listed,) = json.loads(ok("points", "--json").stdout)
    assert (listed["id"], listed["issues"], listed["incomplete"]) == (point, 8, True)
    assert ok("points").stdout.rstrip("\n").endswith("\t8")
    rows = {r["region"]: r for r in json.loads(ok("status", "--json").stdout)}
    assert rows["local:east"]["newest_issues"] == 8
    assert "8 (incomplete)" in ok("status").stdout
    engine = Engine(Site.load(workdir / "site.toml"))
    issues = engine.point_issues(engine.find_point(point))
    assert [(i.path, i.kind) for i in issues] == [
        *((f"sessions/s{i}.bin", IssueKind.UNREADABLE) for i in range(7)),
        ("var/log/nf.log", IssueKind.CHANGED),
    ]
    # a copy is as incomplete as its source, and the copy command says so too
    copied = ok("copy", point, "--to", "west")
    copy_id = copied.stdout.splitlines()[-1]
    assert (
        f"regionvault: warning: point {copy_id} is incomplete: 8 entries not taken whole "
        "when its source was backed up"
    ) in copied.stderr.splitlines()


#: a real ``regionvault`` process whose local captures are hooked: one file cannot be opened
HOOKED_MAIN = """
import sys
from regionvault.core.cli import main
from regionvault.core.errors import EntryProblem
from regionvault.providers.local.compute import LocalCompute
from test_honest_capture import HookedCapture

local_capture = LocalCompute.capture

def capture(self, instance_id, **kwargs):
    plain = local_capture(self, instance_id, **kwargs)
    hooked = HookedCapture(plain.root, plain.instance)
    hooked.open_problems["etc/nf.conf"] = EntryProblem(
        "etc/nf.conf", "unreadable", "cannot be opened: Permission denied"
    )
    return hooked

LocalCompute.capture = capture
main(sys.argv[1:])
"""


def test_a_backup_process_exits_3_with_the_point_id_last(workdir: Path, nf_data: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", HOOKED_MAIN, "backup", "nf1"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    point = done.stdout.splitlines()[-1]
    assert done.stdout == point + "\n" and len(point) == 32
    assert done.stderr.splitlines()[1:-1] == [
        "regionvault: warning: etc/nf.conf: cannot be opened: Permission denied"
    ]
    assert done.stderr.splitlines()[-1].startswith("files: ")  # the summary, last
    # without the hook, the same backup is complete: exit 0, no warning
    again = subprocess.run(
        [str(Path(sys.executable).parent / "regionvault"), "backup", "nf1"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "warning" not in again.stderr


def test_a_failure_of_the_whole_backup_commits_nothing_and_exits_1(
    workdir: Path, nf_data: Path
) -> None:
    shutil.rmtree(nf_data)  # the data root itself is gone
    result = run("backup", "nf1")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("regionvault: error: ") and "nf-data" in line
    assert json.loads(ok("points", "--json").stdout) == []


def test_a_copy_keeps_the_issues_of_its_point(
    injected: Injected, nf_data: Path, workdir: Path
) -> None:
    injected.open_problems["etc/nf.conf"] = unreadable("etc/nf.conf")
    point = assert_incomplete(run("backup", "nf1"), "etc/nf.conf")
    copy = ok("copy", point, "--to", "west").stdout.splitlines()[-1]
    engine = Engine(Site.load(workdir / "site.toml"))
    copied = engine.find_point(copy, "west")
    assert copied.issues == 1 and copied.lineage is not None
    assert engine.point_issues(copied) == engine.point_issues(engine.find_point(point))
    assert [(i.path, i.kind) for i in engine.point_issues(copied)] == [
        ("etc/nf.conf", IssueKind.UNREADABLE)
    ]


def test_tick_and_run_report_incomplete_backups_and_exit_3(
    injected: Injected, nf_data: Path, workdir: Path
) -> None:
    injected.open_problems["etc/nf.conf"] = unreadable("etc/nf.conf")
    clear_of_day_end()  # the second tick must find the first one's daily slot done
    result = run("tick", "--json")
    assert result.exit_code == 3, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["outcome"] == "incomplete"
    (backup,) = [j for j in report["jobs"] if j["kind"] == "backup"]
    assert (backup["status"], backup["outcome"]) == ("done", "incomplete")
    assert backup["issues"] == {
        "total": 1,
        "listed": [
            {
                "path": "etc/nf.conf",
                "kind": "unreadable",
                "message": "cannot be opened: Permission denied",
            }
        ],
    }
    # the incomplete point is copied like any other (and its copy says it is incomplete)
    (copy,) = [j for j in report["jobs"] if j["kind"] == "copy"]
    assert copy["outcome"] == "ok"
    assert all(j["outcome"] == "ok" for j in report["jobs"] if j is not backup)
    # the ledger has the slot done (the point exists), and says it is incomplete
    recorded = JobLedger(workdir / ".regionvault").record(backup["key"])
    assert recorded is not None and recorded.incomplete and recorded.issues_total == 1
    # the next tick does not back it up again for the same slot: nothing incomplete ran
    again = run("tick")
    assert again.exit_code == 0, (again.stdout, again.stderr)

    # the text form names the job and its entries
    ok("points")  # (a listing of both points)
    engine = Engine(Site.load(workdir / "site.toml"))
    engine.ledger().forget(backup["key"])
    east = engine.repository("east")
    east.forget([point.id for point in east.points()])
    text = run("tick")
    assert text.exit_code == 3, (text.stdout, text.stderr)
    assert any(
        line.startswith("incomplete backup/local:east/") and "1 entry not taken whole" in line
        for line in text.stdout.splitlines()
    ), text.stdout
    assert "  etc/nf.conf: cannot be opened: Permission denied" in text.stdout.splitlines()
    assert text.stderr.splitlines()[-1] == (
        "regionvault: warning: 1 job(s) incomplete: see their issues above"
    )

    # run: the same outcomes, and the same exit status over all its ticks
    engine.ledger().forget(backup["key"])
    east.forget([point.id for point in east.points()])
    ran = run("run", "--max-ticks", "1", "--interval", "1s")
    assert ran.exit_code == 3, (ran.stdout, ran.stderr)
    assert "incomplete backup/local:east/" in ran.stdout
    assert "regionvault: stopped after 1 tick(s)" in ran.stderr


def test_a_job_outcome_keeps_its_issues_through_json() -> None:
    from regionvault.core.pipeline.jobs import JobOutcome, JobStatus

    issue = CaptureIssue("db/app.db", IssueKind.CHANGED, "changed after it was read")
    outcome = JobOutcome(
        "backup/local:east/i-1/2026-12-07T00:00Z",
        "backup",
        "local:east",
        JobStatus.DONE,
        result={"point": "ab" * 16, "issues": 2},
        issues=(issue,),
        issues_total=2,
    )
    assert outcome.ok and outcome.incomplete and outcome.outcome == "incomplete"
    data = json.loads(json.dumps(outcome.to_dict()))
    assert data["outcome"] == "incomplete"
    assert data["issues"]["total"] == 2
    assert JobOutcome.from_dict(data) == outcome
    complete = replace(outcome, issues=(), issues_total=0)
    assert complete.outcome == "ok" and complete.to_dict()["issues"] is None


# --------------------------------------------------------------------------- a real workload

#: accounts in the test database; every transaction moves one unit between two of them, so
#: their sum is the same in every state the database was ever in
ACCOUNTS = 3000
TRIALS = 5


def _create_db(path: Path) -> None:
    rng = random.Random(13)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, balance INTEGER, note BLOB)")
        conn.executemany(
            "INSERT INTO account VALUES (?, 100, ?)",
            ((i, rng.randbytes(700)) for i in range(ACCOUNTS)),
        )
    conn.close()


def _write_until(path: Path, stop: threading.Event, seed: int) -> None:
    """Transfers until ``stop`` (at most 200,000 transactions or 60 seconds)."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, timeout=30)
    try:
        deadline = time.monotonic() + 60
        for _ in range(200_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            a, b = rng.randrange(ACCOUNTS), rng.randrange(ACCOUNTS)
            with conn:
                conn.execute("UPDATE account SET balance = balance - 1 WHERE id = ?", (a,))
                conn.execute(
                    "UPDATE account SET balance = balance + 1, note = ? WHERE id = ?",
                    (rng.randbytes(700), b),
                )
    finally:
        conn.close()


def _consistent(path: Path) -> bool:
    """``PRAGMA integrity_check`` passes and the balances add up."""
    try:
        conn = sqlite3.connect(path)
        try:
            (check,) = conn.execute("PRAGMA integrity_check").fetchone()
            (total,) = conn.execute("SELECT sum(balance) FROM account").fetchone()
            return bool(check == "ok" and total == 100 * ACCOUNTS)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False


def test_a_live_sqlite_database_never_backs_up_torn_with_exit_0(workdir: Path) -> None:
    """A database in WAL mode under a writer, backed up through the local provider without
    a hook: either the backup names changed entries (exit 3), or the restored database is
    consistent. Never exit 0 over a torn database."""
    data = workdir / "db-data"
    data.mkdir()
    db = data / "app.db"
    _create_db(db)
    walked = LocalFileCapture(INSTANCE, datetime.now(UTC), data).entries()
    assert all(e.identity is not None for e in walked), "the local capture gives no identity"
    ok("instances", "add", "--region", "east", "--name", "db1", "--data", data)
    for trial in range(TRIALS):
        stop = threading.Event()
        writer = threading.Thread(target=_write_until, args=(db, stop, trial), daemon=True)
        writer.start()
        try:
            result = run("backup", "db1")
        finally:
            stop.set()
            writer.join(90)
        assert result.exit_code in (0, 3), (result.stdout, result.stderr)
        point = result.stdout.splitlines()[-1]
        out = workdir / f"restored-{trial}"
        ok("restore", point, "--region", "east", "--target", out)
        if result.exit_code == 0:
            assert _consistent(out / "app.db"), f"trial {trial}: exit 0 over a torn database"
        else:
            assert "app.db" in result.stderr, result.stderr


def test_the_entries_taken_are_held_compactly_and_read_back_in_order() -> None:
    """The final check's record of what was taken: front-coded paths (any bytes, any
    length), a kind byte and an 8-byte identity digest; about 20 bytes for a short name."""
    from regionvault.core.repository._backup_walk import TakenEntries

    paths = [f"var/spool/d{d:02}/msg-{f:05}".encode() for d in range(20) for f in range(100)]
    paths += [b"x" * 300 + b"/" + b"\xff\xfe" * 200, b"x" * 300 + b"/z" * 2000, b"top"]
    taken = TakenEntries()
    for i, path in enumerate(paths):
        taken.add(path, FileKind.SYMLINK if i % 2 else FileKind.FILE, (1, i, 2, 3, 4))
    got = list(taken)
    assert [(path, kind) for path, kind, _ in got] == [
        (path, FileKind.SYMLINK if i % 2 else FileKind.FILE) for i, path in enumerate(paths)
    ]
    assert len({digest for _, _, digest in got}) == len(paths)
    assert len(taken._buf) < 21 * 2000 + 5000  # the long paths cost their unshared bytes


# --------------------------------------------------------------------------- in-place edits


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_read_again(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    """Size, mtime and mode say nothing of a file rewritten in place whose mtime was put
    back (a tool that preserves timestamps, or two writes within the mtime's granularity):
    the record keeps a digest of the file's identity (its ctime moves with every write), so
    the next backup reads it again instead of taking the parent's stale chunks."""
    conf = src / "etc/nf.conf"
    repo.backup(HookedCapture(src))
    st = conf.stat()
    with conf.open("r+b") as f:  # same size, same mtime: only the ctime moves
        f.write(b"mode = test")
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (conf.stat().st_size, conf.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    settle()
    cap = HookedCapture(src)
    second = repo.backup(cap)
    assert cap.opens["etc/nf.conf"] == 1  # read again ...
    assert all(cap.opens[p] == 0 for p in files(src) if p != "etc/nf.conf")  # ... alone
    assert restored(repo, second.id, tmp_path / "out") == files(src)
    assert (tmp_path / "out/etc/nf.conf").read_bytes().startswith(b"mode = test")
    # and once taken, it is taken from the parent again
    cap = HookedCapture(src)
    repo.backup(cap)
    assert sum(cap.opens.values()) == 0


# --------------------------------------------------------------------------- review findings


def test_a_hard_link_whose_first_name_is_replaced_keeps_its_own_data(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    """A and B are one file; an editor saves A (a new file renamed over it) before A is
    read. A is read as it is now; B still names the old file, so it is no longer a link to
    A: it is read on its own, never restored with A's new data."""
    big, link = src / "var/big.bin", src / "var/db/big-link.bin"
    old, new = big.read_bytes(), b"saved by an editor\n" * 1000
    os.link(big, link)
    settle()
    cap = HookedCapture(src)
    walk = cap.entries
    link_walked = threading.Event()

    def entries() -> Iterator[FileEntry]:
        for entry in walk():
            yield entry
            if entry.path == "var/db/big-link.bin":
                assert entry.link == "var/big.bin"
                link_walked.set()
        link_walked.set()

    def editor(opened: int) -> None:
        if opened == 1:
            # once the walk has taken B as a link to A (a reader may open A sooner)
            assert link_walked.wait(30)
            replace_file(big, new)

    cap.entries = entries  # type: ignore[method-assign]

    cap.before_open["var/big.bin"] = editor
    point = repo.backup(cap)
    assert point.issues == 0
    assert restored(repo, point.id, tmp_path / "out") == files(src)
    assert (tmp_path / "out/var/big.bin").read_bytes() == new
    assert (tmp_path / "out/var/db/big-link.bin").read_bytes() == old


def test_the_final_check_covers_hard_links(repo: Repository, src: Path) -> None:
    """A hard link's path replaced after its file was read: the point records it as a link,
    which that path no longer is; the check at the end names it."""
    os.link(src / "var/big.bin", src / "var/db/big-link.bin")
    settle()
    cap = HookedCapture(src)

    def editor(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:
            replace_file(src / "var/db/big-link.bin", b"another file now")

    cap.after_read["var/log/nf.log"] = editor
    point = repo.backup(cap)
    issues = repo.load_manifest(point.id).issues
    # (its first name too: the file lost a link, which moved its ctime)
    assert ("var/db/big-link.bin", IssueKind.CHANGED) in [(i.path, i.kind) for i in issues]


class SameTickCapture(HookedCapture):
    """A coarse clock: the ``frozen`` paths keep the identity they were walked with whatever
    is written to them (every write lands in the tick of their last change), and they
    changed as they were walked."""

    def __init__(self, root: Path, frozen: str) -> None:
        super().__init__(root)
        self.frozen = frozen
        self.walked: tuple[int, ...] | None = None

    def entries(self) -> Iterator[FileEntry]:
        for entry in super().entries():
            if entry.path == self.frozen:
                self.walked = entry.identity
                entry = replace(entry, changed_ns=time.time_ns())
            yield entry

    def open(self, entry: FileEntry) -> BinaryIO:
        if entry.path == self.frozen:
            entry = replace(entry, identity=None)  # its stat tells nothing: no check
        return super().open(entry)

    def current_identity(self, entry: FileEntry) -> tuple[int, ...] | None:
        now = super().current_identity(entry)
        return self.walked if entry.path == self.frozen else now


def test_a_write_in_the_tick_of_the_last_change_is_not_taken_torn(
    repo: Repository, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A same-size write in place, in the clock tick of the file's last change, leaves its
    size, mtime and ctime as they were: the look after the read cannot see it. A file that
    changed that recently before its read began is read again once the tick is past (the
    "racy git" rule), so the point never holds a torn mix."""
    # a wide margin, so the walk and the read surely fall within it however busy the host
    monkeypatch.setattr("regionvault.core.repository._backup.SETTLE_NS", 500_000_000)
    big = src / "var/big.bin"
    new = random.Random(9).randbytes(big.stat().st_size)
    cap = SameTickCapture(src, "var/big.bin")

    def write(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:
            with big.open("r+b") as f:
                f.write(new)

    cap.after_read["var/big.bin"] = write
    point = repo.backup(cap)
    assert point.issues == 0
    repo.restore(point.id, tmp_path / "out")
    assert (tmp_path / "out/var/big.bin").read_bytes() == new  # never a mix
    assert cap.opens["var/big.bin"] == 2


def test_a_file_changed_long_before_its_read_is_read_once(repo: Repository, src: Path) -> None:
    """The rule costs nothing for a file that did not change recently."""
    cap = HookedCapture(src)
    repo.backup(cap)
    assert all(cap.opens[p] == 1 for p in files(src))


FAR_FUTURE_NS = 10_414_000_000 * 10**9  # about 2300-01-01: past the 64-bit ns range


def test_an_mtime_the_format_cannot_hold_leaves_the_entry_out_named(
    repo: Repository, src: Path, tmp_path: Path
) -> None:
    """``touch -d 2300-01-01``: any user of an instance could otherwise stop its backups."""
    far = src / "etc/far.conf"
    far.write_bytes(b"from the future")
    below = src / "var/future"
    below.mkdir()
    (below / "inside.txt").write_bytes(b"below a directory from the future")
    for path in (far, below):
        os.utime(path, ns=(FAR_FUTURE_NS, FAR_FUTURE_NS))
        if path.stat().st_mtime_ns != FAR_FUTURE_NS:
            pytest.skip("this file system does not keep such an mtime")
    settle()
    point = repo.backup(LocalFileCapture(INSTANCE, datetime.now(UTC), src))
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [
        ("etc/far.conf", IssueKind.UNREADABLE),
        ("var/future", IssueKind.UNREADABLE),
    ]
    assert all("cannot be recorded: its mtime" in i.message for i in issues)
    assert "with all below it" in issues[1].message
    got = restored(repo, point.id, tmp_path / "out")
    assert got == {p: v for p, v in files(src).items() if p != "etc/far.conf" and "future" not in p}
    assert not (tmp_path / "out/var/future").exists()


def test_a_path_longer_than_the_format_holds_leaves_the_entry_out_named(
    repo: Repository, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record bound (1 MiB) lowered to 64 bytes, as a path past it."""
    from regionvault.core.repository import _tree

    monkeypatch.setattr(fmt, "MAX_PATH_BYTES", 64)
    monkeypatch.setattr(_tree, "MAX_PATH_BYTES", 64)
    (src / "var" / ("f" * 70)).write_bytes(b"a long name")
    deep = src / "var" / ("d" * 70)
    deep.mkdir()
    (deep / "inside.txt").write_bytes(b"below a long name")
    settle()
    point = repo.backup(LocalFileCapture(INSTANCE, datetime.now(UTC), src))
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [
        ("var/" + "d" * 70, IssueKind.UNREADABLE),
        ("var/" + "f" * 70, IssueKind.UNREADABLE),
    ]
    assert all("cannot be recorded: its path is longer" in i.message for i in issues)
    got = restored(repo, point.id, tmp_path / "out")
    assert got == {p: v for p, v in files(src).items() if len(p) <= 64}


def test_an_entry_that_cannot_be_looked_at_again_is_named(repo: Repository, src: Path) -> None:
    """The check at the end meets a parent directory replaced by a symlink (ELOOP: the
    capture's "changed"): the point cannot vouch for what it holds of the entry."""
    cap = HookedCapture(src)
    look = cap.current_identity

    def replaced(entry: FileEntry) -> tuple[int, ...] | None:
        if entry.path == "etc/nf.conf" and cap.looks[entry.path] >= 1:
            raise EntryProblem(entry.path, "changed", "replaced since it was walked")
        return look(entry)

    cap.current_identity = replaced  # type: ignore[method-assign]
    point = repo.backup(cap)
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [("etc/nf.conf", IssueKind.CHANGED)]
    assert "replaced since it was walked" in issues[0].message


def test_an_entry_moved_into_a_directory_already_listed_is_named(
    repo: Repository, src: Path
) -> None:
    """A maildir: cur/ is listed, then a message moves from new/ (not listed yet) to cur/;
    the point holds it in neither. cur/ changed since it was listed: it is listed again at
    the end, and a name it did not hold, older than the capture, is named."""
    for box in ("cur", "new"):
        (src / "mail" / box).mkdir(parents=True)
    (src / "mail/cur/1.seen").write_bytes(b"read message")
    (src / "mail/new/2.unseen").write_bytes(b"delivered before the backup")
    settle()
    cap = HookedCapture(src)
    walk = cap.entries

    def entries() -> Iterator[FileEntry]:
        for entry in walk():
            yield entry
            if entry.path == "mail/cur/1.seen":  # cur/ is listed; new/ is not yet
                (src / "mail/new/2.unseen").rename(src / "mail/cur/2.unseen:2,S")

    cap.entries = entries  # type: ignore[method-assign]
    point = repo.backup(cap)
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [("mail/cur/2.unseen:2,S", IssueKind.CHANGED)]
    assert "moved here while the capture ran" in issues[0].message


def test_directories_that_did_not_change_are_not_listed_again(repo: Repository, src: Path) -> None:
    """An editor's save (a rename over the same name) and a file created after the walk
    move their directory's identity: listed again, neither is named; the other directories
    are looked at once, never listed."""
    cap = HookedCapture(src)

    def churn(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:
            replace_file(src / "etc/nf.conf", b"saved after it was read")
            (src / "var/db/new.tmp").write_bytes(b"created after the walk")

    cap.after_read["var/log/nf.log"] = churn
    point = repo.backup(cap)
    issues = repo.load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [("etc/nf.conf", IssueKind.CHANGED)]
    assert set(cap.listed) == {"etc", "var/db"}


def test_the_local_capture_lists_a_directory_again(src: Path) -> None:
    cap = LocalFileCapture(INSTANCE, datetime.now(UTC), src)
    entries = {e.path: e for e in cap.entries()}
    assert sorted(cap.names(entries["var/db"]) or ()) == ["app.db", "app.db-wal"]
    shutil.rmtree(src / "var/db")
    assert cap.names(entries["var/db"]) is None


def test_a_file_changed_under_every_read_and_just_before_the_last_is_named(
    repo: Repository, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appended to during the first two reads, whole in the third, which began just after
    the last append: a write in that tick would not show, and no read is left: named."""
    monkeypatch.setattr("regionvault.core.repository._backup.SETTLE_NS", 500_000_000)
    path = src / "var/log/nf.log"
    cap = HookedCapture(src)

    def append(opened: int, offset: int) -> None:
        if offset == READ_STEP and opened < MAX_READS:
            with path.open("ab") as f:
                f.write(f"line written during read {opened}\n".encode())

    cap.after_read["var/log/nf.log"] = append
    point = repo.backup(cap)
    assert cap.opens["var/log/nf.log"] == MAX_READS
    (issue,) = repo.load_manifest(point.id).issues
    assert (issue.path, issue.kind) == ("var/log/nf.log", IssueKind.CHANGED)
    assert "just before the last read" in issue.message
