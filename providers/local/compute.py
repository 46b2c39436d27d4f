"""The local Compute: an instance is a data directory plus a metadata record, and, once
launched, a process running its function (a shell command) in that directory.

On disk, under ``<root>/compute/``:

``instances/<id>/instance.json``
    the record: id, name, tags, function, state, created, data_dir, pid, owned_data.
``instances/<id>/data/``
    the data of an instance restored here (a registered instance keeps its data where it
    was, and the record holds that directory's absolute path).
``instances/<id>/output.log``
    the launched process's stdout and stderr.
``compute.lock``
    serialises record changes (unique names, tags, state) between threads and processes.
``index.sqlite``
    the index of the records, by id and by name (providers/local/_index.py): what listing,
    name checks and registration read; rebuilt from the records whenever it is missing
    or was left behind by a crash.

States: ``pending`` (a restore sink not launched yet; not listed), ``running``, ``stopped``
(its process has exited; still listed), ``terminated`` (not listed, record kept). A pending
sink that is discarded (its restore or launch failed) goes entirely: record and data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import grp
import io
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from regionvault.core import procs
from regionvault.core.errors import AmbiguousName, ComputeError, EntryProblem, InstanceNotFound
from regionvault.core.interfaces import Capture, Compute, FileCapture, FileSink, RestoreSink
from regionvault.core.procs import ProcessIdentity, start_ticks
from regionvault.core.types import (
    Capabilities,
    CaptureIssue,
    CaptureKind,
    Disk,
    FileEntry,
    FileKind,
    Instance,
    InstancePage,
    IssueKind,
    LaunchSpec,
    Tags,
)
from regionvault.providers.local import _fs
from regionvault.providers.local._index import InstanceIndex

__all__ = [
    "MAX_DIR_FDS",
    "MAX_TAGS",
    "MAX_TAG_KEY",
    "MAX_TAG_VALUE",
    "LocalCompute",
    "LocalFileCapture",
    "LocalFileSink",
    "validate_tags",
]

log = logging.getLogger(__name__)

#: AWS's limits, which every cloud provider of regionvault can honour
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
MAX_TAGS = 50
MAX_NAME = 255
_ID = re.compile(r"^i-[0-9a-f]{16}$")
RECORD = "instance.json"
DATA = "data"
LOG = "output.log"
#: processes this interpreter started, so any LocalCompute in it can reap them
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def validate_tags(tags: Mapping[str, str], error: type[ComputeError] = ComputeError) -> Tags:
    """``tags`` as :class:`Tags`, or ``error`` naming the first bad key or value."""
    if not isinstance(tags, Mapping):
        raise error(f"tags must be a mapping of strings, not {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise error(f"tag {key!r}={value!r}: keys and values must be strings")
        if not key.strip():
            raise error(f"tag key {key!r} is empty")
        if len(key) > MAX_TAG_KEY:
            raise error(f"tag key {key[:40]!r}... is longer than {MAX_TAG_KEY} characters")
        if len(value) > MAX_TAG_VALUE:
            raise error(f"tag {key!r}: value is longer than {MAX_TAG_VALUE} characters")
        if not key.isprintable():
            raise error(f"tag key {key!r} has a non-printable character")
        if not value.isprintable():
            raise error(f"tag {key!r}: value {value!r} has a non-printable character")
    if len(tags) > MAX_TAGS:
        raise error(f"{len(tags)} tags: at most {MAX_TAGS} per instance")
    return Tags(tags)


# --------------------------------------------------------------------------- processes


def _launched(pid: int, ticks: int | None, record: Mapping[str, Any] | None) -> ProcessIdentity:
    """The identity of the process ``record`` launched (core/procs.py). What records of
    earlier versions do not say is what they assumed: this host, and this machine (their
    ``pid_boot`` was compared with this machine's boot)."""
    record = record or {}
    host = record.get("pid_host")
    return ProcessIdentity(
        host if isinstance(host, str) else socket.gethostname(),
        pid,
        ticks,
        record.get("pid_boot"),
        record.get("pid_ns"),
        record["pid_machine"] if "pid_machine" in record else procs.machine_tag(),
    )


def _alive(pid: int, ticks: int | None, record: Mapping[str, Any] | None = None) -> bool | None:
    """Whether the process ``record`` launched still runs, as core/procs.py's
    :meth:`ProcessIdentity.alive` rules; None when nobody here can tell (launched in another
    pid namespace, or on another host or machine: its pid means another process here, or
    none). One launched in an earlier boot of this machine has ended with that boot."""
    # a child of this interpreter is asked directly: poll() also reaps it
    with _children_lock:
        child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return _launched(pid, ticks, record).alive()


def _stop(pid: int, ticks: int | None, timeout: float, record: Mapping[str, Any]) -> None:
    """SIGTERM the process group, then SIGKILL it if still there after ``timeout``. A process
    nobody here can tell (another pid namespace, host or machine) is never signalled: its
    pid names another process here, or none."""
    alive = _alive(pid, ticks, record)
    if alive is None:
        raise ComputeError(
            f"process {pid} was launched in another pid namespace, or on another host or "
            "machine: stop it from there"
        )
    if not alive:
        _reap(pid)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid, ticks, record):
                _reap(pid)
                return
            time.sleep(0.02)
    raise ComputeError(f"process {pid} survived SIGKILL")


