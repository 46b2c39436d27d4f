"""Tree fidelity on the capture and format side: the local capture's walk takes every kind
of entry with its names as bytes, owners, extended attributes and hard links, at any path
length; format version 2 tree records keep all of it, version 1 records still decode, and a
record that lies about a length is refused by name."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from regionvault.core import (
    CaptureIssue,
    ComputeError,
    EntryProblem,
    FileEntry,
    FileKind,
    IntegrityError,
    IssueKind,
    Region,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._tree import iter_records, to_public
from regionvault.core.repository.copy.offer import CopyOffer, encode_copied_record
from regionvault.core.repository.model import TreeEntry
from regionvault.providers.local import compute as local_compute
from repository_support import capture, repo_for

PATH_MAX = 4096
#: an ACL as the kernel stores it in system.posix_acl_access: user::rw- user:1000:r--
#: group::r-- mask::r-- other::r--
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in (
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 4, 1000),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    )
)
NOBODY_UID, NOBODY_GID = 54321, 54322  # ids with no name on this machine
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="device nodes and chown need root")


def raw(path: Path) -> bytes:
    return os.fsencode(path)


def xattrs_work(where: Path) -> bool:
    probe = where / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise
    finally:
        probe.unlink()
    return True


def build_tree(root: Path) -> dict[str, bool]:
    """Every kind of entry the local capture takes; what the machine allowed, by name."""
    root.mkdir()
    (root / "plain.txt").write_bytes(b"plain\n")
    # names that are not UTF-8: a file, and a directory with a file inside
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    (root / os.fsdecode(b"dir-\xff\xfe")).mkdir()
    (root / os.fsdecode(b"dir-\xff\xfe") / "inner").write_bytes(b"inside")
    # three names of one file, the first one in walk order holding the data
    (root / "hard-a").write_bytes(b"linked data")
    os.link(root / "hard-a", root / "hard-b")
    (root / "sub").mkdir()
    os.link(root / "hard-a", root / "sub" / "hard-c")
    (root / "symlink").symlink_to("plain.txt")
    os.mkfifo(root / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        here = Path.cwd()
        os.chdir(root)  # a socket's path is limited to 108 bytes: bind it by a short name
        try:
            sock.bind("sock")
        finally:
            os.chdir(here)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755 | stat.S_ISGID)  # noqa: PTH101
    os.chmod(root / "sub", 0o1777)  # noqa: PTH101
    with (root / "sparse").open("wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    made = {"devices": False, "owners": False, "xattrs": False, "acl": False}
    if ROOT:
        os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
        os.chown(root / "plain.txt", NOBODY_UID, NOBODY_GID)
        made["devices"] = made["owners"] = True
    if xattrs_work(root):
        os.setxattr(root / "plain.txt", "user.comment", b"hello \x00 bytes")
        os.setxattr(root / "sub", "user.dir", b"d")
        made["xattrs"] = True
        try:
            os.setxattr(root / "plain.txt", "system.posix_acl_access", ACL)
            made["acl"] = True
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    return made


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bool]]:
    root = tmp_path / "src"
    return root, build_tree(root)


# --------------------------------------------------------------------------- the capture


def test_capture_walk_carries_every_kind_owner_xattr_and_link(
    tree: tuple[Path, dict[str, bool]],
) -> None:
    root, made = tree
    cap = capture(root)
    entries = list(cap.entries())
    assert cap.issues == []
    by_path = {e.path: e for e in entries}
    latin = os.fsdecode(b"caf\xe9.txt")
    odd_dir = os.fsdecode(b"dir-\xff\xfe")
    # nothing is skipped for its name; paths are sorted by their bytes, parents first
    assert [e.path.encode("utf-8", "surrogateescape") for e in entries] == sorted(
        (e.path.encode("utf-8", "surrogateescape") for e in entries),
        key=lambda p: p.split(b"/"),
    )
    assert by_path[latin].kind is FileKind.FILE and by_path[latin].size == 12
    assert by_path[f"{odd_dir}/inner"].size == 6
    # hard links: the first path holds the data, the later ones name it
    assert by_path["hard-a"].link is None
    assert by_path["hard-b"].link == "hard-a"
    assert by_path["sub/hard-c"].link == "hard-a"
    assert by_path["symlink"].target == "plain.txt"
    assert by_path["pipe"].kind is FileKind.FIFO
    assert by_path["sock"].kind is FileKind.SOCKET
    assert by_path["setuid"].mode == 0o6755
    assert by_path["sub"].mode == 0o1777
    assert by_path["sparse"].size == (8 << 20) + 3
    st = os.lstat(root / "plain.txt")
    plain = by_path["plain.txt"]
    assert (plain.uid, plain.gid) == (st.st_uid, st.st_gid)
    assert plain.identity == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if made["owners"]:
        assert (plain.uid, plain.gid, plain.user, plain.group) == (
            NOBODY_UID,
            NOBODY_GID,
            None,
            None,
        )
        assert (by_path["setuid"].user, by_path["setuid"].uid) == ("root", 0)
    if made["devices"]:
        assert by_path["null"].kind is FileKind.CHARDEV
        assert by_path["null"].rdev == os.makedev(1, 3)
        assert by_path["loop"].kind is FileKind.BLOCKDEV
        assert by_path["loop"].rdev == os.makedev(7, 200)
    if made["xattrs"]:
        assert (b"user.comment", b"hello \x00 bytes") in plain.xattrs
        assert by_path["sub"].xattrs == ((b"user.dir", b"d"),)
        assert list(plain.xattrs) == sorted(plain.xattrs)
    if made["acl"]:
        assert (b"system.posix_acl_access", ACL) in plain.xattrs
    # counting takes the same walk and counts a file's data once
    files = [e for e in entries if e.kind is FileKind.FILE and e.link is None]
    assert cap.totals() == (len(files), sum(e.size for e in files))
    with cap.open(by_path[latin]) as f:
        assert f.read() == b"latin-1 name"


@needs_root
def test_capture_records_device_nodes_and_foreign_owners(
    tree: tuple[Path, dict[str, bool]],
) -> None:
    root, made = tree
    assert made["devices"] and made["owners"]
    by_path = {e.path: e for e in capture(root).entries()}
    assert (by_path["null"].kind, by_path["null"].rdev) == (FileKind.CHARDEV, os.makedev(1, 3))
    assert (by_path["plain.txt"].uid, by_path["plain.txt"].user) == (NOBODY_UID, None)


def test_capture_records_xattrs_and_acls(tmp_path: Path) -> None:
    if not xattrs_work(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses user.* extended attributes")
    root = tmp_path / "src"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    os.setxattr(root / "f", "user.b", b"2")
    os.setxattr(root / "f", "user.a", b"1")
    try:
        os.setxattr(root / "f", "system.posix_acl_access", ACL)
        acl = [(b"system.posix_acl_access", ACL)]
    except OSError:
        acl = []  # a filesystem without POSIX ACLs: the user.* attributes are still taken
    cap = capture(root)
    (entry,) = cap.entries()
    assert list(entry.xattrs) == sorted([(b"user.a", b"1"), (b"user.b", b"2"), *acl])
    cap._proc = False  # where /proc is not mounted: by path from the data directory
    assert [e.xattrs for e in cap.entries()] == [entry.xattrs]


def listdir_failing(
    monkeypatch: pytest.MonkeyPatch, where: Path, error: int
) -> Callable[[int], list[str]]:
    """Make listing the directory ``where`` fail with ``error`` (the tests run as root,
    whom permissions do not stop)."""
    real = os.listdir
    target = where.stat().st_ino

    def listdir(fd: int) -> list[str]:
        if isinstance(fd, int) and os.fstat(fd).st_ino == target:
            raise OSError(error, os.strerror(error))
        return real(fd)

    monkeypatch.setattr(os, "listdir", listdir)
    return listdir


def test_an_unlistable_directory_is_an_issue_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "secret").write_bytes(b"s")
    (root / "z").write_bytes(b"z")
    cap = capture(root)
    listdir_failing(monkeypatch, root / "locked", errno.EACCES)
    assert [e.path for e in cap.entries()] == ["locked", "z"]  # its entry is still there
    assert cap.issues == [
        CaptureIssue("locked", IssueKind.UNREADABLE, "cannot be listed: Permission denied")
    ]
    monkeypatch.undo()
    assert [e.path for e in cap.entries()] == ["locked", "locked/secret", "z"]
    assert cap.issues == []  # each walk starts afresh


def test_an_unreadable_data_directory_fails_the_capture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    listdir_failing(monkeypatch, root, errno.EIO)
    with pytest.raises(ComputeError, match=r"cannot read directory .*src: Input/output error"):
        capture(root)


def test_an_entry_gone_between_listing_and_lstat_is_not_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda fd: [*real(fd), "removed-meanwhile"])
    cap = capture(root)
    assert [e.path for e in cap.entries()] == ["a"]
    assert cap.issues == []


def make_long_path(root: Path) -> tuple[str, int]:
    """A file whose path below ``root`` is longer than PATH_MAX, made through directory
    descriptors (no call is given the whole path); its relative path and depth."""
    name = "d" * 200
    depth = PATH_MAX // (len(name) + 1) + 2
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        out = os.open("deep-file", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(out, b"from far below")
        os.close(out)
    finally:
        os.close(fd)
    rel = "/".join([name] * depth + ["deep-file"])
    assert len(rel) > PATH_MAX
    return rel, depth


def remove_long_path(root: Path, depth: int) -> None:
    name = "d" * 200
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(depth):
        fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    os.unlink("deep-file", dir_fd=fds[-1])
    for parent in reversed(fds[:-1]):
        os.close(fds.pop())
        os.rmdir(name, dir_fd=parent)
    os.close(fds[0])


@pytest.fixture
def long_tree(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "src"
    root.mkdir()
    rel, depth = make_long_path(root)
    yield root, rel
    remove_long_path(root, depth)  # shutil.rmtree cannot remove it


def test_a_path_longer_than_path_max_is_captured_and_backed_up(
    east: Region, long_tree: tuple[Path, str]
) -> None:
    root, rel = long_tree
    cap = capture(root)
    entries = list(cap.entries())
    assert cap.issues == []
    assert entries[-1].path == rel and entries[-1].size == len(b"from far below")
    with cap.open(entries[-1]) as f:
        assert f.read() == b"from far below"
    assert cap.restat(entries[-1]) == entries[-1]
    repo = repo_for(east)
    point = repo.backup(capture(root))
    listed = [e for e in repo.entries(point.id) if isinstance(e, TreeEntry)]
    assert listed[-1].path == rel
    assert (listed[-1].size, listed[-1].mode, len(listed[-1].chunks)) == (14, 0o640, 1)
    assert repo.verify(read_data=True).ok


def test_a_deep_tree_holds_a_bounded_number_of_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_compute, "MAX_DIR_FDS", 4)
    root = tmp_path / "src"
    deep = root
    for level in range(12):
        deep = deep / f"n{level}"
        deep.mkdir(parents=True)
        # walked after the directory beside it: when the walk has come back up
        (deep.parent / f"z{level}").write_bytes(b"x" * level)
    open_at_most = 0
    cap = capture(root)
    paths = []
    fds = Path("/proc/self/fd")
    for entry in cap.entries():
        open_at_most = max(open_at_most, sum(1 for _ in fds.iterdir()))
        paths.append(entry.path)
    before = sum(1 for _ in fds.iterdir())
    assert open_at_most <= before + 4 + 1  # the walk's at most, and the listing's own
    assert cap.issues == []
    assert len(paths) == 24
    # every level is finished on the way back up, through directories closed meanwhile
    assert paths[-3:] == ["n0/n1/z2", "n0/z1", "z0"]


def test_a_directory_moved_away_while_closed_is_an_issue_not_a_wrong_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_compute, "MAX_DIR_FDS", 2)
    root = tmp_path / "src"
    (root / "a" / "b" / "c" / "d").mkdir(parents=True)
    (root / "a" / "z").write_bytes(b"not reached")
    (root / "z").write_bytes(b"z")
    cap = capture(root)
    paths = []
    for entry in cap.entries():
        paths.append(entry.path)
        if entry.path == "a/b/c/d":  # "a" and "b" are closed now: move them away
            (root / "a" / "b").rename(root / "b-moved")
            (root / "a").rename(root / "a-moved")
    # "b" is found again through "..", by its inode; "a" is not where it was and ".." of
    # "b" is another directory now: the rest of "a" is named, not taken from elsewhere
    assert paths == ["a", "a/b", "a/b/c", "a/b/c/d", "z"]
    assert cap.issues == [
        CaptureIssue(
            "a",
            IssueKind.CHANGED,
            "moved while walked: the rest of the directory is not in the point",
        )
    ]


def test_a_directory_swapped_for_a_symlink_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not in the data directory")
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"inside")
    (root / "b").mkdir()
    (root / "b" / "secret").write_bytes(b"walked")
    cap = capture(root)
    walked = {e.path: e for e in cap.entries()}
    paths = []
    for entry in cap.entries():
        paths.append(entry.path)
        if entry.path == "a":  # walked, not entered yet: a symlink takes its place
            (root / "a").rename(tmp_path / "a-away")
            (root / "a").symlink_to(outside)
    assert paths == ["a", "b", "b/secret"]
    assert cap.issues == [CaptureIssue("a", IssueKind.CHANGED, "replaced while walked")]
    # the same after the walk: open() goes down by name and follows no symlink either
    (root / "b").rename(tmp_path / "b-away")
    (root / "b").symlink_to(outside)
    with pytest.raises(EntryProblem, match="replaced since it was walked") as caught:
        cap.open(walked["b/secret"])
    assert caught.value.issue == IssueKind.CHANGED


# --------------------------------------------------------------------------- the backup


def test_a_backup_records_every_field_of_the_tree(
    east: Region, tree: tuple[Path, dict[str, bool]]
) -> None:
    root, made = tree
    walked = {e.path: e for e in capture(root).entries()}
    repo = repo_for(east)
    point = repo.backup(capture(root))
    manifest = repo.load_manifest(point.id)
    assert manifest.format_version == fmt.FORMAT_VERSION_WITHOUT_DISKS == 2
    listed = {e.path: e for e in repo.entries(point.id) if isinstance(e, TreeEntry)}
    assert listed.keys() == walked.keys()  # every entry, none skipped
    for path, entry in walked.items():
        got = listed[path]
        assert (got.kind, got.mode, got.mtime_ns, got.target, got.link) == (
            entry.kind,
            entry.mode,
            entry.mtime_ns,
            entry.target,
            entry.link,
        ), path
        assert (got.uid, got.gid, got.user, got.group, got.rdev, got.xattrs) == (
            entry.uid,
            entry.gid,
            entry.user,
            entry.group,
            entry.rdev,
            entry.xattrs,
        ), path
        if entry.kind is FileKind.FILE:
            assert got.size == entry.size, path
    # the data of a file is stored once, under its first name; links and specials hold none
    assert listed["hard-a"].chunks and not listed["hard-b"].chunks
    assert listed["hard-b"].size == listed["hard-a"].size
    for special in ("pipe", "sock", "symlink", "sub"):
        assert listed[special].chunks == () and listed[special].size == 0
    data_files = [e for e in walked.values() if e.kind is FileKind.FILE and e.link is None]
    assert point.size == sum(e.size for e in data_files)
    assert manifest.stats["hardlinks"] == 2
    assert manifest.stats["specials"] == 2 + 2 * made["devices"]
    assert repo.verify(read_data=True).ok


def test_metadata_changes_show_in_the_next_point_and_the_data_deduplicates(
    east: Region, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "f").write_bytes(b"data" * 1000)
    repo = repo_for(east)
    repo.backup(capture(root))
    st = (root / "f").stat()
    changed_owner = ROOT
    if ROOT:
        os.chown(root / "f", NOBODY_UID, NOBODY_GID)  # ctime moves, mtime and size do not
    changed_xattr = xattrs_work(root)
    if changed_xattr:
        os.setxattr(root / "f", "user.note", b"added")
    if not (changed_owner or changed_xattr):
        pytest.skip("neither chown (not root) nor user.* xattrs (filesystem) available")
    assert (root / "f").stat().st_mtime_ns == st.st_mtime_ns
    point = repo.backup(capture(root))
    stats = repo.load_manifest(point.id).stats
    # the ctime moved: a metadata change cannot be told from a rewrite that put the mtime
    # back, so the file is read again; its data deduplicates (only the tree chunk is new)
    assert (stats["files_unchanged"], stats["chunks_new"]) == (0, 1)
    (entry,) = (e for e in repo.entries(point.id) if isinstance(e, TreeEntry))
    if changed_owner:
        assert (entry.uid, entry.gid) == (NOBODY_UID, NOBODY_GID)
    if changed_xattr:
        assert entry.xattrs == ((b"user.note", b"added"),)


def test_a_hard_link_of_the_parent_point_is_read_when_it_holds_the_data(
    east: Region, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "a").write_bytes(b"shared bytes")
    os.link(root / "a", root / "b")
    repo = repo_for(east)
    repo.backup(capture(root))
    (root / "a").unlink()  # "b" now holds the data itself (same size, same mtime)
    point = repo.backup(capture(root))
    (entry,) = (e for e in repo.entries(point.id) if isinstance(e, TreeEntry))
    assert (entry.path, entry.link, entry.size) == ("b", None, 12)
    assert entry.chunks  # not the parent's link record, which holds none


# --------------------------------------------------------------------------- the records


def decode(data: bytes, name: str = "points/test") -> list[fmt.RawRecord]:
    return list(iter_records([data], name))


FULL = fmt.RawRecord(
    tag=fmt.TAG_FILE,
    mode=0o4755,
    mtime_ns=-5,  # before 1970
    size=70,
    path=b"caf\xe9/f",
    target=b"",
    offset=0,
    ids=b"\x01" * 32 + b"\x02" * 32,
    uid=0,
    gid=4294967294,
    user=b"root",
    group=b"nogroup",
    rdev=0,
    link=b"",
    xattrs=((b"system.posix_acl_access", ACL), (b"user.a", b"\x00\xff")),
)


def test_version2_records_keep_every_field() -> None:
    records = [
        FULL,
        fmt.RawRecord(fmt.TAG_CHARDEV, 0o600, 1, 0, b"dev/null", b"", 0, b"", rdev=259),
        fmt.RawRecord(fmt.TAG_FILE, 0o644, 1, 70, b"hard", b"", 0, b"", 7, 8, link=b"caf\xe9/f"),
        fmt.RawRecord(fmt.TAG_SYMLINK, 0o777, 2, 0, b"s", b"\xfftarget", 0, b""),
        fmt.RawRecord(fmt.TAG_EXTENT, 0, 0, 4096, b"", b"", 8192, b"\x03" * 32),
        dataclasses.replace(FULL, path=b"with-token", change=b"\x07" * 16),
    ]
    data = b"".join(fmt.encode_record(r) for r in records)
    assert data[0] == fmt.ENTRY2_FLAG | fmt.TAG_FILE
    assert decode(data) == records
    # the records stream in pieces of any size (trees are read chunk by chunk)
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    assert list(iter_records(pieces, "points/test")) == records
    public = to_public(records[2], "points/test")
    assert isinstance(public, TreeEntry)
    assert (public.link, public.uid, public.gid, public.user) == (
        os.fsdecode(b"caf\xe9/f"),
        7,
        8,
        None,
    )
    full = to_public(FULL, "points/test")
    assert isinstance(full, TreeEntry)
    assert (full.user, full.group, full.xattrs) == ("root", "nogroup", FULL.xattrs)


def test_version1_records_still_decode_with_nothing_recorded_of_the_rest() -> None:
    ids = b"\x09" * 32
    data = b"".join(
        (
            fmt.encode_entry(fmt.TAG_DIR, 0o755, 10, 0, b"etc", b"", b""),
            fmt.encode_entry(fmt.TAG_FILE, 0o600, 11, 5, b"etc/\xe9", b"", ids),
            fmt.encode_entry(fmt.TAG_SYMLINK, 0o777, 12, 0, b"l", b"etc", b""),
            fmt.encode_extent(0, 5, ids),
        )
    )
    # the version 1 layout, byte by byte: tag, mode, mtime, size, path length, path,
    # target length, target, chunk count, ids
    assert data[: fmt.ENTRY_HEAD.size] == struct.pack(">BIqQH", 2, 0o755, 10, 0, 3)
    records = decode(data)
    assert [r.tag for r in records] == [fmt.TAG_DIR, fmt.TAG_FILE, fmt.TAG_SYMLINK, 4]
    assert records[1] == fmt.RawRecord(fmt.TAG_FILE, 0o600, 11, 5, b"etc/\xe9", b"", 0, ids)
    assert (records[1].uid, records[1].user, records[1].link, records[1].xattrs) == (
        -1,
        b"",
        b"",
        (),
    )
    entry = to_public(records[1], "points/old")
    assert isinstance(entry, TreeEntry)
    assert (entry.uid, entry.gid, entry.user, entry.link, entry.xattrs) == (
        None,
        None,
        None,
        None,
        (),
    )
    # a copy of a version 1 point writes its records as version 2, keeping what they hold
    again = decode(b"".join(encode_copied_record(r, "points/old") for r in records))
    assert again == records
    assert encode_copied_record(records[1], "points/old")[0] == fmt.ENTRY2_FLAG | fmt.TAG_FILE
    # version 1 wrote a capture's mode as it came: only its permission bits are kept
    (typed,) = decode(fmt.encode_entry(fmt.TAG_FILE, 0o100644, 1, 0, b"t", b"", b""))
    assert decode(encode_copied_record(typed, "points/old"))[0].mode == 0o644
    # a record that cannot be written is a damaged tree, named
    (lying,) = decode(fmt.encode_entry(fmt.TAG_DIR, 0o755, 1, 9, b"d", b"", ids))
    with pytest.raises(IntegrityError, match=r"points/old.*no data"):
        encode_copied_record(lying, "points/old")


def lie(record: bytes, at: int, form: str, value: int) -> bytes:
    data = bytearray(record)
    struct.pack_into(form, data, at, value)
    return bytes(data)


def test_a_version2_record_that_lies_is_an_integrity_error_naming_the_object() -> None:
    good = fmt.encode_record(FULL)
    head = struct.unpack_from(">I", good, 1)[0]
    path_at = 5 + fmt.ENTRY2_FIXED.size  # the path's length field
    lies = {
        "head beyond its bound": lie(good, 1, ">I", fmt.MAX_ENTRY_HEAD + 1),
        "path beyond its bound": lie(good, path_at, ">I", fmt.MAX_PATH_BYTES + 1),
        "path past the head": lie(good, path_at, ">I", head),
        "head longer than its fields": lie(good, 1, ">I", head + 1) + b"\0",
        "head shorter than its fields": lie(good, 1, ">I", head - 1),
        "more chunks than bytes": lie(good, 5 + head, ">I", FULL.size + 1),
        "unknown kind": bytes([fmt.ENTRY2_FLAG | 9]) + good[1:],
        "mode beyond permissions": lie(good, 5, ">I", 0o100644),
    }
    for what, data in lies.items():
        with pytest.raises(IntegrityError, match="points/lying") as caught:
            decode(data + b"\0" * 64, "points/lying")  # more follows: not a short stream
        assert "points/lying" in str(caught.value), what
    # an xattr count that lies is caught inside the head, before anything is buffered
    bare = fmt.encode_record(dataclasses.replace(FULL, xattrs=()))
    xcount_at = len(bare) - len(FULL.ids) - 4 - 4  # before the chunk count and the ids
    with pytest.raises(IntegrityError, match="extended attribute"):
        decode(lie(good, xcount_at, ">I", 1 << 30), "points/lying")
    with pytest.raises(IntegrityError, match="ends inside a record"):
        decode(good[:-1], "points/short")
    # the change token, the head's one optional field, is bounded and never empty
    tokened = fmt.encode_record(dataclasses.replace(FULL, change=b"\x07" * 16))
    token_at = len(tokened) - len(FULL.ids) - 4 - 17  # its length byte
    for value, why in ((fmt.MAX_CHANGE_BYTES + 1, "change token"), (0, "empty change token")):
        data = bytearray(tokened)
        data[token_at] = value
        with pytest.raises(IntegrityError, match=why):
            decode(bytes(data) + b"\0" * 64, "points/lying")


def test_what_cannot_be_encoded_is_refused_before_it_is_written() -> None:
    for bad in (
        fmt.RawRecord(fmt.TAG_DIR, 0o755, 0, 0, b"d", b"", 0, b"\x01" * 32),  # data on a dir
        fmt.RawRecord(
            fmt.TAG_FILE, 0o644, 0, 1, b"f", b"", 0, b"", xattrs=((b"b", b""), (b"a", b""))
        ),
        fmt.RawRecord(fmt.TAG_FILE, 0o644, 0, 1, b"f", b"", 0, b"", xattrs=((b"x" * 256, b""),)),
        fmt.RawRecord(fmt.TAG_FILE, 0o644, 0, 0, b"f" * (fmt.MAX_PATH_BYTES + 1), b"", 0, b""),
    ):
        with pytest.raises(ValueError, match="tree record"):
            fmt.encode_record(bad)


def test_a_copy_offer_of_a_newer_format_is_refused() -> None:
    offer = CopyOffer({"format": fmt.FORMAT_VERSION + 1, "id": "x"}, b"")
    with pytest.raises(IntegrityError, match="newer than this regionvault reads"):
        CopyOffer.decode("inbox/offer", offer.encode())
    current = CopyOffer({"format": fmt.FORMAT_VERSION}, fmt.encode_record(FULL))
    assert list(CopyOffer.decode("inbox/offer", current.encode()).records("o")) == [FULL]


def test_a_capture_entry_becomes_a_record_with_all_its_fields() -> None:
    from regionvault.core.repository._tree import entry_record

    entry = FileEntry(
        path=os.fsdecode(b"\xffname"),
        kind=FileKind.BLOCKDEV,
        mode=0o660,
        mtime_ns=3,
        uid=6,
        gid=7,
        user="disk-owner",
        group=None,
        rdev=os.makedev(8, 1),
        xattrs=((b"user.z", b"1"), (b"user.a", b"2")),
    )
    record = entry_record(entry, 0, b"")
    assert (record.tag, record.path, record.rdev, record.uid, record.user, record.group) == (
        fmt.TAG_BLOCKDEV,
        b"\xffname",
        os.makedev(8, 1),
        6,
        b"disk-owner",
        b"",
    )
    assert record.xattrs == ((b"user.a", b"2"), (b"user.z", b"1"))
    assert decode(fmt.encode_record(record)) == [record]
