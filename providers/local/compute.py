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

States: ``pending`` (a restore sink not launched yet; not listed), ``running``, ``stopped``
(its process has exited; still listed), ``terminated`` (not listed, record kept). A pending
sink that is discarded (its restore or launch failed) goes entirely: record and data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from regionvault.core.errors import AmbiguousName, ComputeError, InstanceNotFound
from regionvault.core.interfaces import Capture, Compute, FileCapture, FileSink, RestoreSink
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    FileEntry,
    FileKind,
    Instance,
    InstancePage,
    LaunchSpec,
    Tags,
)
from regionvault.providers.local import _fs

__all__ = [
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


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks (Linux), to tell it from a reused pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].startswith(b"Z")


def _alive(pid: int, ticks: int | None) -> bool:
    with _children_lock:
        child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _is_zombie(pid):
        return False
    return ticks is None or _start_ticks(pid) in (None, ticks)


def _stop(pid: int, ticks: int | None, timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL it if still there after ``timeout``."""
    if not _alive(pid, ticks):
        _reap(pid)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid, ticks):
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


class _Window(io.RawIOBase):
    """Reads the first ``size`` bytes of a file that has grown since it was captured."""

    def __init__(self, f: io.BufferedReader, size: int, label: str) -> None:
        self._f = f
        self._left = size
        self._label = label

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        if want == 0:
            return 0
        got = self._f.readinto(view[:want])
        if not got:
            raise ComputeError(f"{self._label} shrank while it was being read")
        self._left -= got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


class LocalFileCapture(FileCapture):
    """The instance's data directory read in place.

    :meth:`entries` walks it anew on each call (parents first, siblings sorted by name),
    holding one sorted listing per directory level, never the whole tree: directories,
    regular files and symlinks. Sockets, FIFOs, devices and names that are not valid UTF-8
    are left out and listed in :attr:`skipped` (as of the latest walk). A local directory has
    no snapshot, so the capture is as consistent as the workload leaves its files: quiesce it
    in a ``regionvault_before_capture`` hook for a true point-in-time copy. Without one,
    :meth:`open` returns exactly the bytes of the listed size of a file that grew since
    (an appended log reads as it was), and raises :class:`ComputeError` naming a file that
    was replaced or shrank.
    """

    def __init__(self, instance: Instance, taken_at: datetime, root: Path) -> None:
        super().__init__(instance, taken_at)
        self.root = root
        #: ``(path, why)`` of every entry the latest walk left out
        self.skipped: list[tuple[str, str]] = []
        self._listing(root)  # an unreadable data directory fails the capture, not the backup

    def _listing(self, directory: Path | str, *, gone_ok: bool = False) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as scan:
                return sorted(scan, key=lambda e: e.name)
        except FileNotFoundError:
            if gone_ok:  # removed since its parent was read: it is listed, empty
                return []
            raise ComputeError(
                f"capture of {self.instance.id}: directory {directory} is missing"
            ) from None
        except OSError as exc:
            raise ComputeError(
                f"capture of {self.instance.id}: cannot read directory {directory}: {exc.strerror}"
            ) from None

    def _skip(self, path: str, why: str, *, report: bool) -> None:
        if report:
            self.skipped.append((path, why))
            log.info("capture of %s skips %r: %s", self.instance.id, path, why)

    def _walk(self, *, report: bool) -> Iterator[FileEntry]:
        """Every entry, depth first; ``report`` records what is left out in ``skipped``."""
        # a stack of (relative path, the rest of its sorted listing): no recursion, so a deep
        # tree cannot exhaust the interpreter's stack
        stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", iter(self._listing(self.root)))]
        while stack:
            rel, children = stack[-1]
            entry = next(children, None)
            if entry is None:
                stack.pop()
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                self._skip(path, "name is not valid UTF-8", report=report)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read
            mode, perms, mtime_ns = st.st_mode, stat.S_IMODE(st.st_mode), st.st_mtime_ns
            if stat.S_ISDIR(mode):
                yield FileEntry(path=path, kind=FileKind.DIR, mode=perms, mtime_ns=mtime_ns)
                stack.append((path, iter(self._listing(entry.path, gone_ok=True))))
            elif stat.S_ISREG(mode):
                yield FileEntry(
                    path=path,
                    kind=FileKind.FILE,
                    mode=perms,
                    mtime_ns=mtime_ns,
                    size=st.st_size,
                    source=Path(entry.path),
                )
            elif stat.S_ISLNK(mode):
                try:
                    target = str(Path(entry.path).readlink())
                except FileNotFoundError:
                    continue
                yield FileEntry(
                    path=path, kind=FileKind.SYMLINK, mode=perms, mtime_ns=mtime_ns, target=target
                )
            else:
                what = (
                    "socket"
                    if stat.S_ISSOCK(mode)
                    else "FIFO"
                    if stat.S_ISFIFO(mode)
                    else "device"
                    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "special file"
                )
                self._skip(path, f"{what}: not captured", report=report)

    def entries(self) -> Iterator[FileEntry]:
        self.skipped = []
        return self._walk(report=True)

    def totals(self) -> tuple[int, int]:
        """The same walk as :meth:`entries`, reading no file (its listings are then in the
        kernel's cache): cheap next to reading the files, and it holds nothing."""
        files = size = 0
        for entry in self._walk(report=False):
            if entry.kind is FileKind.FILE:
                files += 1
                size += entry.size
        return files, size

    def open(self, entry: FileEntry) -> BinaryIO:
        label = f"{self.instance.id}: {entry.path!r}"
        if entry.kind is not FileKind.FILE:
            raise ComputeError(f"{label} is a {entry.kind.value}, not a regular file")
        parts = entry.path.split("/")
        if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ComputeError(f"{label}: not a path inside the capture")
        try:
            fd = os.open(self.root / entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ComputeError(f"{label} cannot be opened: {exc.strerror}") from None
        f = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < entry.size:
            f.close()
            raise ComputeError(
                f"{label} was replaced or shrank since the capture; quiesce the instance "
                "(regionvault_before_capture hook) and back it up again"
            )
        if st.st_size == entry.size:
            return f
        return io.BufferedReader(_Window(f, entry.size, label))


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
        self.terminate_timeout = terminate_timeout
        self._lock = _fs.FileLock(self.compute_dir / "compute.lock")

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

    def _write(self, record: Mapping[str, Any]) -> None:
        path = self.instances_dir / record["id"] / RECORD
        _fs.atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))

    def _records(self) -> Iterator[dict[str, Any]]:
        try:
            names = [path.name for path in self.instances_dir.iterdir()]
        except FileNotFoundError:
            return
        for name in names:
            if _ID.match(name):
                try:
                    yield self._read(name)
                except InstanceNotFound:
                    continue  # a directory being created or a sink without a record yet

    def _instance(self, record: Mapping[str, Any]) -> Instance:
        state = record["state"]
        pid = record.get("pid")
        if state == "running" and pid is not None and not _alive(pid, record.get("pid_ticks")):
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
                "log": str(self.instances_dir / record["id"] / LOG),
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
        for record in self._records():
            if record["name"] == name and record["state"] not in ("terminated", "pending"):
                raise AmbiguousName(
                    f"an instance named {name!r} already exists ({record['id']}); "
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
        live = sorted(
            (
                (record["name"], record["id"], record)
                for record in self._records()
                if record["state"] not in ("terminated", "pending")
                and Tags(record["tags"]).matches(filters)
            ),
            key=lambda item: (item[0], item[1]),
        )
        if after is not None:
            live = [item for item in live if (item[0], item[1]) > after]
        page = live[:page_size]
        token = None
        if len(live) > page_size:
            token = self._encode_token(page[-1][0], page[-1][1])
        return InstancePage(tuple(self._instance(r) for _, _, r in page), token)

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
        with self._lock.hold():
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
        with self._lock.hold():
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
        with self._lock.hold():
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
            _fs.ensure_dir(self.instances_dir / record["id"])
            self._write(record)
        return self._instance(record)

    def capture(self, instance_id: str, *, kind: CaptureKind | None = None) -> Capture:
        if kind is not None and CaptureKind(kind) is not CaptureKind.FILES:
            raise self.unsupported(f"capture of kind {kind}")
        instance = self._instance(self._live(instance_id))
        root = Path(instance.extra["data_dir"])
        if not root.is_dir():
            raise self._error(f"data directory {root} of {instance_id} is missing")
        return LocalFileCapture(instance, datetime.now(UTC), root)

    def open_restore_sink(
        self, spec: LaunchSpec, kind: CaptureKind, *, size: int | None = None
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
        self._write(record)
        return LocalFileSink(data_dir, instance_id, compute=self)

    def _discard_sink(self, sink: LocalFileSink) -> bool:
        """Remove a sink's pending record and restored data (True); a launched sink's data
        belongs to its instance now and is left alone (False; ``terminate`` removes it)."""
        instance_dir = self.instances_dir / sink.instance_id
        if not _ID.match(sink.instance_id) or sink.root != instance_dir / DATA:
            raise self._error(f"cannot discard {sink.root}: not a sink of this Compute")
        with self._lock.hold():
            try:
                record: dict[str, Any] | None = self._read(sink.instance_id)
            except InstanceNotFound:
                record = None  # discarded already, or a removal that failed half-way
            if record is not None and record["state"] != "pending":
                log.info("sink %s was launched from: its data stays", sink.instance_id)
                return False
            try:
                # the record first: a directory without one is never listed, even half-removed
                (instance_dir / RECORD).unlink(missing_ok=True)
                shutil.rmtree(instance_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(
                    f"cannot remove the restored data of {sink.instance_id} in {instance_dir}: "
                    f"{exc.strerror or exc}"
                ) from None
        return True

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        if not isinstance(sink, LocalFileSink):
            raise self._error(f"launch needs a sink from this Compute, got {type(sink).__name__}")
        if sink.discarded:
            raise self._error(f"sink {sink.instance_id} was discarded: restore again to launch")
        tags = self._tags(spec.tags)
        self._check_function(spec.function)
        with self._lock.hold():
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
        return child.pid, _start_ticks(child.pid)

    def terminate(self, instance_id: str) -> None:
        """Stop the process (SIGTERM to its group, SIGKILL after ``terminate_timeout``),
        remove data this provider restored (a registered directory is never touched) and
        mark the instance terminated."""
        with self._lock.hold():
            record = self._read(instance_id)
            if record["state"] == "terminated":
                return
            if record.get("pid") is not None:
                _stop(record["pid"], record.get("pid_ticks"), self.terminate_timeout)
            if record["owned_data"]:
                shutil.rmtree(record["data_dir"], ignore_errors=True)
            record["state"] = "terminated"
            record["terminated"] = datetime.now(UTC).isoformat()
            self._write(record)
