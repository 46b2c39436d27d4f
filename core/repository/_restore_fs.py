"""The filesystem side of a restore: entries made relative to open directories
(:class:`OpenDirs`), owners and extended attributes applied where this process may
(:class:`Notes` for what it may not), a staging tree removed, and writeback and ``syncfs``
through the C library where Python's ``os`` lacks them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from regionvault.core.errors import RegionVaultError

__all__ = [
    "CREATE_FLAGS",
    "DIR_FLAGS",
    "NOTE_DEVICES",
    "NOTE_NO_LINK_SOURCE",
    "NOTE_OWNERS",
    "NOTE_SOCKETS",
    "TEMP_PREFIX",
    "Notes",
    "OpenDir",
    "OpenDirs",
    "dir_names",
    "entry_exists",
    "owner_id",
    "remove_tree",
    "set_owner",
    "set_xattrs",
    "start_writeback",
    "sync_filesystem",
]

TEMP_PREFIX = ".rv-tmp-"
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: directories of the tree kept open at once (each file is made relative to its own)
_DIR_CACHE = 128


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A function of the C library that Python's ``os`` lacks (Linux's ``syncfs`` and
    ``sync_file_range``), or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_SYNCFS = _libc_function("syncfs", ctypes.c_int)
_SYNC_FILE_RANGE = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
#: sync_file_range: start writing back the dirty pages, without waiting for them
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a finished file's data to disk without waiting, so the one
    :func:`sync_filesystem` at the end of a restore finds little left to wait for (a hint:
    a failure here is reported by that sync)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def sync_filesystem(fd: int) -> None:
    """Make durable everything written to the filesystem holding the open ``fd``: its
    files' data, their metadata and the renames. One ``syncfs`` costs what the writes
    themselves cost the disk, where an ``fsync`` per file would wait for each in turn; the
    restore's own writes are nearly all of what it waits for. Without ``syncfs`` (not
    Linux), ``sync`` of every filesystem. ``OSError`` when the kernel reports that data
    was lost while written back (Linux 5.8 and later say so)."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


NOTE_SOCKETS = "sockets not recreated (the program that listens on one makes it)"
NOTE_DEVICES = "device nodes not created: not running as root"
NOTE_OWNERS = "owners not restored: not running as root"
NOTE_NO_LINK_SOURCE = "hard links not restored: the name they link to is not in the point"
#: an extended attribute failing with one of these is noted, not fatal: the target
#: filesystem lacks them (ENOTSUP), this process may not set that namespace (EPERM), or
#: (without /proc) the path to a FIFO, device or symlink is too long for setxattr
_XATTR_NOTED = frozenset(
    {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.E2BIG, errno.ERANGE,
     errno.EINVAL, errno.ENAMETOOLONG}
)  # fmt: skip


class Notes:
    """What a restore could not apply, one note per kind of thing, with how many entries it
    concerns and the first of them (thread-safe: the pool's threads add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: dict[str, list[Any]] = {}

    def add(self, message: str, shown: str) -> None:
        with self._lock:
            note = self._notes.get(message)
            if note is None:
                self._notes[message] = [1, shown]
            else:
                note[0] += 1

    def lines(self) -> list[str]:
        with self._lock:
            return [
                f"{message}: {first}" + (f" and {count - 1} more" if count > 1 else "")
                for message, (count, first) in self._notes.items()
            ]


def set_owner(
    notes: Notes, shown: str, where: int | str, uid: int, gid: int, dir_fd: int | None = None
) -> None:
    """Give ``where`` (a file descriptor, or a name in ``dir_fd``, never followed) an owner;
    a refusal (no CAP_CHOWN, an id this system cannot map) is noted."""
    try:
        if isinstance(where, int):
            os.fchown(where, uid, gid)
        else:
            os.chown(where, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise RegionVaultError(f"cannot set the owner of {shown}: {exc.strerror}") from None
        notes.add(f"owners not restored ({exc.strerror})", shown)


def set_xattrs(
    notes: Notes, shown: str, where: int | str, xattrs: Iterable[tuple[bytes, bytes]]
) -> None:
    """Set extended attributes (POSIX ACLs among them) on ``where``: a file descriptor, or a
    path whose last part is not followed."""
    for name, value in xattrs:
        try:
            if isinstance(where, int):
                os.setxattr(where, name, value)
            else:
                os.setxattr(where, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _XATTR_NOTED:
                raise RegionVaultError(
                    f"cannot set extended attribute {os.fsdecode(name)} of {shown}: {exc.strerror}"
                ) from None
            notes.add(
                f"extended attributes not restored ({exc.strerror})",
                f"{shown} ({os.fsdecode(name)})",
            )


def entry_exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def dir_names(dir_fd: int) -> list[str]:
    """The names in the open directory ``dir_fd``."""
    with os.scandir(dir_fd) as entries:
        return [entry.name for entry in entries]


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` in the open directory ``parent_fd`` and everything under it, through
    directory descriptors (so no path length limits it), making each directory writable
    first (a restore may have made it read-only)."""
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    stack: list[tuple[int, str, int]] = []

    def enter(at: int, child: str) -> None:
        with contextlib.suppress(OSError):
            os.chmod(child, 0o700, dir_fd=at)
        stack.append((at, child, os.open(child, DIR_FLAGS, dir_fd=at)))

    enter(parent_fd, name)
    try:
        while stack:
            at, child, fd = stack[-1]
            subdir = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdir = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if subdir is not None:
                enter(fd, subdir)
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(child, dir_fd=at)
    finally:
        for _, _, fd in stack:
            os.close(fd)


