"""Restore of a file tree (:class:`FileRestorer`): a recovery point's tree is streamed in
order and planned in batches; the pool fetches each batch's chunks with ranged gets grouped
by pack, verifies them, and writes them into the files at their offsets, in parallel (see
:class:`ParallelWriter`, in ``_restore_writer``).

Why this module is longer than the others: :class:`FileRestorer` is one state machine (the
marker, the staging directory, the order entries are made in, resumption, publishing), whose
steps share its open directories and its marker; split, each piece would reach into the
others' state. The writer (``_restore_writer``), the filesystem primitives
(``_restore_fs``) and block images (``_restore_blocks``) live apart.

Into a new or empty directory, the whole tree is restored inside a hidden staging directory
in it, under a marker (:data:`MARKER_NAME`) written before anything else and removed last,
its entries moved to their names once every file is complete, and the staging directory
removed on failure; a restore killed at any moment is finished by running it again. Into a
directory that already holds something, each entry is made under a temporary name and
renamed into place once complete. Either way nothing unverified ever appears under a
restored name. With ``sync``, the restore ends by making it durable (each file's writeback
started as it completes, then one :func:`sync_filesystem`) before the marker is removed;
without (the default, as restic and borg), the kernel writes it back in its own time.

Every entry is made relative to its open parent directory (:class:`OpenDirs`), so no path
length limits a restore. Directories are created as met (owner-only until the end), files
completed (owner, extended attributes, mode, mtime) by the thread that writes them last,
FIFOs and device nodes made as met, symlinks after every file (so no restored file is
written through a restored link), then hard links, and directory metadata applied last,
deepest first. What this process cannot apply (owners and device nodes when not root,
sockets, extended attributes the target refuses) becomes a :class:`Notes` line, not an
error."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from regionvault.core.errors import IntegrityError, RegionVaultError
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._restore_fs import (
    DIR_FLAGS,
    NOTE_DEVICES,
    NOTE_NO_LINK_SOURCE,
    NOTE_OWNERS,
    NOTE_SOCKETS,
    TEMP_PREFIX,
    OpenDirs,
    dir_names,
    entry_exists,
    owner_id,
    remove_tree,
    set_owner,
    set_xattrs,
    sync_filesystem,
)
from regionvault.core.repository._restore_writer import ParallelWriter
from regionvault.core.repository._tree import decode_path, path_problem

__all__ = ["MARKER_NAME", "FileRestorer", "Selection"]

#: a restore into a new or empty directory keeps this file in it until it is complete
MARKER_NAME = ".rv-restore"
#: /proc/self/fd/N names an open directory for the calls that take no dir_fd (setxattr)
_PROC_FD = Path("/proc/self/fd").is_dir()


class Selection:
    """Which tree paths a restore takes: the given paths, everything under them, and the
    directories above them."""

    def __init__(self, paths: Iterable[str]) -> None:
        cleaned = []
        for path in paths:
            p = path.strip("/")
            problem = path_problem(p)
            if problem is not None:
                raise RegionVaultError(f"restore path {path!r} {problem}")
            cleaned.append(p)
        self.paths = sorted(set(cleaned))
        self._ancestors = {
            "/".join(p.split("/")[:i]) for p in self.paths for i in range(1, p.count("/") + 1)
        }
        self.matched: set[str] = set()

    def __contains__(self, path: str) -> bool:
        for sel in self.paths:
            if path == sel or path.startswith(sel + "/"):
                self.matched.add(sel)
                return True
        return path in self._ancestors

    def ancestor(self, path: str) -> bool:
        return path in self._ancestors


class FileRestorer:
    """Restores a file tree into ``root`` (see the module docstring for how) and says what it
    could not apply (:meth:`run` returns the notes).

    Owners are restored when running as root: by name when that user or group exists on
    this system, else by number. Device nodes are made only as root, sockets never (the
    program that listens on one makes it); FIFOs always. Each of these, and an extended
    attribute the target filesystem or this process cannot set, is a note, not an error.

    Into a new or empty directory the restore keeps a marker (:data:`MARKER_NAME`) in it
    from before its staging directory exists until everything is in place: a re-run of the
    same restore (same ``point_id``, same selection) after a kill at any moment clears what
    the killed one left and restores again; any other restore refuses that target."""

    def __init__(
        self,
        writer: ParallelWriter,
        root: Path,
        *,
        what: str,
        point_id: str = "",
        sync: bool = False,
    ) -> None:
        self.writer = writer
        self.root = root
        self.what = what
        self.point_id = point_id
        #: make the restore durable before it ends (one syncfs); off (the default, as restic
        #: and borg): the kernel's writeback
        self.sync = sync
        self.notes = writer.notes
        self.is_root = os.geteuid() == 0
        self._euid = os.geteuid()
        self._egid = os.getegid()
        self._root_fd = -1
        self._marker_fd = -1
        #: the marker in ``root`` is this restore's (written, or taken over from a killed one)
        self._marked = False
        self._staging: str | None = None
        self._dirs: OpenDirs | None = None
        self._dir_meta: list[tuple[str, fmt.RawRecord]] = []
        self._symlinks: list[tuple[str, fmt.RawRecord]] = []
        #: hard links: (path, the earlier path it links to)
        self._links: list[tuple[str, str]] = []
        #: entries deliberately not made (sockets; devices when not root): the note said why
        self._absent: dict[str, str] = {}
        self._owner_ids: dict[tuple[int, int, bytes, bytes], tuple[int, int]] = {}

    @property
    def dirs(self) -> OpenDirs:
        assert self._dirs is not None
        return self._dirs

    # -- entries -------------------------------------------------------------------------

    def _entry_path(self, raw: bytes) -> str:
        path = decode_path(raw)
        problem = path_problem(path)
        if problem is not None:
            raise IntegrityError(self.what, f"tree entry path {path!r} {problem}")
        return path

    def _shown(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _owner(self, record: fmt.RawRecord, shown: str) -> tuple[int, int] | None:
        """(uid, gid) to give an entry, None to leave it (not recorded, or not root)."""
        if record.uid < 0 and record.gid < 0 and not record.user and not record.group:
            return None
        key = (record.uid, record.gid, record.user, record.group)
        ids = self._owner_ids.get(key)
        if ids is None:
            ids = self._owner_ids[key] = (
                owner_id(pwd.getpwnam, record.user, record.uid),
                owner_id(grp.getgrnam, record.group, record.gid),
            )
        if self.is_root:
            return ids
        uid, gid = ids
        if (uid >= 0 and uid != self._euid) or (gid >= 0 and gid != self._egid):
            self.notes.add(NOTE_OWNERS, shown)
        return None

    def _temp_name(self) -> str:
        return f"{TEMP_PREFIX}{secrets.token_hex(8)}"

    def _file(self, path: str, record: fmt.RawRecord) -> None:
        parent, _, name = path.rpartition("/")
        directory = self.dirs.get(parent)
        shown = self._shown(path)
        writer = self.writer
        if self._staging is not None:
            target = writer.target(
                name, None, record.size, record.mode, record.mtime_ns, directory, shown
            )
        else:
            target = writer.target(
                self._temp_name(), name, record.size, record.mode, record.mtime_ns,
                directory, shown,
            )  # fmt: skip
        target.owner = self._owner(record, shown)
        target.xattrs = record.xattrs
        offset = 0
        for chunk_id in record.chunk_ids():
            offset += writer.add(target, chunk_id, offset)
        if offset != record.size:
            raise IntegrityError(
                self.what,
                f"file {path!r}: its chunks hold {offset} bytes, its entry says {record.size}",
            )
        writer.release(target)

    def _metadata(self, dir_fd: int, name: str, shown: str, record: fmt.RawRecord) -> None:
        """Owner, extended attributes, mode (not of a symlink) and mtime of an entry made
        by name: a FIFO, a device node or a symlink."""
        owner = self._owner(record, shown)
        if owner is not None:
            set_owner(self.notes, shown, name, *owner, dir_fd=dir_fd)
        if record.xattrs:
            set_xattrs(self.notes, shown, self._xattr_path(dir_fd, name, shown), record.xattrs)
        if record.tag != fmt.TAG_SYMLINK:
            os.chmod(name, stat.S_IMODE(record.mode), dir_fd=dir_fd)
        os.utime(name, ns=(record.mtime_ns, record.mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)  # fmt: skip

    def _xattr_path(self, dir_fd: int, name: str, shown: str) -> str:
        """A path to ``name`` in the open directory ``dir_fd`` for setxattr, which takes no
        dir_fd: through /proc (short whatever the depth; the /proc link is followed, ``name``
        is not), else the whole path (then limited by PATH_MAX: a longer one is noted)."""
        if _PROC_FD:
            return f"/proc/self/fd/{dir_fd}/{name}"
        base = self.root if self._staging is None else self.root / self._staging
        parent = shown[len(str(self.root)) + 1 :].rpartition("/")[0]
        return f"{base}/{parent}/{name}" if parent else f"{base}/{name}"

    def _made(self, path: str, record: fmt.RawRecord, make: Any) -> None:
        """Make the entry ``path`` with ``make(name, dir_fd)`` and give it its metadata:
        under its name in a staging directory, else under a temporary name renamed to it."""
        parent, _, name = path.rpartition("/")
        directory = self.dirs.get(parent)
        shown = self._shown(path)
        made = name if self._staging is not None else self._temp_name()
        try:
            make(made, directory.fd)
            self._metadata(directory.fd, made, shown, record)
            if made != name:
                os.replace(made, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except OSError as exc:
            if made != name:
                with contextlib.suppress(OSError):
                    os.unlink(made, dir_fd=directory.fd)
            raise RegionVaultError(f"cannot restore {shown}: {exc.strerror}") from None
        finally:
            directory.release()

    def _node(self, path: str, record: fmt.RawRecord) -> None:
        """A FIFO or a device node (made), or a socket (noted)."""
        tag = record.tag
        if tag == fmt.TAG_SOCKET:
            self.notes.add(NOTE_SOCKETS, self._shown(path))
            self._absent[path] = NOTE_SOCKETS
            return
        if tag != fmt.TAG_FIFO and not self.is_root:
            self.notes.add(NOTE_DEVICES, self._shown(path))
            self._absent[path] = NOTE_DEVICES
            return

        denied = []

        def make(name: str, dir_fd: int) -> None:
            if tag == fmt.TAG_FIFO:
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
                return
            kind = stat.S_IFCHR if tag == fmt.TAG_CHARDEV else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, record.rdev, dir_fd=dir_fd)
            except PermissionError:
                denied.append(True)
                raise

        try:
            self._made(path, record, make)
        except RegionVaultError:
            if not denied:
                raise
            # root without CAP_MKNOD (a container): noted like not being root
            note = "device nodes not created: not permitted here"
            self.notes.add(note, self._shown(path))
            self._absent[path] = note

    def _symlink(self, path: str, record: fmt.RawRecord) -> None:
        target = decode_path(record.target)

        def make(name: str, dir_fd: int) -> None:
            os.symlink(target, name, dir_fd=dir_fd)

        self._made(path, record, make)

    def _hard_link(self, path: str, source: str) -> None:
        if source in self._absent:
            self.notes.add(self._absent[source], self._shown(path))
            return
        src_parent, _, src_name = source.rpartition("/")
        parent, _, name = path.rpartition("/")
        src_dir = self.dirs.get(src_parent)
        directory = self.dirs.get(parent)
        made = name if self._staging is not None else self._temp_name()
        try:
            os.link(
                src_name, made, src_dir_fd=src_dir.fd, dst_dir_fd=directory.fd,
                follow_symlinks=False,
            )  # fmt: skip
            if made != name:
                os.replace(made, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except OSError as exc:
            if made != name:
                with contextlib.suppress(OSError):
                    os.unlink(made, dir_fd=directory.fd)
            if exc.errno == errno.ENOENT and not entry_exists(src_name, src_dir.fd):
                # a point whose backup left the first name out (an older point of the sqlite
                # hook, which omitted a -wal with a second name): the rest is still restored
                self.notes.add(NOTE_NO_LINK_SOURCE, self._shown(path))
                return
            raise RegionVaultError(
                f"cannot restore {self._shown(path)} (a hard link to {source}): {exc.strerror}"
            ) from None
        finally:
            directory.release()
            src_dir.release()

    def _entry(self, path: str, record: fmt.RawRecord) -> None:
        """Restore a non-directory entry (a file now; a symlink after every file)."""
        tag = record.tag
        if tag == fmt.TAG_FILE:
            self._file(path, record)
        elif tag == fmt.TAG_SYMLINK:
            self._symlinks.append((path, record))
        elif tag in (fmt.TAG_FIFO, fmt.TAG_SOCKET, fmt.TAG_CHARDEV, fmt.TAG_BLOCKDEV):
            self._node(path, record)
        else:
            raise IntegrityError(self.what, f"tree entry {path!r} has unknown tag {tag}")

    @staticmethod
    def _selected(path: str, selection: Selection | None) -> bool:
        return selection is None or (path in selection and not selection.ancestor(path))

    def _tree(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        report = self.writer.report
        for record in records:
            if record.tag == fmt.TAG_EXTENT:
                raise IntegrityError(self.what, "file tree holds a block extent")
            path = self._entry_path(record.path)
            if selection is not None:
                if path not in selection:
                    continue
                if record.tag != fmt.TAG_DIR and selection.ancestor(path):
                    continue
            if path == MARKER_NAME and self._staging is not None:
                raise self._marker_entry_refused()
            if record.tag == fmt.TAG_DIR:
                self.dirs.get(path).release()
                self._dir_meta.append((path, record))
            elif record.link:
                self._links.append((path, self._entry_path(record.link)))
            else:
                self._entry(path, record)
            report.tick()

    def _link_sources(self, records: Iterator[fmt.RawRecord], selection: Selection | None) -> None:
        """Hard links whose earlier path the selection left out: that entry is restored at
        the first such link, and the others link to it (a second pass over the tree)."""
        if selection is None:
            return
        wanted: dict[str, list[str]] = {}
        for path, source in self._links:
            if not self._selected(source, selection):
                wanted.setdefault(source, []).append(path)
        if not wanted:
            return
        moved: dict[str, str] = {}
        for record in records:
            path = decode_path(record.path)
            paths = wanted.pop(path, None)
            if paths is None:
                continue
            if record.link or record.tag == fmt.TAG_DIR:
                raise IntegrityError(
                    self.what, f"hard link to {path!r}, which is a directory or a link"
                )
            self._entry(paths[0], record)
            moved[path] = paths[0]
            if not wanted:
                break
        for paths in wanted.values():  # no such entry: noted, as in a whole restore
            for path in paths:
                self.notes.add(NOTE_NO_LINK_SOURCE, self._shown(path))
        self._links = [
            (path, moved.get(source, source))
            for path, source in self._links
            if path != moved.get(source) and source not in wanted
        ]

    def _apply_dir_meta(self) -> None:
        """Directory owners, extended attributes, modes and mtimes: last (nothing is made in
        them afterwards), deepest first (a read-only parent stays writable until then)."""
        for path, record in reversed(self._dir_meta):
            directory = self.dirs.get(path)
            shown = self._shown(path)
            try:
                owner = self._owner(record, shown)
                if owner is not None:
                    set_owner(self.notes, shown, directory.fd, *owner)
                if record.xattrs:
                    set_xattrs(self.notes, shown, directory.fd, record.xattrs)
                os.fchmod(directory.fd, stat.S_IMODE(record.mode))
                os.utime(directory.fd, ns=(record.mtime_ns, record.mtime_ns))
            except OSError as exc:
                raise RegionVaultError(f"cannot restore {shown}: {exc.strerror}") from None
            finally:
                directory.release()

    # -- the run -------------------------------------------------------------------------

    def run(
        self,
        records: Callable[[], Iterator[fmt.RawRecord]],
        selection: Selection | None,
    ) -> list[str]:
        """Restore the tree ``records()`` streams (called again only when a hard link's
        earlier path lies outside ``selection``); the notes of what was not applied."""
        try:
            self._begin(selection)
            if self._staging is not None:
                self._refuse_marker_entry(records, selection)
            try:
                self._tree(records(), selection)
                self._link_sources(records(), selection)
                self.writer.close()
            except BaseException:
                self.writer.abort()
                raise
            for path, record in self._symlinks:
                self._symlink(path, record)
            for path, source in self._links:
                self._hard_link(path, source)
            if self._staging is not None:
                self._publish()
            self._apply_dir_meta()
            self._end()
        except BaseException:
            self._discard()
            raise
        finally:
            self._close()
        self.writer.report.tick(done=True)
        return self.notes.lines()

    def _marker_entry_refused(self) -> RegionVaultError:
        return RegionVaultError(
            f"cannot restore {self.root / MARKER_NAME} into a new or empty directory: it is "
            "the name of the restore marker (restore the point's other paths)"
        )

    def _refuse_marker_entry(
        self, records: Callable[[], Iterator[fmt.RawRecord]], selection: Selection | None
    ) -> None:
        """Under a marker, a top-level entry named like it cannot be put in place: refused
        before anything is restored. Capture order lists the top level by the bytes of its
        names, so the tree is read only up to the first name after the marker's (the
        restore checks every record again as it meets it)."""
        if selection is not None:
            if any(p.split("/")[0] == MARKER_NAME for p in selection.paths):
                raise self._marker_entry_refused()
            return
        marker = MARKER_NAME.encode()
        stream = records()
        try:
            for record in stream:
                if b"/" in record.path:
                    continue
                if record.path == marker:
                    raise self._marker_entry_refused()
                if record.path > marker:
                    return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # left part-read: its reads end now

    def _begin(self, selection: Selection | None) -> None:
        """Open ``root`` (made if missing). Restore into a staging directory, under a
        marker, when it is new, empty, or holds this same restore's marker; in place (each
        entry under a temporary name first) when it holds anything else."""
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionVaultError(f"cannot restore into {root}: {exc.strerror}") from None
        paths = None if selection is None else selection.paths
        marker = self._take_marker()
        if marker is None and dir_names(self._root_fd):
            self._dirs = OpenDirs(self._root_fd, str(root))
            return
        if marker is not None:
            staging = self._resume(marker, paths)
        else:
            staging = self._temp_name()
            self._write_marker(staging, paths)
        self._marked = True
        os.mkdir(staging, 0o700, dir_fd=self._root_fd)
        self._staging = staging
        staging_fd = os.open(staging, DIR_FLAGS, dir_fd=self._root_fd)
        self._dirs = OpenDirs(staging_fd, str(root))

    def _take_marker(self) -> dict[str, Any] | None:
        """Another restore's marker in ``root``, locked for this one, as it says (an empty
        dict for one cut short while it was written); None when there is none. An entry of
        that name that is not a regular file is no marker, and is never opened (a FIFO
        would hang the read, a device act on the open)."""
        try:
            st = os.stat(MARKER_NAME, dir_fd=self._root_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return None
            fd = os.open(MARKER_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self._root_fd)  # fmt: skip
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegionVaultError(
                f"cannot read {self.root / MARKER_NAME}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
            os.close(fd)
            return None
        self._marker_fd = fd
        self._lock_marker()
        raw = b""
        while chunk := os.read(fd, 1 << 16):
            raw += chunk
        try:
            marker = json.loads(raw)
        except ValueError:
            return {}
        return marker if isinstance(marker, dict) else {}

    def _lock_marker(self) -> None:
        try:
            fcntl.flock(self._marker_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegionVaultError(
                f"restore target {self.root} is in use: another restore into it is running"
            ) from None

    def _write_marker(self, staging: str, paths: list[str] | None) -> None:
        """Write the marker durably before anything else is made in ``root``."""
        data = json.dumps(
            {"restore": self.point_id, "paths": paths, "staging": staging}, sort_keys=True
        ).encode()
        if self._marker_fd < 0:
            try:
                self._marker_fd = os.open(
                    MARKER_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=self._root_fd,
                )
            except FileExistsError:
                raise RegionVaultError(
                    f"restore target {self.root} is in use: another restore into it is running"
                ) from None
            self._lock_marker()
        fd = self._marker_fd
        os.ftruncate(fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.fsync(fd)
        os.fsync(self._root_fd)

    def _resume(self, marker: dict[str, Any], paths: list[str] | None) -> str:
        """A killed restore's marker: if it is this same restore's, clear what it left and
        return its staging name; else refuse."""
        if not marker:
            # cut short while being written, so before anything else was made
            if [n for n in dir_names(self._root_fd) if n != MARKER_NAME]:
                raise RegionVaultError(
                    f"restore target {self.root} holds an unreadable restore marker "
                    f"{MARKER_NAME} and other entries: empty it, or restore elsewhere"
                )
            fresh = self._temp_name()
            self._write_marker(fresh, paths)
            return fresh
        staging = marker.get("staging")
        if marker.get("restore") != self.point_id or marker.get("paths") != paths:
            what = f"{marker.get('restore')}"
            if marker.get("paths"):
                what += f" (paths {', '.join(map(str, marker['paths']))})"
            raise RegionVaultError(
                f"restore target {self.root} holds an unfinished restore of point {what}: "
                "re-run that restore to finish it, or empty the directory"
            )
        if not (
            isinstance(staging, str)
            and staging.startswith(TEMP_PREFIX)
            and path_problem(staging) is None
            and "/" not in staging
        ):
            raise RegionVaultError(f"restore marker {self.root / MARKER_NAME} is damaged")
        self._clear_root()
        return staging

    def _clear_root(self) -> None:
        """Remove everything in ``root`` but the marker: a restore under a marker began with
        ``root`` empty, so all of it is that restore's."""
        for name in dir_names(self._root_fd):
            if name != MARKER_NAME:
                remove_tree(self._root_fd, name)

    def _publish(self) -> None:
        """Move every entry of the staging directory to its name in ``root``."""
        assert self._staging is not None
        staging_fd = self.dirs.base.fd
        for name in sorted(dir_names(staging_fd)):
            if name == MARKER_NAME:
                raise RegionVaultError(
                    f"cannot restore {self.root / name}: the name of the restore marker"
                )
            try:
                os.rename(name, name, src_dir_fd=staging_fd, dst_dir_fd=self._root_fd)
            except OSError as exc:
                raise RegionVaultError(
                    f"cannot restore {self.root / name}: {exc.strerror}"
                ) from None
        os.rmdir(self._staging, dir_fd=self._root_fd)
        self._staging = None
        self.dirs.rebase(self._root_fd)
        os.close(staging_fd)

    def _end(self) -> None:
        """The restore is complete: with ``sync``, made durable (one ``syncfs`` of the
        target's filesystem, which holds all of a restore under a marker), then its marker
        goes last, so a power loss before then leaves a marker and a re-run restores
        again."""
        try:
            if self.sync:
                sync_filesystem(self._root_fd)
        except OSError as exc:
            raise RegionVaultError(
                f"cannot restore into {self.root}: {exc.strerror} (writing the data back)"
            ) from None
        if self._marker_fd >= 0:
            os.unlink(MARKER_NAME, dir_fd=self._root_fd)
            os.fsync(self._root_fd)

    def _discard(self) -> None:
        """After a failure: under a marker, leave ``root`` as empty as it was (the marker
        last, and only if the rest went); else the writer removed its temporary files."""
        if not self._marked:
            return
        try:
            self._clear_root()
            os.unlink(MARKER_NAME, dir_fd=self._root_fd)
        except OSError:
            pass  # the marker stays: a re-run of this restore clears the rest

    def _close(self) -> None:
        if self._dirs is not None:
            base = self._dirs.base
            self._dirs.close()
            if base.fd != self._root_fd:
                with contextlib.suppress(OSError):
                    os.close(base.fd)
        for fd in (self._marker_fd, self._root_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._marker_fd = self._root_fd = -1