def _reap(pid: int) -> None:
    with _children_lock:
        child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)


# --------------------------------------------------------------------------- captures


#: how a walk opens a directory below the data directory: never through a symlink
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: directory descriptors one walk keeps open at most (one per level of the tree it is in):
#: deeper, it closes the shallowest and comes back up through "..", checked by inode
MAX_DIR_FDS = 64
#: errors that are the machine's, not an entry's: they fail the whole capture
_FATAL = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM))
#: errors opening an entry that mean it is no longer what was walked
_REPLACED = frozenset((errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK))
#: what the repository format keeps of one entry's extended attributes (names, values and
#: their lengths); far beyond what Linux filesystems hold
MAX_XATTR_BYTES = 1 << 20
_NO_XATTRS = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP))
_PROC_FD = "/proc/self/fd"
#: Linux's open flag for a descriptor that only names an inode (0 where there is none)
_O_PATH: int = getattr(os, "O_PATH", 0)

_KINDS = {
    stat.S_IFREG: FileKind.FILE,
    stat.S_IFDIR: FileKind.DIR,
    stat.S_IFLNK: FileKind.SYMLINK,
    stat.S_IFIFO: FileKind.FIFO,
    stat.S_IFSOCK: FileKind.SOCKET,
    stat.S_IFCHR: FileKind.CHARDEV,
    stat.S_IFBLK: FileKind.BLOCKDEV,
}


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Dir:
    """A directory the walk is in: its descriptor (None while closed to bound them), its
    inode, to know it again, and the rest of its listing."""

    __slots__ = ("dev", "fd", "ino", "names", "rel")

    def __init__(self, rel: str, fd: int, st: os.stat_result, names: list[str]) -> None:
        self.rel = rel
        self.fd: int | None = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.names: Iterator[str] = iter(names)


class _EntryFile(io.FileIO):
    """A captured file open for reading: an error while reading names the entry."""

    def __init__(self, fd: int, path: str) -> None:
        super().__init__(fd, "rb", closefd=True)
        self.entry_path = path

    def _problem(self, exc: OSError) -> EntryProblem:
        return EntryProblem(
            self.entry_path, IssueKind.UNREADABLE, f"cannot be read: {exc.strerror or exc}"
        )

    def readinto(self, buffer: Any) -> int | None:
        try:
            return super().readinto(buffer)
        except OSError as exc:
            raise self._problem(exc) from None

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = super().read(size)
        except OSError as exc:
            raise self._problem(exc) from None
        return b"" if data is None else data  # None only when non-blocking: it is not


class LocalFileCapture(FileCapture):
    """The instance's data directory read in place.

    What is captured: every entry below the data directory, whatever its name (names are
    bytes; one that is not UTF-8 is kept, surrogate-escaped in :attr:`FileEntry.path`) and
    whatever its path's length: directories, regular files, symlinks (their targets),
    hard links (a file with more than one link is recorded once with its data, and every
    later path of it as a link to the first), FIFOs, sockets and character and block
    devices (their device numbers). Each entry carries its permission bits (set-user-id,
    set-group-id and sticky included), mtime, owner and group by number and by name (None
    when the number has no name here), and its extended attributes, POSIX ACLs included
    (``system.posix_acl_access``/``default``); a filesystem without extended attributes
    gives none. Its ``identity`` is (device, inode, size, mtime, ctime).

    :meth:`entries` walks it anew on each call (parents first, siblings sorted by the bytes
    of their names) through directory descriptors, never paths, so no path is too long and
    no symlink is followed; it holds one sorted listing per level, never the whole tree,
    and at most :data:`MAX_DIR_FDS` descriptors, however deep the tree. A directory that
    cannot be listed (permission denied, I/O error) is recorded in :attr:`issues` and its
    entry still yielded; an entry removed while the walk passes is not there. The data
    directory itself unreadable fails the capture (:class:`ComputeError`).

    A local directory has no snapshot: the capture is not even crash-consistent, because
    files are read one after another while the workload runs. :meth:`open` refuses a file
    that is not the one walked, or that changed since (:class:`EntryProblem`, issue
    "changed"), examined before it is opened for reading (a device node put in its place
    is never opened), and the engine re-reads it and checks every entry once more at the end,
    recording what it could not take whole. Hooks make a workload application-consistent
    (docs/hooks.md).
    """

    def __init__(self, instance: Instance, taken_at: datetime, root: Path) -> None:
        super().__init__(instance, taken_at)
        self.root = root
        self._users: dict[int, str | None] = {}
        self._groups: dict[int, str | None] = {}
        #: guards the directory descriptor kept for :meth:`open` and :meth:`restat`
        self._dir_lock = threading.Lock()
        self._dir_parts: tuple[str, ...] | None = None
        self._dir_fd: int | None = None
        self._proc = Path(_PROC_FD).is_dir()
        fd = self._open_root()  # an unreadable data directory fails the capture, not the backup
        try:
            self._names(fd, "")
        finally:
            os.close(fd)

    # -- the walk ----------------------------------------------------------------------------

    def _error(self, message: str) -> ComputeError:
        return ComputeError(f"capture of {self.instance.id}: {message}")

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(
                f"cannot read data directory {self.root}: {exc.strerror or exc}"
            ) from None

    def _names(self, fd: int, rel: str) -> list[str]:
        """A directory's names sorted by their bytes (the data directory's failing fails
        the capture)."""
        try:
            names = os.listdir(fd)
        except OSError as exc:
            if rel and exc.errno not in _FATAL:
                raise
            where = self.root if not rel else f"{self.root}/{rel}"
            raise self._error(f"cannot read directory {where}: {exc.strerror or exc}") from None
        names.sort(key=_raw)
        return names

    def _user(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def _group(self, gid: int) -> str | None:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = None
        return self._groups[gid]

    def _xattrs(
        self, dir_fd: int, name: str, path: str, issues: list[CaptureIssue] | None
    ) -> tuple[tuple[bytes, bytes], ...]:
        """The entry's extended attributes, not following a symlink. The entry is reached
        through its directory's descriptor under /proc (Linux has no *xattrat call), or by
        its path where /proc is not mounted."""
        where = f"{_PROC_FD}/{dir_fd}/{name}" if self._proc else f"{self.root}/{path}"
        problems: list[str] = []
        found: list[tuple[bytes, bytes]] = []
        try:
            names = os.listxattr(where, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS and exc.errno != errno.ENOENT:
                problems.append(f"its extended attributes cannot be listed: {exc.strerror}")
            names = []
        total = 0
        for xname in sorted(names, key=_raw):
            try:
                value = os.getxattr(where, xname, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOENT):  # removed meanwhile
                    problems.append(f"extended attribute {xname} cannot be read: {exc.strerror}")
                continue
            raw = _raw(xname)
            total += 6 + len(raw) + len(value)
            if total > MAX_XATTR_BYTES:
                problems.append(
                    f"extended attributes beyond {MAX_XATTR_BYTES} bytes are not recorded"
                )
                break
            found.append((raw, value))
        if issues is not None:
            issues.extend(CaptureIssue(path, IssueKind.UNREADABLE, p) for p in problems)
        return tuple(found)

    def _entry(
        self,
        dir_fd: int,
        name: str,
        path: str,
        st: os.stat_result,
        issues: list[CaptureIssue] | None,
        *,
        full: bool = True,
    ) -> FileEntry | None:
        """The entry ``name`` of the directory ``dir_fd`` as ``st`` (its lstat) describes
        it; None when it is gone or of a kind no tree records. ``full`` False (counting)
        leaves out names and extended attributes."""
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            if issues is not None:
                issues.append(
                    CaptureIssue(path, IssueKind.UNREADABLE, "of a kind no backup records")
                )
            return None
        target = None
        if kind is FileKind.SYMLINK:
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno in _FATAL:
                    raise self._error(f"{path!r}: {exc.strerror}") from None
                if issues is not None:
                    issues.append(
                        CaptureIssue(
                            path, IssueKind.UNREADABLE, f"symlink cannot be read: {exc.strerror}"
                        )
                    )
                return None
        return FileEntry(
            path=path,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            mtime_ns=st.st_mtime_ns,
            size=st.st_size if kind is FileKind.FILE else 0,
            target=target,
            uid=st.st_uid,
            gid=st.st_gid,
            user=self._user(st.st_uid) if full else None,
            group=self._group(st.st_gid) if full else None,
            rdev=st.st_rdev if kind in (FileKind.CHARDEV, FileKind.BLOCKDEV) else 0,
            xattrs=self._xattrs(dir_fd, name, path, issues) if full else (),
            identity=_identity(st),
            changed_ns=st.st_ctime_ns,
        )

    def _enter(
        self, parent: int, name: str, path: str, st: os.stat_result, issues: list[CaptureIssue]
    ) -> _Dir | None:
        """The directory just yielded, open to walk; None (and why, in ``issues``) when it
        cannot be listed: an entry without its contents."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None  # removed since it was examined: listed, empty
        except OSError as exc:
            if exc.errno in _FATAL:
                raise self._error(f"{path!r}: {exc.strerror}") from None
            if exc.errno in _REPLACED:
                issues.append(CaptureIssue(path, IssueKind.CHANGED, "replaced while walked"))
            else:
                issues.append(
                    CaptureIssue(path, IssueKind.UNREADABLE, f"cannot be listed: {exc.strerror}")
                )
            return None
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                issues.append(CaptureIssue(path, IssueKind.CHANGED, "replaced while walked"))
                os.close(fd)
                return None
            return _Dir(path, fd, now, self._names(fd, path))
        except OSError as exc:
            os.close(fd)
            issues.append(
                CaptureIssue(path, IssueKind.UNREADABLE, f"cannot be listed: {exc.strerror}")
            )
            return None
        except BaseException:
            os.close(fd)  # a failure of the whole capture (out of descriptors) leaks none
            raise

    def _reopen(self, frame: _Dir, child: int | None, issues: list[CaptureIssue]) -> None:
        """Open again a directory whose descriptor was closed to bound them: through ".."
        of the child just finished, or else down from the data directory by name; either
        must be the same directory (inode), or the rest of it is not walked."""
        fd = None
        if child is not None:
            with contextlib.suppress(OSError):
                fd = self._same(os.open("..", _DIR_FLAGS, dir_fd=child), frame)
        if fd is None:
            fd = self._open_down(tuple(frame.rel.split("/")) if frame.rel else ())
            if fd is not None:
                fd = self._same(fd, frame)
        if fd is None:
            frame.names = iter(())
            issues.append(
                CaptureIssue(
                    frame.rel or ".",
                    IssueKind.CHANGED,
                    "moved while walked: the rest of the directory is not in the point",
                )
            )
        frame.fd = fd

    @staticmethod
    def _same(fd: int, frame: _Dir) -> int | None:
        """``fd`` if it is the directory ``frame`` (closed and None if not)."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (frame.dev, frame.ino):
            return fd
        os.close(fd)
        return None

    def _open_down(self, parts: tuple[str, ...]) -> int | None:
        """A descriptor of the directory ``parts`` below the data directory, opened one name
        at a time (no path length limit, no symlink followed); None if it is not there."""
        try:
            return self._descend(parts)
        except OSError as exc:
            if exc.errno in _FATAL:
                raise self._error(f"{'/'.join(parts)!r}: {exc.strerror}") from None
            return None

    def _descend(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the directory ``parts`` below the data directory, opened one
        name at a time; ``OSError`` of the first that cannot be opened."""
        fd = self._open_root()
        try:
            for part in parts:
                below = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _walk(self, issues: list[CaptureIssue] | None, *, full: bool = True) -> Iterator[FileEntry]:
        """Every entry, depth first; what it cannot take goes to ``issues`` (if given)."""
        found: list[CaptureIssue] = [] if issues is None else issues
        #: (device, inode) -> first path, of the entries with more than one link
        links: dict[tuple[int, int], str] = {}
        root = self._open_root()
        try:
            stack = [_Dir("", root, os.fstat(root), self._names(root, ""))]
        except BaseException:
            os.close(root)
            raise
        # the directories at stack[first_open:] have a descriptor, the shallower ones not
        first_open = 0
        try:
            while stack:
                top = stack[-1]
                name = next(top.names, None)
                if name is None:
                    stack.pop()
                    if stack and first_open == len(stack):
                        self._reopen(stack[-1], top.fd, found)
                        first_open -= 1
                    if top.fd is not None:
                        os.close(top.fd)
                    continue
                assert top.fd is not None
                path = f"{top.rel}/{name}" if top.rel else name
                try:
                    st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the directory was listed
                except OSError as exc:
                    if exc.errno in _FATAL:
                        raise self._error(f"{path!r}: {exc.strerror}") from None
                    found.append(
                        CaptureIssue(
                            path, IssueKind.UNREADABLE, f"cannot be examined: {exc.strerror}"
                        )
                    )
                    continue
                entry = self._entry(top.fd, name, path, st, issues, full=full)
                if entry is None:
                    continue
                if entry.kind is not FileKind.DIR and st.st_nlink > 1:
                    first = links.setdefault((st.st_dev, st.st_ino), path)
                    if first != path:
                        entry = dataclasses.replace(entry, link=first)
                yield entry
                if entry.kind is FileKind.DIR:
                    below = self._enter(top.fd, name, path, st, found)
                    if below is not None:
                        stack.append(below)
                        if len(stack) - first_open > MAX_DIR_FDS:
                            shallow = stack[first_open]
                            if shallow.fd is not None:
                                os.close(shallow.fd)
                            shallow.fd = None
                            first_open += 1
        finally:
            for frame in stack:
                if frame.fd is not None:
                    os.close(frame.fd)

    def entries(self) -> Iterator[FileEntry]:
        self.issues = []
        return self._walk(self.issues)

    def totals(self) -> tuple[int, int]:
        """The same walk as :meth:`entries`, reading no file (its listings are then in the
        kernel's cache): cheap next to reading the files, and it holds nothing."""
        files = size = 0
        for entry in self._walk(None, full=False):
            if entry.kind is FileKind.FILE and entry.link is None:
                files += 1
                size += entry.size
        return files, size

    # -- reading -------------------------------------------------------------------------------

    def _parts(self, entry: FileEntry) -> list[str]:
        parts = entry.path.split("/")
        if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise self._error(f"{entry.path!r}: not a path inside the capture")
        return parts

    def _parent_fd(self, parts: tuple[str, ...]) -> int:
        """Under ``_dir_lock``: the descriptor of the directory ``parts``, kept for the next
        call (files are opened in walk order, so mostly one directory after another).
        ``OSError`` of the first name that cannot be opened."""
        fd = self._dir_fd
        if fd is None or self._dir_parts != parts:
            self._drop_dir()
            fd = self._descend(parts)
            self._dir_parts, self._dir_fd = parts, fd
        return fd

    def _drop_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
        self._dir_parts = self._dir_fd = None

    def _problem(self, entry: FileEntry, exc: OSError) -> ComputeError:
        if exc.errno in _FATAL:
            return self._error(f"{entry.path!r}: {exc.strerror}")
        if exc.errno == errno.ENOENT:
            return EntryProblem(entry.path, IssueKind.VANISHED, "removed since it was walked")
        if exc.errno in _REPLACED:
            return EntryProblem(entry.path, IssueKind.CHANGED, "replaced since it was walked")
        return EntryProblem(entry.path, IssueKind.UNREADABLE, f"cannot be read: {exc.strerror}")

    def open(self, entry: FileEntry) -> BinaryIO:
        if entry.kind is not FileKind.FILE:
            raise self._error(f"{entry.path!r} is a {entry.kind.value}, not a regular file")
        parts = self._parts(entry)
        # Examined before it is opened for reading: a device node put in the file's place
        # acts on open (a tape rewinds), a FIFO's writer wakes. An O_PATH descriptor opens
        # nothing; once it is known to be the file walked, the same inode is opened for
        # reading through /proc. Without both, a non-blocking open (a FIFO does not hang
        # the backup) then fstat.
        by_path = bool(_O_PATH) and self._proc
        flags = (
            _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            if by_path
            else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
        try:
            with self._dir_lock:
                fd = os.open(parts[-1], flags, dir_fd=self._parent_fd(tuple(parts[:-1])))
        except OSError as exc:
            raise self._problem(entry, exc) from None
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "replaced since it was walked (no longer a regular file)"
            elif entry.identity is not None and (st.st_dev, st.st_ino) != entry.identity[:2]:
                problem = "replaced since it was walked (another inode)"
            elif (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                problem = (
                    f"changed since it was walked ({entry.size} bytes then, {st.st_size} now)"
                    if st.st_size != entry.size
                    else "changed since it was walked (modified)"
                )
            if problem is not None:
                raise EntryProblem(entry.path, IssueKind.CHANGED, problem)
            if not by_path:
                os.set_blocking(fd, True)
                return _EntryFile(fd, entry.path)
            try:
                readable = os.open(f"{_PROC_FD}/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise self._problem(entry, exc) from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the O_PATH descriptor: ``readable`` holds the same inode
        return _EntryFile(readable, entry.path)

    def restat(self, entry: FileEntry) -> FileEntry | None:
        parts = self._parts(entry)
        try:
            with self._dir_lock:
                dir_fd = self._parent_fd(tuple(parts[:-1]))
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                now = self._entry(dir_fd, parts[-1], entry.path, st, None)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._problem(entry, exc) from None
        if now is None:
            return None
        return dataclasses.replace(now, link=entry.link) if entry.link is not None else now

    def current_identity(self, entry: FileEntry) -> tuple[int, ...] | None:
        """One ``stat``, without the owners and xattrs :meth:`restat` reads: what the
        engine asks after reading each file and for every entry once the capture ends."""
        parts = self._parts(entry)
        try:
            with self._dir_lock:
                dir_fd = self._parent_fd(tuple(parts[:-1]))
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._problem(entry, exc) from None
        return _identity(st)

    def names(self, entry: FileEntry) -> list[str] | None:
        """The directory's names now, reached through directory descriptors as the walk
        does (no symlink followed); None when it is gone or cannot be listed."""
        try:
            fd: int = self._descend(tuple(self._parts(entry)))
        except OSError as exc:
            if exc.errno in _FATAL:
                raise self._error(f"{entry.path!r}: {exc.strerror}") from None
            return None
        try:
            return os.listdir(fd)
        except OSError as exc:
            if exc.errno in _FATAL:
                raise self._error(f"{entry.path!r}: {exc.strerror}") from None
            return None
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._dir_lock:
            self._drop_dir()
        super().close()


class LocalFileSink(FileSink):
    """A new instance's data directory, to restore a file tree into before launch.

    :meth:`discard` (a failed restore or launch) removes the directory and the pending
    instance record with it; made by hand, without ``compute``, it removes nothing.
    """

    def __init__(
        self, root: Path, instance_id: str, *, compute: LocalCompute | None = None
    ) -> None:
        super().__init__(root)
        self.instance_id = instance_id
        self.discarded = False
        self._compute = compute

    def discard(self) -> None:
        if self._compute is None or self._compute._discard_sink(self):
            self.discarded = True


# --------------------------------------------------------------------------- the service


class LocalCompute(Compute):
    """One region's instances under ``<root>/compute``."""

    def __init__(
        self,
        *,
        root: Path,
        provider: str,
        region: str,
        capabilities: Capabilities,
        terminate_timeout: float = 10.0,
    ) -> None:
        super().__init__(provider=provider, region=region, capabilities=capabilities)
        self.compute_dir = root / "compute"
        self.instances_dir = self.compute_dir / "instances"
        self._instances_str = str(self.instances_dir)
        self.terminate_timeout = terminate_timeout
        self._lock = _fs.FileLock(self.compute_dir / "compute.lock")
        #: whether this thread holds ``_lock`` (a second hold would wait on the first)
        self._held = threading.local()
        self.index = InstanceIndex(
            self.compute_dir,
            instances_dir=self.instances_dir,
            record_name=RECORD,
            read_record=self._read_or_none,
            list_ids=self._ids,
            lock=self._locked,
            holding=self._holding,
            error=self._error,
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The compute lock, for record changes; the index is repaired first if a crash left
        it behind (providers/local/_index.py)."""
        with self._lock.hold():
            self._held.on = True
            try:
                self.index.repair()
                yield
            finally:
                self._held.on = False

    def _holding(self) -> bool:
        return bool(getattr(self._held, "on", False))

    def close(self) -> None:
        """Close the index's connections (the next use opens new ones)."""
        self.index.close_all()

    # records -----------------------------------------------------------------------

    def _error(self, message: str) -> ComputeError:
        return ComputeError(message, provider=self.provider, region=self.region)

    def _not_found(self, ref: str) -> InstanceNotFound:
        return InstanceNotFound(ref, provider=self.provider, region=self.region)

    def _read(self, instance_id: str) -> dict[str, Any]:
        if not isinstance(instance_id, str) or not _ID.match(instance_id):
            raise self._not_found(str(instance_id))
        try:
            raw = (self.instances_dir / instance_id / RECORD).read_bytes()
        except FileNotFoundError:
            raise self._not_found(instance_id) from None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or record.get("id") != instance_id:
                raise ValueError
        except ValueError:
            raise self._error(f"record of instance {instance_id} is malformed") from None
        return record

    def _read_or_none(self, instance_id: str) -> dict[str, Any] | None:
        try:
            return self._read(instance_id)
        except InstanceNotFound:
            return None  # a directory being created or a sink without a record yet

    def _write(self, record: Mapping[str, Any], *, new_dir: bool = False) -> None:
        """Under the lock: write ``record`` (making its directory first, with ``new_dir``)
        and index it."""
        instance_dir = self.instances_dir / record["id"]
        with self.index.changing(record["id"]) as change:
            if new_dir:
                _fs.ensure_dir(instance_dir)
            data = json.dumps(record, indent=1, sort_keys=True).encode("utf-8")
            _fs.atomic_write(instance_dir / RECORD, data)
            change.stored(record)

    def _remove(self, instance_id: str, what: str) -> None:
        """Under the lock: remove the instance's record, then its directory, and its row."""
        instance_dir = self.instances_dir / instance_id
        with self.index.changing(instance_id) as change:
            try:
                # the record first: a directory without one is never listed, even half-removed
                (instance_dir / RECORD).unlink(missing_ok=True)
                change.removed()
                shutil.rmtree(instance_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(
                    f"cannot remove {what} of {instance_id} in {instance_dir}: "
                    f"{exc.strerror or exc}"
                ) from None

    def _ids(self) -> list[str]:
        """The ids of the instance directories on disk (what the index is rebuilt from)."""
        try:
            with os.scandir(self.instances_dir) as entries:
                return [e.name for e in entries if _ID.match(e.name)]
        except FileNotFoundError:
            return []

    def _instance(self, record: Mapping[str, Any]) -> Instance:
        state = record["state"]
        pid = record.get("pid")
        if (
            state == "running"
            and pid is not None
            and _alive(pid, record.get("pid_ticks"), record) is False
        ):
            _reap(pid)
            state = "stopped"
        return Instance(
            id=record["id"],
            name=record["name"],
            region=self.region,
            tags=Tags(record["tags"]),
            state=state,
            function=record.get("function"),
            capture_kinds=frozenset({CaptureKind.FILES}),
            extra={
                "data_dir": record["data_dir"],
                "pid": pid,
                "created": record["created"],
                # a string join, not two pathlib joins: this runs once per listed instance
                "log": f"{self._instances_str}/{record['id']}/{LOG}",
                "owned_data": record["owned_data"],
            },
        )

    def _check_name(self, name: str) -> None:
        """Under the lock: ``name`` is valid and no live instance has it."""
        if not isinstance(name, str) or not name.strip():
            raise self._error(f"instance name {name!r} is empty")
        if len(name) > MAX_NAME or not name.isprintable():
            raise self._error(
                f"instance name {name[:40]!r}: at most {MAX_NAME} printable characters"
            )
        if _ID.match(name):
            raise self._error(f"instance name {name!r} looks like an instance id")
        holder = self.index.holder(name)
        if holder is not None:
            raise AmbiguousName(
                f"an instance named {name!r} already exists ({holder}); "
                "instance names are unique per region",
                provider=self.provider,
                region=self.region,
            )

    def _tags(self, tags: Mapping[str, str] | None) -> Tags:
        try:
            return validate_tags(tags or {})
        except ComputeError as exc:
            raise self._error(exc.message) from None

    def _new_id(self) -> str:
        return f"i-{secrets.token_hex(8)}"

    def _new_record(
        self,
        instance_id: str,
        *,
        name: str,
        tags: Tags,
        function: str | None,
        data_dir: Path,
        owned: bool,
        state: str,
    ) -> dict[str, Any]:
        return {
            "id": instance_id,
            "name": name,
            "tags": dict(tags),
            "function": function,
            "state": state,
            "created": datetime.now(UTC).isoformat(),
            "data_dir": str(data_dir),
            "owned_data": owned,
            "pid": None,
            "pid_ticks": None,
        }

    @staticmethod
    def _check_function(function: object) -> None:
        if function is not None and (not isinstance(function, str) or not function.strip()):
            raise ComputeError(f"function {function!r} must be a non-empty command line")

    # Compute -----------------------------------------------------------------------

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        if not isinstance(page_size, int) or page_size < 1:
            raise self._error(f"page_size must be a positive integer, got {page_size!r}")
        after = self._decode_token(page_token) if page_token is not None else None
        filters = dict(tag_filters or {})
        # one index query per page, in (name, id) order from the token on (no record read)
        page, more = self.index.page(after, page_size, filters)
        token = self._encode_token(page[-1]["name"], page[-1]["id"]) if more else None
        return InstancePage(tuple(self._instance(r) for r in page), token)

    @staticmethod
    def _encode_token(name: str, instance_id: str) -> str:
        raw = json.dumps([name, instance_id], separators=(",", ":")).encode("utf-8")
        return base64.urlsafe_b64encode(raw).decode("ascii")

    def _decode_token(self, token: str) -> tuple[str, str]:
        try:
            name, instance_id = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
            if not isinstance(name, str) or not isinstance(instance_id, str):
                raise ValueError
        except (ValueError, TypeError, UnicodeError, binascii.Error, AttributeError):
            raise self._error(f"bad page token {token!r}") from None
        return name, instance_id

    def get_instance(self, instance_id: str) -> Instance:
        return self._instance(self._read(instance_id))

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        updates = self._tags(tags)
        with self._locked():
            record = self._live(instance_id)
            merged = Tags(record["tags"]).merged(updates)
            self._tags(merged)
            record["tags"] = dict(merged)
            self._write(record)
            return merged

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        given: object = keys
        if isinstance(given, str) or not all(isinstance(k, str) for k in keys):
            raise self._error(f"remove_tags wants a list of tag keys, got {keys!r}")
        with self._locked():
            record = self._live(instance_id)
            remaining = Tags(record["tags"]).without(keys)
            record["tags"] = dict(remaining)
            self._write(record)
            return remaining

    def _live(self, instance_id: str) -> dict[str, Any]:
        record = self._read(instance_id)
        if record["state"] in ("terminated", "pending"):
            raise self._error(f"instance {instance_id} is {record['state']}")
        return record

    def register_instance(
        self,
        name: str,
        data: Path,
        *,
        function: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Instance:
        """Adopt the directory ``data`` in place as a running instance; its function is not
        started (the workload runs outside regionvault), it is what a launch from its backup
        runs."""
        valid_tags = self._tags(tags)
        self._check_function(function)
        data_dir = Path(data).expanduser().resolve()
        if not data_dir.is_dir():
            raise self._error(f"cannot register {name!r}: {data} is not a directory")
        with self._locked():
            self._check_name(name)
            record = self._new_record(
                self._new_id(),
                name=name,
                tags=valid_tags,
                function=function,
                data_dir=data_dir,
                owned=False,
                state="running",
            )
            self._write(record, new_dir=True)
        return self._instance(record)

    def unregister_instance(self, instance_id: str) -> None:
        """Forget the instance: its record goes, the directory :meth:`register_instance`
        adopted is never touched. A launched instance (its data restored here) is refused
        unless terminated: terminating it stops its process and removes that data."""
        with self._locked():
            record = self._read(instance_id)
            if record["state"] == "pending":
                raise self._error(f"instance {instance_id} is a restore in progress")
            if record["owned_data"] and record["state"] != "terminated":
                raise self._error(
                    f"instance {instance_id} ({record['name']}) was launched by a restore: "
                    "terminate it (which stops it and removes its restored data)"
                )
            self._remove(instance_id, "the record")

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        if kind is not None and CaptureKind(kind) is not CaptureKind.FILES:
            raise self.unsupported(f"capture of kind {kind}")
        instance = self._instance(self._live(instance_id))
        root = Path(instance.extra["data_dir"])
        if not root.is_dir():
            raise self._error(f"data directory {root} of {instance_id} is missing")
        return LocalFileCapture(instance, datetime.now(UTC), root)

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        if CaptureKind(kind) is not CaptureKind.FILES:
            raise self.unsupported(f"restore sink of kind {kind}")
        tags = self._tags(spec.tags)
        self._check_function(spec.function)
        instance_id = self._new_id()
        data_dir = self.instances_dir / instance_id / DATA
        _fs.ensure_dir(data_dir)
        record = self._new_record(
            instance_id,
            name=spec.name,
            tags=tags,
            function=spec.function,
            data_dir=data_dir,
            owned=True,
            state="pending",
        )
        with self._locked():
            self._write(record)
        return LocalFileSink(data_dir, instance_id, compute=self)

    def _discard_sink(self, sink: LocalFileSink) -> bool:
        """Remove a sink's pending record and restored data (True); a launched sink's data
        belongs to its instance now and is left alone (False; ``terminate`` removes it)."""
        instance_dir = self.instances_dir / sink.instance_id
        if not _ID.match(sink.instance_id) or sink.root != instance_dir / DATA:
            raise self._error(f"cannot discard {sink.root}: not a sink of this Compute")
        with self._locked():
            try:
                record: dict[str, Any] | None = self._read(sink.instance_id)
            except InstanceNotFound:
                record = None  # discarded already, or a removal that failed half-way
            if record is not None and record["state"] != "pending":
                log.info("sink %s was launched from: its data stays", sink.instance_id)
                return False
            self._remove(sink.instance_id, "the restored data")
        return True

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        if not isinstance(sink, LocalFileSink):
            raise self._error(f"launch needs a sink from this Compute, got {type(sink).__name__}")
        if sink.discarded:
            raise self._error(f"sink {sink.instance_id} was discarded: restore again to launch")
        tags = self._tags(spec.tags)
        self._check_function(spec.function)
        with self._locked():
            try:
                record = self._read(sink.instance_id)
            except InstanceNotFound:
                raise self._error(
                    f"launch needs a sink from this Compute's open_restore_sink, not {sink.root}"
                ) from None
            if Path(record["data_dir"]) != sink.root:
                raise self._error(f"launch needs a sink from this Compute, not {sink.root}")
            if record["state"] != "pending":
                raise self._error(f"sink {sink.instance_id} was already launched or discarded")
            self._check_name(spec.name)
            record.update(name=spec.name, tags=dict(tags), function=spec.function)
            record["state"] = "running"
            if spec.function:
                record["pid"], record["pid_ticks"] = self._start(record)
                me = ProcessIdentity.current()  # the child's host, boot, namespace, machine
                record["pid_host"], record["pid_boot"] = me.host, me.boot
                record["pid_ns"], record["pid_machine"] = me.pid_ns, me.machine
            self._write(record)
        return self._instance(record)

    def _start(self, record: Mapping[str, Any]) -> tuple[int, int | None]:
        instance_dir = self.instances_dir / record["id"]
        env = {
            **os.environ,
            "REGIONVAULT_DATA_DIR": record["data_dir"],
            "REGIONVAULT_INSTANCE_ID": record["id"],
            "REGIONVAULT_INSTANCE_NAME": record["name"],
            "REGIONVAULT_REGION": self.region,
        }
        with (instance_dir / LOG).open("ab") as output:
            try:
                child = subprocess.Popen(
                    record["function"],
                    shell=True,
                    cwd=record["data_dir"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise self._error(
                    f"cannot start {record['function']!r} for {record['id']}: {exc.strerror}"
                ) from None
        with _children_lock:
            _children[child.pid] = child
        return child.pid, start_ticks(child.pid)

    def terminate(self, instance_id: str) -> None:
        """Stop the process (SIGTERM to its group, SIGKILL after ``terminate_timeout``),
        remove data this provider restored (a registered directory is never touched) and
        mark the instance terminated."""
        with self._locked():
            record = self._read(instance_id)
            if record["state"] == "terminated":
                return
            if record.get("pid") is not None:
                _stop(record["pid"], record.get("pid_ticks"), self.terminate_timeout, record)
            if record["owned_data"]:
                shutil.rmtree(record["data_dir"], ignore_errors=True)
            record["state"] = "terminated"
            record["terminated"] = datetime.now(UTC).isoformat()
            self._write(record)