class OpenDir:
    """A directory of the tree being restored, open; ``users`` counts who holds it (its
    cache entry is one of them)."""

    __slots__ = ("cached", "dirs", "fd", "rel", "users")

    def __init__(self, dirs: OpenDirs, fd: int, rel: str) -> None:
        self.dirs = dirs
        self.fd = fd
        self.rel = rel
        self.users = 1
        self.cached = True

    def release(self) -> None:
        self.dirs.release(self)


class OpenDirs:
    """The open directories of the tree being restored, by tree path ("" is the base).

    Each is opened once with O_DIRECTORY|O_NOFOLLOW relative to its parent (made owner-only
    first where missing), so no call is given more than one name and no path length limits
    a restore, and nothing is ever made through a symlink. At most :data:`_DIR_CACHE` stay open:
    the least recently used is closed first (one still held is closed when let go), and is
    opened again, walking down from its nearest open ancestor, when needed again."""

    def __init__(self, base_fd: int, shown: str) -> None:
        self._lock = threading.Lock()
        self.base = OpenDir(self, base_fd, "")
        self.shown = shown
        self._limit = max(2, _DIR_CACHE)
        self._cache: OrderedDict[str, OpenDir] = OrderedDict()
        #: directories made or found by this restore: no mkdir for them again
        self._known: set[str] = set()
        self._held: set[OpenDir] = set()

    def get(self, rel: str) -> OpenDir:
        """The directory ``rel``, made where missing; :meth:`OpenDir.release` it when done."""
        with self._lock:
            directory = self._lookup(rel)
            directory.users += 1
            return directory

    def release(self, directory: OpenDir) -> None:
        with self._lock:
            directory.users -= 1
            if directory.users == 0:
                self._held.discard(directory)
                os.close(directory.fd)

    def rebase(self, base_fd: int) -> None:
        """The tree now lies in ``base_fd`` (a staging directory's entries were moved
        there); the directories open under it stay valid."""
        with self._lock:
            self.base = OpenDir(self, base_fd, "")

    def close(self) -> None:
        with self._lock:
            for directory in self._held:  # every directory still open (the cached ones too)
                with contextlib.suppress(OSError):
                    os.close(directory.fd)
            self._cache.clear()
            self._held.clear()

    def _lookup(self, rel: str) -> OpenDir:
        if not rel:
            return self.base
        directory = self._cache.get(rel)
        if directory is not None:
            self._cache.move_to_end(rel)
            return directory
        # walk down from the nearest open ancestor
        parent, start, cut = self.base, 0, len(rel)
        while (cut := rel.rfind("/", 0, cut)) > 0:
            ancestor = self._cache.get(rel[:cut])
            if ancestor is not None:
                parent, start = ancestor, cut + 1
                break
        while True:
            slash = rel.find("/", start)
            sub = rel if slash < 0 else rel[:slash]
            parent = self._open(parent, sub, sub[start:])
            if slash < 0:
                return parent
            start = slash + 1

    def _open(self, parent: OpenDir, rel: str, name: str) -> OpenDir:
        if rel not in self._known:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent.fd)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise RegionVaultError(
                    f"restore target {self.shown}/{rel} exists and is not a directory; "
                    "restore into an empty directory"
                ) from None
            raise RegionVaultError(f"cannot restore {self.shown}/{rel}: {exc.strerror}") from None
        self._known.add(rel)
        directory = self._cache[rel] = OpenDir(self, fd, rel)
        self._held.add(directory)
        while len(self._cache) > self._limit:
            _, old = self._cache.popitem(last=False)
            old.cached = False
            old.users -= 1
            if old.users == 0:
                self._held.discard(old)
                os.close(old.fd)
        return directory


def owner_id(lookup: Any, name: bytes, number: int) -> int:
    """The id of ``name`` on this system, else ``number`` (-1: leave it)."""
    if name:
        try:
            return int(lookup(os.fsdecode(name))[2])
        except (KeyError, UnicodeError):
            pass
    return number
