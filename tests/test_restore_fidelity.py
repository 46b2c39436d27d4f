"""The restore side of tree fidelity and of re-runnable restores.

Tree records of every kind (what format version 2 records: owners, device numbers, hard
links, extended attributes and ACLs, names that are not UTF-8) are fed straight into the
:class:`FileRestorer` and the result compared by lstat, xattrs, content and st_blocks: as
root, and as a process that is not root (what it cannot apply is noted once per kind, the
rest restored). A tree whose paths are longer than PATH_MAX restores. A restore killed at
any moment (faults injected at the Nth write, between the moves into place, before its
marker is removed, and a real SIGKILL of a subprocess) is finished by running it again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from regionvault.core import Region, RegionVaultError
from regionvault.core.cli import cli as main
from regionvault.core.repository import (
    Repository,
    _manifest,
    _restore,
    _restore_fs,
    _restore_writer,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._restore import MARKER_NAME, FileRestorer, Selection
from regionvault.core.repository._restore_fs import TEMP_PREFIX
from regionvault.core.repository._restore_writer import Reporter
from repository_support import capture, repo_for, snapshot

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="device nodes and owners need root")
MTIME = 1_600_000_000_123_456_789
NULL_DEV = os.makedev(1, 3)
SOCKETS = "sockets not recreated (the program that listens on one makes it)"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def acl(user_id: int) -> bytes:
    """A system.posix_acl_access value: owner rw, user ``user_id`` r, group r, mask r."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 4, user_id), (0x04, 4, undefined)]
    entries += [(0x10, 4, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


class Point:
    """A backed-up directory whose tree records the tests rework into records of every
    kind (their chunks are in the vault, so the restorer reads real data)."""

    def __init__(self, region: Region, src: Path) -> None:
        self.repo = repo_for(region)
        self.id = self.repo.backup(capture(src)).id
        # as a version 1 capture records them: no owners, no xattrs (each test sets its own)
        self.records = {
            r.path: dataclasses.replace(r, uid=-1, gid=-1, user=b"", group=b"", xattrs=())
            for r in self.read_records()
        }

    def read_records(self) -> list[fmt.RawRecord]:
        store = self.repo._ensure_open()
        manifest = self.repo.load_manifest(self.id)
        with self.repo._pool() as pool:
            return list(_manifest.tree_records(store, store.load_index().index, pool, manifest))

    def restore(
        self,
        records: list[fmt.RawRecord],
        out: Path,
        selection: Selection | None = None,
    ) -> list[str]:
        repo: Repository = self.repo
        store = repo._ensure_open()
        index = store.load_index().index
        name = fmt.point_name(self.id)
        zero = bytes(store.config.chunker.max_size)
        with repo._pool() as pool:
            writer = repo._writer(store, index, pool, name, zero, Reporter(None, None, None))
            restorer = FileRestorer(writer, out, what=name, point_id=self.id)
            return restorer.run(lambda: iter(records), selection)


def source_tree(src: Path) -> None:
    rng = random.Random(13)
    (src / "dir").mkdir(parents=True)
    (src / "a.bin").write_bytes(rng.randbytes(100_000))
    (src / "dir" / "b.txt").write_bytes(b"hello\n" * 1000)
    with (src / "sparse.bin").open("wb") as f:  # holes around a little data
        f.seek(1 << 20)
        f.write(rng.randbytes(5000))
        f.truncate(3 << 20)
    (src / "suid").write_bytes(b"#!/bin/sh\n")


def every_kind(point: Point) -> list[fmt.RawRecord]:
    """The point's records made into a tree of every kind, owned by others."""
    r = point.records
    # owners by number: names that exist nowhere
    owned = {"uid": 1234, "gid": 2345, "user": b"rv-no-user", "group": b"", "mtime_ns": MTIME}
    base = dict(mode=0, mtime_ns=MTIME, size=0, target=b"", offset=0, ids=b"")

    def node(tag: int, path: bytes, mode: int, **kw: object) -> fmt.RawRecord:
        return fmt.RawRecord(tag=tag, path=path, **{**base, "mode": mode, **kw})  # type: ignore[arg-type]

    return [
        dataclasses.replace(r[b"a.bin"], **owned, xattrs=((b"user.color", b"blue"),)),
        dataclasses.replace(r[b"dir"], **owned, mode=stat.S_IFDIR | 0o750),
        dataclasses.replace(
            r[b"dir/b.txt"],
            **owned,
            mode=stat.S_IFREG | 0o640,
            xattrs=((b"system.posix_acl_access", acl(1234)),),
        ),
        # a name that is not UTF-8, with the content of a.bin; its owner by name (root exists
        # everywhere), which wins over the number
        dataclasses.replace(
            r[b"a.bin"], path=b"dir/caf\xe9.bin", uid=999, gid=999, user=b"root", group=b"root"
        ),
        node(fmt.TAG_FILE, b"dir/hard", r[b"a.bin"].mode, size=100_000, link=b"a.bin"),
        dataclasses.replace(r[b"sparse.bin"], mtime_ns=MTIME),
        # setuid and setgid survive the chown that clears them
        dataclasses.replace(r[b"suid"], **owned, mode=stat.S_IFREG | 0o6755),
        node(fmt.TAG_FIFO, b"fifo", stat.S_IFIFO | 0o640, **owned),
        node(fmt.TAG_FIFO, b"dir/fifo-too", stat.S_IFIFO | 0o640, link=b"fifo"),
        node(fmt.TAG_CHARDEV, b"null", stat.S_IFCHR | 0o666, rdev=NULL_DEV, **owned),
        node(fmt.TAG_SOCKET, b"sock", stat.S_IFSOCK | 0o755, **owned),
        node(fmt.TAG_SYMLINK, b"link", stat.S_IFLNK | 0o777, target=b"dir/b.txt", **owned),
    ]


def xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}  # fmt: skip


@needs_root
@pytest.mark.parametrize("target", ["new", "holds-a-file"])
def test_every_kind_of_entry_restores_as_root(east: Region, tmp_path: Path, target: str) -> None:
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    out = tmp_path / "out"
    if target == "holds-a-file":  # each entry made under a temporary name, then renamed
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    notes = point.restore(every_kind(point), out)

    a = (out / "a.bin").lstat()
    assert (a.st_uid, a.st_gid, a.st_mtime_ns) == (1234, 2345, MTIME)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert xattrs(out / "a.bin") == {"user.color": b"blue"}
    d = (out / "dir").lstat()
    assert (stat.S_IFMT(d.st_mode), stat.S_IMODE(d.st_mode)) == (stat.S_IFDIR, 0o750)
    assert (d.st_uid, d.st_gid, d.st_mtime_ns) == (1234, 2345, MTIME)
    b = out / "dir" / "b.txt"
    assert os.getxattr(b, "system.posix_acl_access") == acl(1234)
    assert stat.S_IMODE(b.lstat().st_mode) == 0o640
    raw = Path(os.fsdecode(os.fsencode(out) + b"/dir/caf\xe9.bin"))
    assert raw.read_bytes() == (src / "a.bin").read_bytes()
    assert (raw.lstat().st_uid, raw.lstat().st_gid) == (0, 0)
    # the hard link is the same inode as its earlier path
    hard = (out / "dir" / "hard").lstat()
    assert (hard.st_ino, hard.st_nlink) == (a.st_ino, 2)
    # sparse stays sparse: 5000 bytes of data take at most a few blocks
    sparse = (out / "sparse.bin").lstat()
    assert sparse.st_size == 3 << 20 and sparse.st_blocks * 512 <= 64 << 10
    assert (out / "sparse.bin").read_bytes() == (src / "sparse.bin").read_bytes()
    suid = (out / "suid").lstat()
    assert stat.S_IMODE(suid.st_mode) == 0o6755 and suid.st_uid == 1234
    fifo = (out / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert (fifo.st_uid, fifo.st_mtime_ns) == (1234, MTIME)
    assert (out / "dir" / "fifo-too").lstat().st_ino == fifo.st_ino
    null = (out / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == NULL_DEV
    assert (stat.S_IMODE(null.st_mode), null.st_uid, null.st_mtime_ns) == (0o666, 1234, MTIME)
    link = (out / "link").lstat()
    assert stat.S_ISLNK(link.st_mode) and (out / "link").readlink() == Path("dir/b.txt")
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (1234, 2345, MTIME)
    # a socket is listed, not made; nothing else is left over
    assert not (out / "sock").exists()
    assert notes == [
        f"sockets not recreated (the program that listens on one makes it): {out}/sock"
    ]
    made = ["a.bin", "dir", "fifo", "link", "null", "sparse.bin", "suid"]
    assert names(out) == sorted(made + (["keep.txt"] if target == "holds-a-file" else []))
    assert names(out / "dir") == sorted(["b.txt", "caf\udce9.bin", "fifo-too", "hard"])


def test_not_root_notes_each_kind_once_and_restores_the_rest(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    records = every_kind(point)
    records.append(dataclasses.replace(records[0], path=b"b.bin", uid=4321))
    null = next(r for r in records if r.path == b"null")
    records.append(dataclasses.replace(null, path=b"zero"))  # a second device
    out = tmp_path / "out"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    notes = point.restore(records, out)
    monkeypatch.undo()

    assert sorted(notes) == [
        f"device nodes not created: not running as root: {out}/null and 1 more",
        f"owners not restored: not running as root: {out}/a.bin and 7 more",
        f"{SOCKETS}: {out}/sock",
    ]
    assert not (out / "null").exists() and not (out / "zero").exists()
    me = os.geteuid()
    for name in ("a.bin", "b.bin", "dir", "fifo", "link", "suid"):
        assert (out / name).lstat().st_uid == me, name
    assert (out / "b.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "dir" / "hard").lstat().st_ino == (out / "a.bin").lstat().st_ino
    assert stat.S_ISFIFO((out / "dir" / "fifo-too").lstat().st_mode)
    assert (out / "fifo").lstat().st_mtime_ns == MTIME
    assert xattrs(out / "a.bin") == {"user.color": b"blue"}


def test_extended_attributes_the_target_refuses_are_noted_once(
    east: Region, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    # no Linux filesystem knows the namespace "vendor.": EOPNOTSUPP, as on a filesystem
    # without extended attributes
    refused = ((b"user.ok", b"1"), (b"vendor.thing", b"x"))
    records = [dataclasses.replace(r, xattrs=refused) for r in point.records.values()]
    out = tmp_path / "out"
    notes = point.restore(records, out)
    assert len(notes) == 1
    assert notes[0].startswith("extended attributes not restored (Operation not supported): ")
    assert notes[0].endswith("(vendor.thing) and 4 more")
    assert snapshot(out) == snapshot(src)
    assert xattrs(out / "a.bin") == {"user.ok": b"1"}


@needs_root
@pytest.mark.parametrize("proc", [True, False])
def test_extended_attributes_of_fifos_devices_and_symlinks(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    monkeypatch.setattr(_restore, "_PROC_FD", proc)  # without /proc: set by whole path
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    attrs = ((b"trusted.rv", b"\x00kept"),)
    records = [
        point.records[b"dir"],
        *(dataclasses.replace(r, path=b"dir/" + r.path, xattrs=attrs) for r in every_kind(point)
          if r.tag in (fmt.TAG_FIFO, fmt.TAG_CHARDEV, fmt.TAG_SYMLINK) and not r.link),
    ]  # fmt: skip
    out = tmp_path / "out"
    for target in ("new", "holds-a-file"):
        if target == "holds-a-file":
            out = tmp_path / "out2"
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        assert point.restore(records, out) == []
        for name in ("fifo", "null", "link"):
            assert xattrs(out / "dir" / name) == {"trusted.rv": b"\x00kept"}, (target, name)


def long_tree(point: Point, depth: int) -> tuple[list[fmt.RawRecord], bytes]:
    """Directories ``depth`` deep, each name 200 bytes: a file, a symlink, a FIFO and a hard
    link at the bottom."""
    r = point.records
    parts = [(b"%03d" % i) + b"d" * 197 for i in range(depth)]
    records = []
    for i in range(1, depth + 1):
        records.append(dataclasses.replace(r[b"dir"], path=b"/".join(parts[:i])))
    deep = b"/".join(parts)
    records += [
        dataclasses.replace(r[b"a.bin"], path=deep + b"/a.bin"),
        dataclasses.replace(r[b"a.bin"], path=deep + b"/hard", ids=b"", link=deep + b"/a.bin"),
        fmt.RawRecord(
            fmt.TAG_SYMLINK, stat.S_IFLNK | 0o777, MTIME, 0, deep + b"/link", b"a.bin", 0, b""
        ),
        fmt.RawRecord(fmt.TAG_FIFO, stat.S_IFIFO | 0o600, MTIME, 0, deep + b"/fifo", b"", 0, b""),
        # a sibling subtree, so that walking back up is needed too
        dataclasses.replace(r[b"dir"], path=parts[0] + b"/z"),
        dataclasses.replace(r[b"dir/b.txt"], path=parts[0] + b"/z/b.txt"),
    ]
    return records, deep


def open_deep(root: Path, deep: bytes) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in deep.split(b"/"):
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


@pytest.mark.parametrize("cache", [2, 128])
def test_paths_longer_than_path_max_restore(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: int
) -> None:
    monkeypatch.setattr(_restore_fs, "_DIR_CACHE", cache)  # 2: directories closed and re-opened
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    records, deep = long_tree(point, 26)
    assert len(deep) > 5000 > os.pathconf("/", "PC_PATH_MAX")
    out = tmp_path / "out"
    assert point.restore(records, out) == []
    fd = open_deep(out, deep)
    try:
        with open(os.open("a.bin", os.O_RDONLY, dir_fd=fd), "rb") as f:  # noqa: PTH123
            assert f.read() == (src / "a.bin").read_bytes()
        a = os.stat("a.bin", dir_fd=fd)
        assert os.stat("hard", dir_fd=fd).st_ino == a.st_ino
        assert os.readlink("link", dir_fd=fd) == "a.bin"
        assert stat.S_ISFIFO(os.stat("fifo", dir_fd=fd, follow_symlinks=False).st_mode)
        assert os.stat(".", dir_fd=fd).st_mtime_ns == point.records[b"dir"].mtime_ns
    finally:
        os.close(fd)
    first = out / os.fsdecode(deep.split(b"/")[0])
    assert (first / "z" / "b.txt").read_bytes() == (src / "dir" / "b.txt").read_bytes()
    assert names(out) == [first.name]


def test_a_hard_link_whose_earlier_path_is_not_selected_restores_its_data(
    east: Region, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    r = point.records
    records = [
        r[b"a.bin"],
        r[b"dir"],
        dataclasses.replace(r[b"a.bin"], path=b"dir/h1", ids=b"", link=b"a.bin"),
        dataclasses.replace(r[b"a.bin"], path=b"dir/h2", ids=b"", link=b"a.bin"),
    ]
    out = tmp_path / "out"
    assert point.restore(records, out, Selection(["dir"])) == []
    assert names(out) == ["dir"]
    h1, h2 = (out / "dir" / "h1"), (out / "dir" / "h2")
    assert h1.read_bytes() == (src / "a.bin").read_bytes()
    assert h1.lstat().st_ino == h2.lstat().st_ino and h1.lstat().st_nlink == 2


# -- re-runnable restores --------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: raised at an injected point, with the restorer's own clean-up
    switched off, it leaves the target as a kill at that moment would."""


@pytest.fixture
def killable(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(FileRestorer, "_discard", lambda self: None)
    return monkeypatch


def backed_up(east: Region, tmp_path: Path) -> tuple[Repository, str, Path]:
    from test_repository_roundtrip import build_tree

    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    return repo, repo.backup(capture(src)).id, src


def assert_restored(out: Path, src: Path) -> None:
    assert snapshot(out) == snapshot(src)
    assert not [p for p in out.rglob("*") if p.name.startswith((TEMP_PREFIX, MARKER_NAME))]


def kill_at(monkeypatch: pytest.MonkeyPatch, name: str, nth: int) -> None:
    real = getattr(os, name)
    calls = 0

    def call(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise Killed(f"{name} #{nth}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, call)


@pytest.mark.parametrize(
    "where",
    ["marker", "write-1", "write-5", "publish-1", "publish-2", "dir-meta", "marker-removal"],
)
def test_a_restore_killed_at_any_moment_is_finished_by_running_it_again(
    east: Region, tmp_path: Path, killable: pytest.MonkeyPatch, where: str
) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    out = tmp_path / "out"
    if where == "marker":

        def cut_short(self: FileRestorer, *args: object) -> None:
            fd = os.open(out / MARKER_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b'{"rest')
            os.close(fd)
            raise Killed()

        killable.setattr(FileRestorer, "_write_marker", cut_short)
    elif where.startswith("write-"):
        kill_at(killable, "pwritev", int(where[6:]))
    elif where.startswith("publish-"):
        kill_at(killable, "rename", int(where[8:]))
    else:

        def kill(self: FileRestorer) -> None:
            raise Killed()

        # after every entry is in place: before the directories' metadata, or the marker
        killable.setattr(FileRestorer, "_apply_dir_meta" if where == "dir-meta" else "_end", kill)
    with pytest.raises(Killed):
        repo.restore(point_id, out)
    killable.undo()
    assert (out / MARKER_NAME).exists()
    staging = [n for n in names(out) if n.startswith(TEMP_PREFIX)]
    # before the moves into place the killed run's data is hidden in its staging directory
    assert bool(staging) == (where.startswith(("write-", "publish-")))
    repo.restore(point_id, out)
    assert_restored(out, src)


def test_a_killed_restore_refuses_any_other_restore_into_its_target(
    east: Region, tmp_path: Path, killable: pytest.MonkeyPatch
) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    other = repo.backup(capture(src)).id
    out = tmp_path / "out"
    kill_at(killable, "pwritev", 2)
    with pytest.raises(Killed):
        repo.restore(point_id, out, paths=["var"])
    killable.undo()
    with pytest.raises(RegionVaultError, match=f"unfinished restore of point {point_id} "
                       r"\(paths var\): re-run that restore"):  # fmt: skip
        repo.restore(other, out, paths=["var"])
    with pytest.raises(RegionVaultError, match=f"unfinished restore of point {point_id}"):
        repo.restore(point_id, out)  # the same point, all of it: another restore
    repo.restore(point_id, out, paths=["var"])
    assert names(out) == ["var"]


def test_a_running_restore_is_not_taken_for_a_killed_one(east: Region, tmp_path: Path) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # the marker of a restore still running: it holds the lock
    fd = os.open(out / MARKER_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RegionVaultError, match="another restore into it is running"):
            repo.restore(point_id, out)
    finally:
        os.close(fd)
    repo.restore(point_id, out)  # lock gone, the marker cut short: a fresh start
    assert_restored(out, src)


def test_a_failed_restore_leaves_its_target_empty_and_unmarked(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    out = tmp_path / "out"
    kill_at(monkeypatch, "rename", 2)  # an ordinary failure this time: clean-up runs
    with pytest.raises(Killed):
        repo.restore(point_id, out)
    monkeypatch.undo()
    assert names(out) == []
    repo.restore(point_id, out)
    assert_restored(out, src)


def test_restored_data_is_made_durable_before_the_marker_is_removed(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss after the marker is gone must find every file whole: the target's
    filesystem is synced while the marker is still there, with everything in place."""
    repo, point_id, src = backed_up(east, tmp_path)
    out = tmp_path / "out"
    synced: list[tuple[int, bool, bool]] = []

    def sync(fd: int) -> None:
        restored = snapshot(out)
        marked = restored.pop(MARKER_NAME, None) is not None
        synced.append((os.fstat(fd).st_dev, marked, restored == snapshot(src)))

    monkeypatch.setattr(_restore, "sync_filesystem", sync)
    repo.restore(point_id, out, sync=True)
    assert synced == [(out.stat().st_dev, True, True)]
    assert_restored(out, src)


def test_a_restore_syncs_only_when_told(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default (as restic and borg) neither the sync at the end nor the writeback started
    per file; the restore is whole all the same, and its marker gone. ``sync=True``
    (``restore --sync``) does both."""
    repo, point_id, src = backed_up(east, tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(_restore, "sync_filesystem", lambda fd: calls.append("sync"))
    monkeypatch.setattr(_restore_writer, "start_writeback", lambda fd: calls.append("writeback"))
    repo.restore(point_id, tmp_path / "fast")
    assert calls == []
    assert_restored(tmp_path / "fast", src)
    assert not (tmp_path / "fast" / MARKER_NAME).exists()
    repo.restore(point_id, tmp_path / "durable", sync=True)
    assert calls.count("sync") == 1 and "writeback" in calls
    assert_restored(tmp_path / "durable", src)


def test_the_filesystem_sync_really_runs(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _restore_fs.sync_filesystem(fd)  # syncfs through the C library (or sync): no error
    finally:
        os.close(fd)
    if _restore_fs._SYNCFS is not None:  # syncfs reports errors (sync cannot)
        with pytest.raises(OSError):
            _restore_fs.sync_filesystem(987_654)  # a descriptor that is not open: EBADF


def test_a_top_level_entry_named_like_the_marker_is_refused_before_anything_is_written(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    source_tree(src)
    point = Point(east, src)
    r = point.records
    # capture order: ".cache" and its file come before ".rv-restore", the rest after it
    records = [
        dataclasses.replace(r[b"dir"], path=b".cache"),
        dataclasses.replace(r[b"a.bin"], path=b".cache/a.bin"),
        dataclasses.replace(r[b"suid"], path=MARKER_NAME.encode()),
        r[b"a.bin"],
        r[b"dir"],
        r[b"dir/b.txt"],
    ]
    writes = 0
    real_pwritev = os.pwritev

    def counted(*args: object, **kwargs: object) -> int:
        nonlocal writes
        writes += 1
        return real_pwritev(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwritev", counted)
    refused = f"cannot restore {tmp_path / 'out'}/{MARKER_NAME} into a new or empty directory"
    for selection in (None, Selection([MARKER_NAME]), Selection(["a.bin", MARKER_NAME])):
        out = tmp_path / "out"
        with pytest.raises(RegionVaultError, match=refused):
            point.restore(records, out, selection)
        assert writes == 0 and names(out) == []  # refused up front, the target left empty
    # its other paths restore
    assert point.restore(records, out, Selection(["a.bin", ".cache"])) == []
    assert names(out) == [".cache", "a.bin"]
    assert (out / ".cache" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    # out of capture order, it is still refused when met (and nothing is left behind)
    shuffled = tmp_path / "shuffled"
    with pytest.raises(RegionVaultError, match="the name of the restore marker"):
        point.restore([*records[3:], records[2]], shuffled)
    assert names(shuffled) == []


@needs_root
def test_an_entry_named_like_the_marker_that_is_no_file_is_never_opened(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device (or FIFO) of the marker's name is something the target holds, not a
    marker: opened, a device would act and a FIFO hang the read."""
    repo, point_id, src = backed_up(east, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.mknod(out / MARKER_NAME, stat.S_IFCHR | 0o600, NULL_DEV)
    opened: list[object] = []
    real_open = os.open

    def recording_open(path: object, *args: object, **kwargs: object) -> int:
        if path == MARKER_NAME:
            opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", recording_open)
    repo.restore(point_id, out)  # a target holding something: restored in place
    monkeypatch.undo()
    assert opened == []
    assert stat.S_ISCHR((out / MARKER_NAME).lstat().st_mode)
    restored = snapshot(out)
    del restored[MARKER_NAME]
    assert restored == snapshot(src)


WORKER = """
import sys
from pathlib import Path
from regionvault.core import Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import ChunkerParams, Repository, RepositorySettings
from regionvault.providers.local import plugin

pm = make_plugin_manager(load_entry_points=False, plugins=[plugin])
registry = registry_from(pm)
site = Site(load_site(sys.argv[1], registry=registry), registry=registry, plugin_manager=pm)
east = site.region("east")
repo = Repository.open(east.vault, east.keys, region=east.name,
    settings=RepositorySettings(workers=2))
print("started", flush=True)
repo.restore(sys.argv[2], Path(sys.argv[3]))
print("finished", flush=True)
"""


def many_files(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for d in range(6):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(40):
            (sub / f"f{i}").write_bytes(rng.randbytes(rng.randrange(0, 40_000)))


def tree_digest(root: Path) -> str:
    return hashlib.sha256(repr(sorted(snapshot(root).items())).encode()).hexdigest()


def test_restores_killed_at_random_moments_finish_when_run_again(
    east: Region, tmp_path: Path, site_file: Path
) -> None:
    src = tmp_path / "src"
    many_files(src, 5)
    repo = repo_for(east)
    point_id = repo.backup(capture(src)).id
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rng = random.Random(31)
    killed = 0
    for trial in range(5):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(site_file), point_id, str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # "started": the repository is open
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=60)[0]
        killed += "finished" not in output
        repo.restore(point_id, out)  # the same restore, run again
        assert_restored(out, src)
        assert tree_digest(out) == tree_digest(src)
    assert killed, "no trial was killed before it finished"


# -- through the CLI ---------------------------------------------------------------------


def cli(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli_point(workdir: Path) -> tuple[str, Path]:
    from test_repository_roundtrip import build_tree

    build_tree(workdir / "data")
    added = cli("instances", "add", "--region", "east", "--name", "nf1", "--data", "data")
    assert added.exit_code == 0, added.stderr
    backup = cli("backup", "nf1")
    assert backup.exit_code == 0, backup.stderr
    return backup.stdout.splitlines()[-1], workdir / "data"


def test_the_cli_prints_what_it_could_not_apply_as_warnings_and_exits_0(
    cli_point: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_id, src = cli_point
    real_tree = FileRestorer._tree
    socket = fmt.RawRecord(fmt.TAG_SOCKET, stat.S_IFSOCK | 0o755, MTIME, 0, b"run.sock", b"",
                           0, b"")  # fmt: skip

    def with_a_socket(self: FileRestorer, records: Iterator[fmt.RawRecord], sel: object) -> None:
        real_tree(self, itertools.chain(records, [socket]), sel)  # type: ignore[arg-type]

    monkeypatch.setattr(FileRestorer, "_tree", with_a_socket)
    out = tmp_path / "out"
    result = cli("restore", point_id, "--region", "east", "--target", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"regionvault: warning: {SOCKETS}: {out}/run.sock"]
    assert json.loads(result.stdout)["notes"] == [f"{SOCKETS}: {out}/run.sock"]
    assert snapshot(out) == snapshot(src)


def test_the_cli_syncs_with_sync_only(
    cli_point: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_id, src = cli_point
    synced: list[int] = []
    monkeypatch.setattr(_restore, "sync_filesystem", lambda fd: synced.append(fd))
    assert cli("restore", point_id, "--region", "east", "--target", tmp_path / "a").exit_code == 0
    assert synced == []
    result = cli("restore", point_id, "--region", "east", "--target", tmp_path / "b", "--sync")
    assert result.exit_code == 0, result.stderr
    assert len(synced) == 1
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b") == snapshot(src)


def test_the_cli_runs_a_killed_restore_again_and_refuses_any_other(
    cli_point: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_id, src = cli_point
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(FileRestorer, "_discard", lambda self: None)
        kill_at(m, "rename", 2)
        with pytest.raises(Killed):
            cli("restore", point_id, "--region", "east", "--target", out)
    assert MARKER_NAME in names(out)
    other = cli("restore", point_id, "--region", "east", "--target", out, "--path", "var")
    assert other.exit_code == 1 and "Traceback" not in other.stderr
    assert other.stderr.splitlines() == [
        f"regionvault: error: restore target {out} holds an unfinished restore of point "
        f"{point_id}: re-run that restore to finish it, or empty the directory"
    ]
    again = cli("restore", point_id[:8], "--region", "east", "--target", out)
    assert again.exit_code == 0, again.stderr
    assert_restored(out, src)
    # a directory that holds something and no marker is still refused
    refused = cli("restore", point_id, "--region", "east", "--target", out)
    assert refused.exit_code == 1
    assert "is not empty: restore into a new or empty directory" in refused.stderr


# -- the whole round trip: capture, backup, restore --------------------------------------


def lstat_tree(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every entry under ``root`` by raw name: kind, mode, owner, device number, size,
    mtime, content digest or link target, extended attributes, and which earlier entry it
    shares its inode with. Read through directory descriptors: paths may pass PATH_MAX."""
    out: dict[bytes, tuple[object, ...]] = {}
    first_of: dict[int, bytes] = {}
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(os.fsencode(root)):
        for name in sorted(dirnames + filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), os.fsencode(root))  # noqa: PTH118
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    content: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(name, dir_fd=dir_fd)
            else:
                content = None
            same = first_of.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) else rel
            where = b"/proc/self/fd/%d/%s" % (dir_fd, name)
            attrs = {n: os.getxattr(where, n, follow_symlinks=False)
                     for n in os.listxattr(where, follow_symlinks=False)}  # fmt: skip
            out[rel] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_rdev, st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime_ns,
                content, attrs, same, st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0,
            )  # fmt: skip
    return out


def deep_path(src: Path) -> bytes:
    """Directories 24 deep under ``src``, 220-byte names (5,300 bytes in all), made through
    directory descriptors; a file, a FIFO and a hard link to a file above at the bottom."""
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for i in range(24):
            part = b"%02d" % i + b"x" * 218
            os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, parts = child, [*parts, part]
        out = os.open(b"deep.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(out, b"at the bottom\n" * 100)
        os.close(out)
        os.mkfifo(b"deep-fifo", 0o600, dir_fd=fd)
        os.link(os.fsencode(src / "a.bin"), b"deep-hard", dst_dir_fd=fd)
    finally:
        os.close(fd)
    return b"/".join(parts)


def every_kind_on_disk(src: Path) -> bytes:
    rng = random.Random(3)
    raw = os.fsencode(src)
    (src / "dir").mkdir(parents=True)
    (src / "a.bin").write_bytes(rng.randbytes(70_000))
    with open(raw + b"/dir/caf\xe9-\xff.bin", "wb") as f:  # noqa: PTH123
        f.write(b"not UTF-8\n")
    os.link(src / "a.bin", src / "dir" / "hard")
    os.mkfifo(src / "fifo", 0o640)
    os.link(src / "fifo", src / "dir" / "fifo-too")
    if ROOT:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, NULL_DEV)
        os.chown(src / "a.bin", 1234, 2345)
        os.chown(src / "dir", 1234, 2345)
        os.chown(src / "fifo", 4321, 4321)
    os.setxattr(src / "a.bin", "user.color", b"blue")
    os.setxattr(src / "dir" / "hard", "user.more", b"\x00\x01")
    os.setxattr(src / "dir", "system.posix_acl_access", acl(os.geteuid() + 1))
    os.setxattr(src / "dir", "system.posix_acl_default", acl(os.geteuid() + 1))
    with (src / "sparse.bin").open("wb") as f:
        f.seek(2 << 20)
        f.write(rng.randbytes(3000))
        f.truncate(5 << 20)
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o4755)  # noqa: PTH101
    (src / "link").symlink_to(os.fsdecode(b"dir/caf\xe9-\xff.bin"))
    for i, path in enumerate(sorted(src.iterdir(), reverse=True)):
        os.utime(path, ns=(MTIME + i, MTIME + i), follow_symlinks=False)
    os.utime(src / "dir", ns=(MTIME, MTIME))
    return deep_path(src)


@pytest.mark.skipif(fmt.FORMAT_VERSION < 2, reason="needs format version 2 tree records")
def test_a_tree_of_every_kind_round_trips_through_the_local_provider(
    east: Region, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    deep = every_kind_on_disk(src)
    assert len(os.fsencode(src)) + len(deep) > os.pathconf("/", "PC_PATH_MAX")
    repo = repo_for(east)
    point = repo.backup(capture(src))
    out = tmp_path / "out"
    report = repo.restore(point.id, out)
    assert report.notes == ()
    restored = lstat_tree(out)
    assert restored == lstat_tree(src)
    assert restored[deep + b"/deep-hard"][9] == b"a.bin"  # the same inode as a.bin
    assert (out / "sparse.bin").lstat().st_blocks * 512 <= 64 << 10


NOT_ROOT = """
import json, os, stat, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._restore import FileRestorer
from regionvault.core.repository._restore_writer import ParallelWriter, Reporter

M = 1_600_000_000_000_000_000
def rec(tag, mode, path, **kw):
    return fmt.RawRecord(tag, mode, M, 0, path, b"", 0, b"", **kw)
root = {"uid": 0, "gid": 0, "user": b"root", "group": b"root"}
records = [
    rec(fmt.TAG_DIR, stat.S_IFDIR | 0o755, b"d", **root),
    rec(fmt.TAG_FILE, stat.S_IFREG | 0o2644, b"d/empty", **root,
        xattrs=((b"trusted.secret", b"1"), (b"user.plain", b"2"))),
    rec(fmt.TAG_FIFO, stat.S_IFIFO | 0o640, b"d/fifo", **root),
    rec(fmt.TAG_CHARDEV, stat.S_IFCHR | 0o666, b"d/null", rdev=os.makedev(1, 3), **root),
    fmt.RawRecord(fmt.TAG_SYMLINK, stat.S_IFLNK | 0o777, M, 0, b"d/link", b"empty", 0, b"",
                  **root),
]
with ThreadPoolExecutor(2) as pool:
    writer = ParallelWriter(None, None, pool, what="t", zero=b"", report=Reporter(None, None, None),
                            batch_bytes=1 << 20, ahead=2, max_read=1 << 20)
    notes = FileRestorer(writer, Path(sys.argv[1]), what="t", point_id="p").run(
        lambda: iter(records), None)
print(json.dumps(notes))
"""


@needs_root
@pytest.mark.skipif(not Path("/usr/bin/setpriv").exists(), reason="needs setpriv")
def test_a_restore_run_by_nobody_notes_what_it_cannot_apply() -> None:
    import tempfile

    # pytest's own temporary directories are owner-only: nobody works in one of its own
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch).chmod(0o777)
        script = Path(scratch) / "not_root.py"
        script.write_text(NOT_ROOT)
        script.chmod(0o644)
        out = Path(scratch) / "out"
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        done = subprocess.run(
            [*nobody, sys.executable, str(script), str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        notes = json.loads(done.stdout)
        assert sorted(notes) == [
            f"device nodes not created: not running as root: {out}/d/null",
            f"extended attributes not restored (Operation not permitted): {out}/d/empty "
            "(trusted.secret)",
            f"owners not restored: not running as root: {out}/d/empty and 3 more",
        ]
        empty = (out / "d" / "empty").lstat()
        assert (empty.st_uid, empty.st_mtime_ns) == (65534, 1_600_000_000_000_000_000)
        assert xattrs(out / "d" / "empty") == {"user.plain": b"2"}
        assert stat.S_ISFIFO((out / "d" / "fifo").lstat().st_mode)
        assert (out / "d" / "link").readlink() == Path("empty")
        assert stat.S_IMODE((out / "d").lstat().st_mode) == 0o755
        assert not (out / "d" / "null").exists()
