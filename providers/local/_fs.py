"""Crash-safe file primitives shared by the local services.

Every durable write goes the same way: the bytes land in a temporary file in the target's own
directory, are fsynced, and the temporary file is renamed over the target (``os.replace``) or
hard-linked to it (``os.link``, which fails if the target exists, so check-and-create is one
atomic step); then the directory is fsynced so the new name survives a power cut. A reader
therefore sees the old file or the whole new one, never part of either, whatever kills the
writer. A killed writer can leave a temporary file behind; its name starts with
:data:`TEMP_PREFIX`, listings skip it and :func:`remove_stale_temp` clears it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from regionvault.core.names import TEMP_PREFIX
from regionvault.core.procs import ProcessIdentity
from regionvault.core.types import Temporary

__all__ = [
    "FileLock",
    "atomic_write",
    "create_temp",
    "ensure_dir",
    "fsync_dir",
    "is_temp",
    "publish",
    "remove_empty_parents",
    "remove_stale_temp",
    "remove_temp",
    "stale_temps",
    "temp_owner",
    "walk_files",
    "write_temp",
]

#: (pid, token) of this process, as named in the temporary files it creates
_owner: tuple[int, str] | None = None


def _owner_token() -> str:
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:  # first use, or a forked child
        _owner = (pid, ProcessIdentity.current().token())
    return _owner[1]


#: at most this many bytes go to one write(2) call, so a large put is many bounded writes
WRITE_CHUNK = 8 << 20


def is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def walk_files(top: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(name, entry)`` of every regular file under ``top`` whose '/'-separated name
    relative to ``top`` starts with ``prefix`` (checked by ``names.prefix_problem``); only
    the directory the prefix names is walked; temporary files are skipped; any order."""
    stack = [prefix.rpartition("/")[0]]
    while stack:
        rel = stack.pop()
        try:
            scan = os.scandir(top / rel if rel else top)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with scan:
            for entry in scan:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if name.startswith(prefix) or prefix.startswith(name + "/"):
                        stack.append(name)
                elif (
                    name.startswith(prefix)
                    and not is_temp(entry.name)
                    and entry.is_file(follow_symlinks=False)
                ):
                    yield name, entry


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, mode: int = 0o755) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent that gained an entry."""
    if path.is_dir():
        return
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        fsync_dir(directory.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:WRITE_CHUNK])
        view = view[written:]


def create_temp(directory: Path, *, mode: int = 0o644) -> tuple[int, Path]:
    """Create a new empty temporary file in ``directory`` (made if needed): its descriptor
    and path. Callers that race deletes emptying ``directory`` create it under their lock."""
    for attempt in range(3):
        # the writer's identity is in the name, so a sweep can tell a live writer's file
        tmp = directory / f"{TEMP_PREFIX}{_owner_token()}-{secrets.token_hex(8)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), tmp
        except FileNotFoundError:
            # the directory is missing, or a concurrent delete just removed it as empty
            if attempt == 2:
                raise
            ensure_dir(directory)
    raise AssertionError("unreachable")


def write_temp(
    directory: Path,
    data: bytes | memoryview,
    *,
    mode: int = 0o644,
    created: tuple[int, Path] | None = None,
) -> Path:
    """Write ``data`` to a new fsynced temporary file in ``directory`` (created if needed),
    or into the one :func:`create_temp` gave (``created``)."""
    fd, tmp = created if created is not None else create_temp(directory, mode=mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.strerror is not None:
            # a failed write(2) names no file: name the directory written into (disk full)
            raise OSError(exc.errno, exc.strerror, str(directory)) from None
        raise
    os.close(fd)
    return tmp


def publish(tmp: Path, final: Path, *, if_absent: bool = False, sync_dir: bool = True) -> bool:
    """Move ``tmp`` to ``final`` atomically and durably. With ``if_absent``, leave an existing
    ``final`` alone and return False. ``tmp`` is gone afterwards either way. With
    ``sync_dir=False`` the caller fsyncs ``final.parent`` itself (to do it outside a lock)."""
    try:
        if if_absent:
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        else:
            tmp.replace(final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(final.parent)
    return True


def atomic_write(
    final: Path, data: bytes | memoryview, *, if_absent: bool = False, mode: int = 0o644
) -> bool:
    """Write ``final`` atomically (see the module docstring); False if ``if_absent`` found it
    taken."""
    tmp = write_temp(final.parent, data, mode=mode)
    return publish(tmp, final, if_absent=if_absent)


def remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove ``path``'s parent directories up to (not including) ``stop`` while empty."""
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return
            raise
        parent = parent.parent


def temp_owner(name: str) -> ProcessIdentity | None:
    """The process that created temporary file ``name`` (None: not recorded, as in the
    names of releases before the owner went into them)."""
    token, sep, _ = name[len(TEMP_PREFIX) :].rpartition("-")
    return ProcessIdentity.from_token(token) if sep else None


def stale_temps(top: Path, older_than: timedelta) -> Iterator[Temporary]:
    """The temporary files under ``top`` that no live writer can still be writing: their
    writer (named in the file name) has exited on this host, or they were last written more
    than ``older_than`` ago. ``handle`` is the path relative to ``top``."""
    now = time.time()
    cutoff = now - older_than.total_seconds()
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            if not is_temp(name):
                continue
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            owner = temp_owner(name)
            # another boot is not taken for this machine's: the vault's directory may be
            # shared by clones of one machine id (core/procs.py); the age decides then
            alive = None if owner is None else owner.alive(trust_machine_id=False)
            if alive is False:
                reason = f"its writer (pid {owner.pid}) is gone"  # type: ignore[union-attr]
            elif st.st_mtime < cutoff:
                reason = f"not written for more than {older_than}"
            else:
                continue
            rel = path.relative_to(top).as_posix()
            yield Temporary(
                handle=rel,
                name=None,  # a temporary file does not say which object it was to be
                size=st.st_size,
                modified=datetime.fromtimestamp(st.st_mtime, UTC),
                owner=None if owner is None else f"{owner.host}:{owner.pid}",
                reason=reason,
            )


def remove_temp(top: Path, handle: str) -> None:
    """Remove the temporary file ``handle`` (relative to ``top``) found by
    :func:`stale_temps`; gone already is fine. Refuses anything but a temporary file."""
    path = top / handle
    if not is_temp(path.name) or ".." in Path(handle).parts:
        raise ValueError(f"{handle!r} is not a temporary file")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_stale_temp(top: Path, older_than: float) -> int:
    """Delete temporary files under ``top`` last modified more than ``older_than`` seconds
    ago (left by killed writers); return how many were removed."""
    cutoff = time.time() - older_than
    removed = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            if not is_temp(name):
                continue
            path = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
    return removed


class FileLock:
    """An exclusive lock between threads and processes: ``flock`` on a descriptor opened
    for each hold (separate open files exclude each other even within one process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        ensure_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock
