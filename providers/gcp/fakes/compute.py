"""A wire-level fake of the Compute Engine v1 REST API, on plain HTTP at 127.0.0.1.

The unmodified ``google.cloud.compute_v1`` clients (REST transport, ``AnonymousCredentials``,
``client_options={"api_endpoint": fake.endpoint}``) talk to it. One project, one zone, and
what a backup worker needs:

- instances: ``list`` (``filter`` on labels, ``maxResults`` + ``pageToken``), ``get``,
  ``insert`` (disks from an existing ``source`` disk or made by ``initializeParams`` from a
  ``sourceSnapshot`` or blank with ``diskSizeGb``; the first disk boots; ``machineType``;
  ``labels``; ``networkInterfaces``), ``delete`` (auto-delete disks go with it),
  ``setLabels`` (``labelFingerprint`` required and checked: a stale one is 412
  conditionNotMet, as on GCE), ``attachDisk`` (``deviceName``, ``mode``), ``detachDisk``,
  ``start``, ``stop`` (TERMINATED);
- zonal disks: ``insert`` (blank with ``sizeGb``, or from ``sourceSnapshot``), ``get``,
  ``list``, ``delete`` (a 400 resourceInUseByAnotherResource while attached, as GCE
  answers), ``createSnapshot``, ``setLabels``;
- global snapshots: ``get``, ``list`` (label filter, pages), ``delete``, ``setLabels``,
  ``insert`` (with ``sourceDisk``);
- ``zoneOperations`` and ``globalOperations``: ``get`` and ``wait``.

Operations: every mutation answers an Operation (PENDING) and takes effect when the operation
is DONE. As on GCE, an operation runs whether or not anyone polls it: every later request
(of any method, a poll included) moves every operation not DONE one step on, and one is DONE
after :attr:`GceFake.operation_polls` steps (0: DONE in its first answer);
:meth:`GceFake.settle` ends every one at once, as time does on GCE. An operation may end in
an error: :meth:`GceFake.fail_next_operation`, or what GCE reports in the operation rather
than in the answer (a disk in use for ``attachDisk`` and ``instances.insert``:
RESOURCE_IN_USE_BY_ANOTHER_RESOURCE), found when the operation ends. While a disk or a
snapshot is being made, a ``get`` of it is 404 here and a ``delete`` is 400 resourceNotReady
(GCE shows it CREATING and refuses the delete the same way). A repeated ``requestId``
answers the first request's operation, as GCE does.

Label filters: the subset of GCE's list-filter grammar (AIP-160) that label queries use,
parsed as the API documents it: one expression ``labels.KEY = "VALUE"`` (or an unquoted
value), ``labels.KEY:*`` (the label is set), or several expressions each in parentheses,
joined by whitespace or ``AND``. Anything else (OR, NOT, ``!=``, wildcards, other fields,
several expressions without parentheses) is a 400 that says the fake does not serve it.

Disks: bytes live as sparse files under ``state_dir/disks``; a snapshot is a copy that
keeps the holes (``state_dir/snapshots``), made when it is asked for. Sizes are whole GB,
at least 10 (GCE's minimum for pd-standard, pd-balanced and pd-ssd) and at least the source
snapshot's. A disk attached to the worker instance (:attr:`GceFake.worker_instance`, made
with the fake, with a blank boot disk) appears as ``state_dir/devices/google-<deviceName>``,
a symlink to the disk's file as ``/dev/disk/by-id/google-*`` is a symlink on GCE (after
:attr:`GceFake.device_link_delay` seconds, udev's moment), removed on detach. Attach modes
follow GCE: READ_WRITE once, READ_ONLY many times, never both; a disk attached only
READ_ONLY is made mode 0444, and a write to it while so attached is reported on detach
(:attr:`GceFake.read_only_writes`; root ignores 0444).

Self links name ``https://www.googleapis.com/compute/v1/...`` as the real API writes them:
they are names, never fetched. Test hooks that are not on the wire:
:meth:`GceFake.seed_instance`, :meth:`GceFake.fail_next` (an HTTP error, or with
``lose_answer`` an answer lost after the request took effect),
:meth:`GceFake.fail_next_operation`, :attr:`GceFake.start_statuses`, :attr:`GceFake.counts`
(requests per API method), :attr:`GceFake.answers`, :meth:`GceFake.disk_path`,
:meth:`GceFake.snapshot_path`. :func:`seed_instance_over_api` makes an instance with only
the public API (blank disks written through the worker), against the fake or a real zone.

``python -m regionvault.providers.gcp.fakes.compute --project P --zone Z --state-dir D
--port N`` runs it as a process: it prints the endpoint and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import errno
import hashlib
import itertools
import json
import os
import random
import re
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "API_ROOT",
    "EMPTY_LABEL_FINGERPRINT",
    "MACHINE_TYPE",
    "MIN_DISK_GB",
    "FilterError",
    "GceFake",
    "GiB",
    "copy_sparse",
    "data_extents",
    "label_fingerprint",
    "parse_label_filter",
    "seed_instance_over_api",
]

GiB = 1024**3
#: the base of every selfLink, as the real API writes them (never fetched)
API_ROOT = "https://www.googleapis.com/compute/v1"
#: the smallest pd-standard, pd-balanced or pd-ssd disk GCE makes
MIN_DISK_GB = 10
MAX_DISK_GB = 65536
#: ``maxResults``' default and ceiling on GCE's list methods
MAX_RESULTS = 500
#: the labelFingerprint GCE gives a resource without labels
EMPTY_LABEL_FINGERPRINT = "42WmSpB8rSM="
#: labels as GCE takes them (ASCII only here: GCE also takes lowercase international letters)
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
MAX_LABELS = 64
_MODES = ("READ_WRITE", "READ_ONLY")
#: RFC 1035 names of instances, disks, snapshots
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
#: GCE's predefined machine types (their families and shapes) and custom ones
MACHINE_TYPE = re.compile(
    r"(?:(?:e2|n1|n2|n2d|n4|c2|c2d|c3|c3d|c4|t2d|t2a|m1|m2|m3)"
    r"-(?:standard|highmem|highcpu|megamem|ultramem)-[0-9]{1,3}"
    r"|e2-(?:micro|small|medium)|f1-micro|g1-small"
    r"|(?:(?:n2|n2d|e2)-)?custom-[0-9]{1,3}-[0-9]{3,7}(?:-ext)?)"
)
_ROOTS = ("https://www.googleapis.com/compute/v1/", "https://compute.googleapis.com/compute/v1/")


# --------------------------------------------------------------------------- filters


class FilterError(ValueError):
    """A ``filter`` the fake does not take (the 400 names it)."""


_KEY_RX = r"labels\.(?P<key>[a-z][a-z0-9_-]{0,62})"
_TERM_RX = _KEY_RX + r'\s*(?:=\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>[a-z0-9_-]+))|:\s*\*)'
_TERM = re.compile(_TERM_RX)
_GROUP = re.compile(r"\s*\(\s*" + _TERM_RX + r"\s*\)\s*")
_AND = re.compile(r"AND\s+")


def _term(match: re.Match[str]) -> tuple[str, str | None]:
    """(key, value) of one expression; value None for ``labels.KEY:*``."""
    if match["quoted"] is not None:
        if not _LABEL_VALUE.fullmatch(match["quoted"]):
            raise FilterError(f"{match['quoted']!r} cannot be a label value")
        return match["key"], match["quoted"]
    return match["key"], match["bare"]


def parse_label_filter(text: str) -> list[tuple[str, str | None]]:
    """The label expressions of a list ``filter``, all of which must hold (AND): ``(key,
    value)``, value None for "the label is set". :class:`FilterError` for anything else."""
    text = text.strip()
    if not text:
        return []
    single = _TERM.fullmatch(text)
    if single is not None:
        return [_term(single)]
    if not text.startswith("("):
        raise FilterError(
            'expected labels.KEY = "VALUE", labels.KEY:*, or several of them each in parentheses'
        )
    terms: list[tuple[str, str | None]] = []
    pos = 0
    while pos < len(text):  # each round consumes at least "(...)": bounded by len(text)
        group = _GROUP.match(text, pos)
        if group is None:
            raise FilterError(f"cannot parse {text[pos:]!r}")
        terms.append(_term(group))
        pos = group.end()
        joiner = _AND.match(text, pos)
        if joiner is not None:
            if not text[pos - 1].isspace():
                raise FilterError(f"cannot parse {text[pos:]!r}")
            pos = joiner.end()
            if pos >= len(text):
                raise FilterError("AND at the end of the filter")
    return terms


def _matches(labels: dict[str, str], terms: Sequence[tuple[str, str | None]]) -> bool:
    return all(
        (key in labels) if value is None else labels.get(key) == value for key, value in terms
    )


def label_fingerprint(labels: dict[str, str]) -> str:
    """The labelFingerprint of a set of labels (GCE's own value for none)."""
    if not labels:
        return EMPTY_LABEL_FINGERPRINT
    canonical = json.dumps(sorted(labels.items())).encode()
    return base64.b64encode(hashlib.sha256(canonical).digest()[:8]).decode()


# --------------------------------------------------------------------------- sparse files


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each range of ``fd`` that holds data, by SEEK_DATA/SEEK_HOLE (the
    whole file when the file system does not report holes)."""
    pos = 0
    while pos < size:  # pos strictly grows each round
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            if exc.errno == errno.EINVAL:
                yield pos, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            return
        yield start, end
        pos = end


def copy_sparse(source: Path, target: Path, size: int) -> int:
    """Copy ``source`` to a new ``target`` of ``size`` bytes, data ranges only, so the holes
    stay holes; returns the bytes of data copied."""
    copied = 0
    with source.open("rb") as src, target.open("wb") as dst:
        dst.truncate(size)
        length = os.fstat(src.fileno()).st_size
        for start, end in data_extents(src.fileno(), min(length, size)):
            offset = start
            while offset < end:  # each round copies at least one byte or raises
                n = 0
                try:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), end - offset, offset, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                if n <= 0:
                    chunk = os.pread(src.fileno(), min(end - offset, 8 << 20), offset)
                    if not chunk:
                        raise OSError(f"{source} ended at {offset} while copying it")
                    n = os.pwrite(dst.fileno(), chunk, offset)
                offset += n
                copied += n
    return copied


# --------------------------------------------------------------------------- state


class _Error(Exception):
    """An answer of GCE's error shape: HTTP ``status`` with ``reason`` (the HTTP error) and
    ``code`` (the same failure inside an Operation)."""

    def __init__(self, status: int, reason: str, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.code = code or {
            "notFound": "RESOURCE_NOT_FOUND",
            "alreadyExists": "RESOURCE_ALREADY_EXISTS",
            "resourceInUseByAnotherResource": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE",
            "conditionNotMet": "CONDITION_NOT_MET",
            "invalid": "INVALID_FIELD_VALUE",
            "required": "REQUIRED_FIELD_MISSING",
        }.get(reason, "INTERNAL_ERROR")


def _invalid(field_name: str, value: object, why: str) -> _Error:
    return _Error(400, "invalid", f"Invalid value for field '{field_name}': '{value}'. {why}")


@dataclass
class _Disk:
    name: str
    id: str
    size_gb: int
    type: str
    path: Path
    created: str
    labels: dict[str, str] = field(default_factory=dict)
    source_snapshot: str | None = None
    source_snapshot_id: str | None = None
    #: names of the instances it is attached to
    users: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class _Snapshot:
    name: str
    id: str
    size_gb: int
    path: Path
    created: str
    source_disk: str
    source_disk_id: str
    storage_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass
class _Attached:
    disk: str
    device_name: str
    boot: bool = False
    auto_delete: bool = False
    mode: str = "READ_WRITE"
    #: the disk file's mtime when attached READ_ONLY (a write through it changes it)
    mtime_ns: int | None = None


@dataclass
class _Instance:
    name: str
    id: str
    machine_type: str
    created: str
    status: str = "RUNNING"
    labels: dict[str, str] = field(default_factory=dict)
    disks: list[_Attached] = field(default_factory=list)
    network_interfaces: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: the statuses its next reads (instances.get) show, one each
    upcoming: list[str] = field(default_factory=list)


@dataclass
class _Operation:
    name: str
    id: str
    zonal: bool
    body: dict[str, Any]
    polls_left: int
    then: Callable[[], None] | None = None
    #: what to undo when the operation ends in an error (files made at request time)
    undo: Callable[[], None] | None = None
    error: _Error | None = None
    done: bool = False


@dataclass
class _Failure:
    method: str
    status: int
    reason: str
    message: str
    count: int
    in_operation: bool = False
    #: the request takes effect and only its answer is lost (a retry sees the effect)
    lose_answer: bool = False
    #: requests of the method served as usual before this failure begins
    skip: int = 0
    #: steps (later requests) before a failed operation ends; None: operation_polls
    steps: int | None = None


# --------------------------------------------------------------------------- the fake


class GceFake:
    """The fake Compute Engine API of ``project``'s ``zone``; disk bytes under
    ``state_dir``. :meth:`start` answers the endpoint (``http://127.0.0.1:P``)."""

    def __init__(
        self,
        *,
        project: str,
        zone: str,
        state_dir: Path,
        worker_instance: str = "rv-worker",
        operation_polls: int = 1,
        port: int = 0,
    ) -> None:
        self.project = project
        self.zone = zone
        self.region = zone.rpartition("-")[0]
        self.state_dir = Path(state_dir)
        self.worker_instance = worker_instance
        #: later requests (of any method) an operation stays RUNNING for before it is DONE
        self.operation_polls = operation_polls
        self.port = port
        self._lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
        self._disks: dict[str, _Disk] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._operations: dict[str, _Operation] = {}
        self._request_ids: dict[str, str] = {}
        #: names taken by operations not yet DONE: (collection, name)
        self._pending: set[tuple[str, str]] = set()
        self._failures: list[_Failure] = []
        self._ids = itertools.count(random.randrange(10**15, 10**16) * 1000)
        #: requests per API method ("instances.list", "zoneOperations.wait", ...)
        self.counts: collections.Counter[str] = collections.Counter()
        #: every request as (API method, path with query)
        self.requests: list[tuple[str, str]] = []
        #: every answer as (API method, HTTP status); "?" for a path the fake does not serve
        self.answers: list[tuple[str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: seconds after an attach to the worker before its device link appears (udev's
        #: moment on GCE); 0: when the operation is done
        self.device_link_delay = 0.0
        #: the statuses an instance made by instances.insert shows, one per instances.get,
        #: the last one kept (``["PROVISIONING", "STAGING", "RUNNING"]``; ``["STAGING",
        #: "TERMINATED"]``: one that stops instead of running)
        self.start_statuses: list[str] = ["RUNNING"]
        self._timers: list[threading.Timer] = []
        #: the machine types of the zone: None, GCE's predefined and custom ones
        #: (:data:`MACHINE_TYPE`); a set, only those (a zone that lacks one refuses it)
        self.machine_types: set[str] | None = None
        #: (disk, instance, device name) of each READ_ONLY attachment whose disk was written
        #: while attached so (found on detach)
        self.read_only_writes: list[tuple[str, str, str]] = []
        for sub in ("disks", "snapshots", "devices"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        # links a fake that used this directory before left: their disks are not this one's
        for stale in self.device_dir.glob("google-*"):
            if stale.is_symlink():
                stale.unlink()
        if worker_instance:
            self.seed_instance(worker_instance, disks=[b""], labels={})

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def device_dir(self) -> Path:
        """Where a disk attached to the worker appears as ``google-<deviceName>``."""
        return self.state_dir / "devices"

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            gce = fake

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="rv-gce-fake", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> GceFake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks

    def seed_instance(
        self,
        name: str,
        *,
        disks: Sequence[bytes | dict[int, bytes]] = (b"",),
        machine_type: str = "e2-standard-2",
        labels: dict[str, str] | None = None,
        disk_size_gb: int | None = None,
        status: str = "RUNNING",
    ) -> dict[str, Any]:
        """A RUNNING instance (not through the API): one disk per item of ``disks`` (bytes
        from offset 0, or offset -> bytes with holes between), the first the boot disk,
        named ``<name>-<i>``, device ``persistent-disk-<i>``, auto-delete; each disk the
        smallest whole number of GB (at least 10, or ``disk_size_gb``) that holds its
        bytes. Returns the instance as ``instances.get`` answers it."""
        with self._lock:
            try:
                self._check_new_name("instances", name, "name")
                for index in range(len(disks)):
                    self._check_new_name("disks", f"{name}-{index}", "disk name")
                self._labels(labels, "labels")
                self._ref(
                    f"zones/{self.zone}/machineTypes/{machine_type}",
                    "machineType",
                    "machineTypes",
                    zonal=True,
                )
            except _Error as exc:
                raise ValueError(f"seed_instance({name!r}): {exc.message}") from None
            if not disks:
                raise ValueError("an instance needs a boot disk")
            attached = []
            for index, image in enumerate(disks):
                pieces = {0: image} if isinstance(image, bytes) else dict(image)
                end = max((o + len(d) for o, d in pieces.items()), default=0)
                size_gb = max(disk_size_gb or MIN_DISK_GB, -(-end // GiB))
                disk = self._new_disk(f"{name}-{index}", size_gb, "pd-balanced")
                with disk.path.open("r+b") as f:
                    for offset, data in sorted(pieces.items()):
                        if data:
                            os.pwrite(f.fileno(), data, offset)
                attached.append(_Attached(disk.name, f"persistent-disk-{index}", index == 0, True))
            instance = _Instance(
                name=name,
                id=self._new_id(),
                machine_type=machine_type,
                created=_now(),
                status=status,
                labels=dict(labels or {}),
                network_interfaces=[self._nic({"network": "global/networks/default"}, 0)],
            )
            self._instances[name] = instance
            for item in attached:
                self._attach(instance, item)
            return self._instance_body(instance)

    def fail_next(
        self,
        method: str,
        status: int = 503,
        *,
        count: int = 1,
        reason: str = "backendError",
        message: str = "injected failure",
        lose_answer: bool = False,
        skip: int = 0,
    ) -> None:
        """The next ``count`` requests of API method ``method`` ("instances.insert"), after
        ``skip`` that are served as usual, are answered HTTP ``status`` with GCE's error
        shape, and change nothing; with ``lose_answer``, each is carried out (its operation
        made) and only its answer is the error, as when a connection drops after GCE
        accepted a request."""
        with self._lock:
            self._failures.append(
                _Failure(
                    _method(method),
                    status,
                    reason,
                    message,
                    count,
                    lose_answer=lose_answer,
                    skip=skip,
                )
            )

    def fail_next_operation(
        self,
        method: str,
        code: str = "INTERNAL_ERROR",
        *,
        status: int = 500,
        message: str = "injected operation failure",
        count: int = 1,
        steps: int | None = None,
    ) -> None:
        """The next ``count`` requests of ``method`` are accepted, and their operation ends
        DONE with ``error.errors[0].code == code`` (``httpErrorStatusCode`` ``status``) and
        no effect; after ``steps`` later requests when given (a quota refusal comes sooner
        than a snapshot), else :attr:`operation_polls`."""
        if _method(method) not in _MUTATIONS:
            raise ValueError(f"{method} makes no operation")
        with self._lock:
            self._failures.append(
                _Failure(
                    _method(method), status, code, message, count, in_operation=True, steps=steps
                )
            )

    def compute_settings(self) -> dict[str, Any]:
        """site.toml settings of a region whose compute is this fake (settings.py's keys):
        the project, its location and zone, the endpoint with no login (allowed only because
        it is on the loopback), the worker and where its devices appear."""
        return {
            "project": self.project,
            "location": self.region,
            "zone": self.zone,
            "credentials": "anonymous",
            "compute_endpoint": self.endpoint,
            "worker_instance": self.worker_instance,
            "device_dir": str(self.device_dir),
        }

    def disk_path(self, name: str) -> Path:
        """The sparse file holding disk ``name``'s bytes."""
        with self._lock:
            return self._disks[name].path

    def snapshot_path(self, name: str) -> Path:
        with self._lock:
            return self._snapshots[name].path

    def instance(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._instance_body(self._instances[name])

    def disk_names(self) -> list[str]:
        with self._lock:
            return sorted(self._disks)

    def snapshot_names(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def instance_names(self) -> list[str]:
        with self._lock:
            return sorted(self._instances)

    def disk_labels(self, name: str) -> dict[str, str]:
        with self._lock:
            return dict(self._disks[name].labels)

    def set_disk_labels(self, name: str, labels: dict[str, str]) -> None:
        """Relabel a disk beside the API."""
        with self._lock:
            self._disks[name].labels = dict(labels)

    def snapshot_labels(self, name: str) -> dict[str, str]:
        with self._lock:
            return dict(self._snapshots[name].labels)

    def seed_disk(
        self, name: str, *, size_gb: int = MIN_DISK_GB, labels: dict[str, str] | None = None
    ) -> None:
        """A blank disk of the zone, made beside the API (no operation)."""
        with self._lock:
            disk = self._new_disk(name, size_gb, "pd-balanced")
            disk.labels = dict(labels or {})

    def seed_snapshot(
        self, name: str, source_disk: str, *, labels: dict[str, str] | None = None
    ) -> None:
        """A snapshot of ``source_disk`` as it is now, made beside the API (no operation)."""
        with self._lock:
            disk = self._disks[source_disk]
            path = self.state_dir / "snapshots" / f"{name}.{self._new_id()}.img"
            stored = copy_sparse(disk.path, path, disk.size_gb * GiB)
            self._snapshots[name] = _Snapshot(
                name=name,
                id=self._new_id(),
                size_gb=disk.size_gb,
                path=path,
                created=_now(),
                source_disk=disk.name,
                source_disk_id=disk.id,
                storage_bytes=stored,
                labels=dict(labels or {}),
            )

    def has_machine_type(self, name: str) -> bool:
        if self.machine_types is not None:
            return name in self.machine_types
        return MACHINE_TYPE.fullmatch(name) is not None

    def pending_operations(self) -> list[str]:
        """Names of operations not DONE yet."""
        with self._lock:
            return sorted(n for n, op in self._operations.items() if not op.done)

    def settle(self) -> None:
        """End every operation not DONE yet, in the order they began: what GCE does to
        them in time whether or not anyone polls them."""
        with self._lock:
            for _ in range(1 + len(self._operations)):  # a finish may begin nothing new
                pending = [op for op in self._operations.values() if not op.done]
                if not pending:
                    return
                for op in pending:
                    self._finish(op)

    def _advance(self) -> None:
        """One step on for every operation not DONE (a request arrived: time passed)."""
        for op in list(self._operations.values()):
            if not op.done:
                op.polls_left -= 1
                op.body["status"] = "RUNNING"
                if op.polls_left <= 0:
                    self._finish(op)

    # ------------------------------------------------------------------ names and links

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _zone_link(self, *parts: str) -> str:
        return "/".join((API_ROOT, "projects", self.project, "zones", self.zone, *parts))

    def _global_link(self, *parts: str) -> str:
        return "/".join((API_ROOT, "projects", self.project, "global", *parts))

    def _ref(self, value: object, field_name: str, collection: str, *, zonal: bool) -> str:
        """The name in a reference to a resource of this project (a full URL, or a partial
        one: ``projects/P/zones/Z/disks/D``, ``zones/Z/disks/D``, ``global/snapshots/S``)."""
        if not isinstance(value, str) or not value:
            raise _invalid(field_name, value, "Expected a resource URL.")
        path = value
        for root in _ROOTS:
            if path.startswith(root):
                path = path[len(root) :]
                break
        parts = path.split("/")
        if parts[0] == "projects":
            if len(parts) < 2 or parts[1] != self.project:
                raise (
                    _Error(404, "notFound", f"The resource '{value}' was not found")
                    if len(parts) > 1
                    else _invalid(field_name, value, "Bad resource URL.")
                )
            parts = parts[2:]
        scope = ["zones", self.zone] if zonal else ["global"]
        if parts[: len(scope)] != scope:
            if zonal and len(parts) > 1 and parts[0] == "zones":
                raise _invalid(field_name, value, f"The resource must be in zone {self.zone}.")
            raise _invalid(field_name, value, f"Expected {'/'.join(scope)}/{collection}/NAME.")
        rest = parts[len(scope) :]
        if len(rest) != 2 or rest[0] != collection or not _NAME.fullmatch(rest[1]):
            raise _invalid(field_name, value, f"Expected {'/'.join(scope)}/{collection}/NAME.")
        return rest[1]

    def _nic(self, spec: dict[str, Any], index: int) -> dict[str, Any]:
        network = spec.get("network")
        subnetwork = spec.get("subnetwork")
        if network is None and subnetwork is None:
            network = "global/networks/default"
        nic: dict[str, Any] = {
            "kind": "compute#networkInterface",
            "name": f"nic{index}",
            "networkIP": f"10.128.0.{2 + len(self._instances) % 250}",
            "stackType": "IPV4_ONLY",
            "fingerprint": base64.b64encode(os.urandom(8)).decode(),
        }
        if network is not None:
            nic["network"] = self._link_of(network, "networks", "network")
        if subnetwork is not None:
            nic["subnetwork"] = self._link_of(subnetwork, "subnetworks", "subnetwork")
        return nic

    def _link_of(self, value: object, collection: str, field_name: str) -> str:
        """A network or subnetwork reference as a full URL (they are not modelled here)."""
        if not isinstance(value, str) or f"/{collection}/" not in f"/{value}":
            raise _invalid(f"resource.networkInterfaces[0].{field_name}", value, "Bad URL.")
        for root in _ROOTS:
            if value.startswith(root):
                return API_ROOT + "/" + value[len(root) :]
        if value.startswith("projects/"):
            return f"{API_ROOT}/{value}"
        return f"{API_ROOT}/projects/{self.project}/{value}"

    # ------------------------------------------------------------------ bodies

    def _instance_body(self, instance: _Instance) -> dict[str, Any]:
        disks = []
        for index, item in enumerate(instance.disks):
            disk = self._disks[item.disk]
            disks.append(
                {
                    "kind": "compute#attachedDisk",
                    "type": "PERSISTENT",
                    "mode": item.mode,
                    "source": self._zone_link("disks", disk.name),
                    "deviceName": item.device_name,
                    "index": index,
                    "boot": item.boot,
                    "autoDelete": item.auto_delete,
                    "interface": "SCSI",
                    "diskSizeGb": str(disk.size_gb),
                    "architecture": "X86_64",
                }
            )
        return {
            "kind": "compute#instance",
            "id": instance.id,
            "creationTimestamp": instance.created,
            "name": instance.name,
            "description": instance.description,
            "tags": {"fingerprint": EMPTY_LABEL_FINGERPRINT},
            "machineType": self._zone_link("machineTypes", instance.machine_type),
            "status": instance.status,
            "zone": f"{API_ROOT}/projects/{self.project}/zones/{self.zone}",
            "networkInterfaces": [dict(n) for n in instance.network_interfaces],
            "disks": disks,
            "metadata": {
                "kind": "compute#metadata",
                "fingerprint": "xJ5_CK4bM2E=",
                **instance.metadata,
            },
            "selfLink": self._zone_link("instances", instance.name),
            "scheduling": {"onHostMaintenance": "MIGRATE", "automaticRestart": True},
            "cpuPlatform": "Intel Broadwell",
            "labels": dict(instance.labels),
            "labelFingerprint": label_fingerprint(instance.labels),
            "startRestricted": False,
            "deletionProtection": False,
            "fingerprint": base64.b64encode(
                hashlib.sha256(instance.id.encode()).digest()[:8]
            ).decode(),
        }

    def _disk_body(self, disk: _Disk) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "compute#disk",
            "id": disk.id,
            "creationTimestamp": disk.created,
            "name": disk.name,
            "description": disk.description,
            "sizeGb": str(disk.size_gb),
            "zone": f"{API_ROOT}/projects/{self.project}/zones/{self.zone}",
            "status": "READY",
            "selfLink": self._zone_link("disks", disk.name),
            "type": self._zone_link("diskTypes", disk.type),
            "labels": dict(disk.labels),
            "labelFingerprint": label_fingerprint(disk.labels),
            "physicalBlockSizeBytes": "4096",
            "architecture": "X86_64",
        }
        if disk.users:
            body["users"] = [self._zone_link("instances", u) for u in disk.users]
        if disk.source_snapshot is not None:
            body["sourceSnapshot"] = self._global_link("snapshots", disk.source_snapshot)
            body["sourceSnapshotId"] = disk.source_snapshot_id
        return body

    def _snapshot_body(self, snapshot: _Snapshot) -> dict[str, Any]:
        return {
            "kind": "compute#snapshot",
            "id": snapshot.id,
            "creationTimestamp": snapshot.created,
            "name": snapshot.name,
            "description": snapshot.description,
            "status": "READY",
            "sourceDisk": self._zone_link("disks", snapshot.source_disk),
            "sourceDiskId": snapshot.source_disk_id,
            "diskSizeGb": str(snapshot.size_gb),
            "storageBytes": str(snapshot.storage_bytes),
            "storageBytesStatus": "UP_TO_DATE",
            "selfLink": self._global_link("snapshots", snapshot.name),
            "labels": dict(snapshot.labels),
            "labelFingerprint": label_fingerprint(snapshot.labels),
            "storageLocations": [self.region],
            "snapshotType": "STANDARD",
            "architecture": "X86_64",
        }

    # ------------------------------------------------------------------ operations

    def _operation(
        self,
        kind: str,
        target: str,
        target_id: str,
        *,
        zonal: bool,
        then: Callable[[], None] | None,
        undo: Callable[[], None] | None = None,
        failure: _Failure | None = None,
    ) -> dict[str, Any]:
        name = f"operation-{self._new_id()}-{os.urandom(4).hex()}"
        link = self._zone_link if zonal else self._global_link
        body: dict[str, Any] = {
            "kind": "compute#operation",
            "id": self._new_id(),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "targetId": target_id,
            "status": "PENDING",
            "user": "fake@regionvault.invalid",
            "progress": 0,
            "insertTime": _now(),
            "startTime": _now(),
            "selfLink": link("operations", name),
        }
        if zonal:
            body["zone"] = f"{API_ROOT}/projects/{self.project}/zones/{self.zone}"
        op = _Operation(name, body["id"], zonal, body, self.operation_polls, then, undo)
        if failure is not None:
            op.error = _Error(failure.status, "", failure.message, failure.reason)
            if failure.steps is not None:
                op.polls_left = failure.steps
        self._operations[name] = op
        if op.polls_left <= 0:
            self._finish(op)
        return dict(op.body)

    def _finish(self, op: _Operation) -> None:
        if op.error is None and op.then is not None:
            try:
                op.then()
            except _Error as exc:
                op.error = exc
        if op.error is not None:
            if op.undo is not None:
                op.undo()
            op.body["error"] = {"errors": [{"code": op.error.code, "message": op.error.message}]}
            op.body["httpErrorStatusCode"] = op.error.status
            op.body["httpErrorMessage"] = _STATUS_TEXT.get(op.error.status, "ERROR")
        op.done = True
        op.body.update(status="DONE", progress=100, endTime=_now())

    def _poll(self, name: str, zonal: bool) -> dict[str, Any]:
        op = self._operations.get(name)
        if op is None or op.zonal != zonal:
            scope = f"zones/{self.zone}" if zonal else "global"
            raise _Error(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/{scope}/operations/{name}' was not found",
            )
        return dict(op.body)

    # ------------------------------------------------------------------ disks (state)

    def _new_disk(
        self, name: str, size_gb: int, disk_type: str, *, source: _Snapshot | None = None
    ) -> _Disk:
        disk_id = self._new_id()
        path = self.state_dir / "disks" / f"{name}.{disk_id}.img"
        if source is not None:
            copy_sparse(source.path, path, size_gb * GiB)
        else:
            with path.open("wb") as f:
                f.truncate(size_gb * GiB)
        disk = _Disk(name, disk_id, size_gb, disk_type, path, _now())
        if source is not None:
            disk.source_snapshot, disk.source_snapshot_id = source.name, source.id
        self._disks[name] = disk
        return disk

    def _device_link(self, device_name: str) -> Path:
        return self.device_dir / f"google-{device_name}"

    def _attach(self, instance: _Instance, item: _Attached) -> None:
        disk = self._disks[item.disk]
        instance.disks.append(item)
        disk.users.append(instance.name)
        if item.mode == "READ_ONLY":
            item.mtime_ns = disk.path.stat().st_mtime_ns
        self._protect(disk)
        if instance.name != self.worker_instance:
            return
        if self.device_link_delay <= 0:
            self._make_link(instance, item)
            return

        def later() -> None:
            with self._lock:
                if item in instance.disks and self._instances.get(instance.name) is instance:
                    self._make_link(instance, item)

        timer = threading.Timer(self.device_link_delay, later)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _make_link(self, instance: _Instance, item: _Attached) -> None:
        link = self._device_link(item.device_name)
        link.unlink(missing_ok=True)
        link.symlink_to(self._disks[item.disk].path)

    def _detach(self, instance: _Instance, item: _Attached) -> None:
        instance.disks.remove(item)
        disk = self._disks.get(item.disk)
        if disk is not None and instance.name in disk.users:
            disk.users.remove(instance.name)
        if instance.name == self.worker_instance:
            self._device_link(item.device_name).unlink(missing_ok=True)
        if disk is not None:
            if item.mtime_ns is not None and disk.path.stat().st_mtime_ns != item.mtime_ns:
                self.read_only_writes.append((disk.name, instance.name, item.device_name))
            self._protect(disk)

    def _modes(self, disk: _Disk) -> list[str]:
        """The modes the disk is attached in, one per attachment."""
        return [
            a.mode
            for user in disk.users
            if user in self._instances
            for a in self._instances[user].disks
            if a.disk == disk.name
        ]

    def _conflicts(self, disk: _Disk, mode: str) -> bool:
        """GCE's rule: a disk attached READ_WRITE is attached once; READ_ONLY ones many times."""
        modes = self._modes(disk)
        return bool(modes) and (mode == "READ_WRITE" or "READ_WRITE" in modes)

    def _protect(self, disk: _Disk) -> None:
        """A disk attached only READ_ONLY is not writable (for a process that is not root;
        writes anyway are found on detach: :attr:`GceFake.read_only_writes`)."""
        modes = self._modes(disk)
        read_only = bool(modes) and "READ_WRITE" not in modes
        disk.path.chmod(0o444 if read_only else 0o644)

    def _remove_disk(self, disk: _Disk) -> None:
        del self._disks[disk.name]
        disk.path.unlink(missing_ok=True)

    def _check_new_name(self, collection: str, name: object, field_name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _invalid(
                field_name,
                name,
                "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        existing: dict[str, dict[str, Any]] = {
            "instances": self._instances,
            "disks": self._disks,
            "snapshots": self._snapshots,
        }
        if name in existing[collection] or (collection, name) in self._pending:
            scope = f"zones/{self.zone}" if collection != "snapshots" else "global"
            raise _Error(
                409,
                "alreadyExists",
                f"The resource 'projects/{self.project}/{scope}/{collection}/{name}' already "
                "exists",
            )
        return name

    def _size_gb(
        self, value: object, field_name: str, disk_type: str, snapshot: _Snapshot | None = None
    ) -> int:
        """A disk size in GB as GCE checks it: at least the type's minimum, at least the
        size of the snapshot it is made from."""
        if value is None:
            if snapshot is not None:
                return snapshot.size_gb
            raise _Error(
                400,
                "required",
                f"Required field '{field_name}' not specified (the fake asks for the size of "
                "a blank disk; GCE would make one of a default size)",
            )
        try:
            size = int(str(value))
        except ValueError:
            raise _invalid(field_name, value, "Expected an integer number of GB.") from None
        if size < MIN_DISK_GB:
            raise _invalid(
                field_name,
                size,
                f"Disk size cannot be smaller than {MIN_DISK_GB} GB for disk type {disk_type}.",
            )
        if snapshot is not None and size < snapshot.size_gb:
            raise _invalid(
                field_name,
                size,
                f"Requested disk size cannot be smaller than the snapshot size "
                f"({snapshot.size_gb} GB)",
            )
        if size > MAX_DISK_GB:
            raise _invalid(field_name, size, f"Disk size cannot be larger than {MAX_DISK_GB} GB.")
        return size

    def _labels(self, value: object, field_name: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid(field_name, value, "Expected a map of labels.")
        if len(value) > MAX_LABELS:
            raise _invalid(field_name, len(value), f"At most {MAX_LABELS} labels.")
        for key, item in value.items():
            if not _LABEL_KEY.fullmatch(str(key)):
                raise _invalid(
                    f"{field_name}.key",
                    key,
                    "Label keys must start with a lowercase letter and contain only lowercase "
                    "letters, digits, underscores and dashes (at most 63).",
                )
            if not isinstance(item, str) or not _LABEL_VALUE.fullmatch(item):
                raise _invalid(
                    f"{field_name}.value",
                    item,
                    "Label values may contain only lowercase letters, digits, underscores and "
                    "dashes (at most 63).",
                )
        return {str(k): str(v) for k, v in value.items()}

    def _disk_type(self, value: object, field_name: str) -> str:
        if value is None:
            return "pd-standard"
        name = self._ref(value, field_name, "diskTypes", zonal=True)
        if name not in ("pd-standard", "pd-balanced", "pd-ssd"):
            raise _invalid(field_name, value, "The fake serves pd-standard, pd-balanced, pd-ssd.")
        return name

    # ------------------------------------------------------------------ lookups

    def _get_instance(self, name: str) -> _Instance:
        instance = self._instances.get(name)
        if instance is None:
            raise _Error(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/instances/{name}' "
                "was not found",
            )
        return instance

    def _get_disk(self, name: str) -> _Disk:
        disk = self._disks.get(name)
        if disk is None:
            raise _Error(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/disks/{name}' was "
                "not found",
            )
        return disk

    def _get_snapshot(self, name: str) -> _Snapshot:
        snapshot = self._snapshots.get(name)
        if snapshot is None:
            raise _Error(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/global/snapshots/{name}' was not found",
            )
        return snapshot

    # ------------------------------------------------------------------ dispatch

    def handle(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) of one request; :class:`_Error` for GCE's error answers."""
        route = _route(method, path)
        try:
            status, answer = self._handle(method, path, query, body)
        except _Error as exc:
            with self._lock:
                self.answers.append((route[0] if route else "?", exc.status))
            raise
        with self._lock:
            self.answers.append((route[0] if route else "?", status))
        return status, answer

    def _handle(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        route = _route(method, path)
        if route is None:
            raise _Error(
                404, "notFound", f"The fake Compute Engine API does not serve {method} {path}"
            )
        api_method, params = route
        with self._lock:
            self._advance()
            self.counts[api_method] += 1
            full = path + ("?" + urllib.parse.urlencode(query) if query else "")
            self.requests.append((api_method, full))
            failure = self._take_failure(api_method)
            if failure is not None and not (failure.in_operation or failure.lose_answer):
                raise _Error(failure.status, failure.reason, failure.message)
            if params["project"] != self.project:
                raise _Error(
                    404, "notFound", f"The resource 'projects/{params['project']}' was not found"
                )
            if "zone" in params and params["zone"] != self.zone:
                raise _invalid("zone", params["zone"], "Unknown zone.")
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                raise _Error(400, "parseError", "Parse Error") from None
            if not isinstance(doc, dict):
                raise _Error(400, "parseError", "Parse Error")
            request_id = query.get("requestId")
            if request_id and request_id in self._request_ids:
                # GCE answers a repeated requestId with the first request's operation
                return 200, dict(self._operations[self._request_ids[request_id]].body)
            handler: Callable[..., dict[str, Any]] = getattr(
                self, "_" + api_method.replace(".", "_")
            )
            answer = handler(
                params=params,
                query=query,
                doc=doc,
                failure=failure if failure is not None and failure.in_operation else None,
            )
            if answer.get("kind") == "compute#operation" and request_id:
                self._request_ids[request_id] = answer["name"]
            if failure is not None and failure.lose_answer:
                raise _Error(failure.status, failure.reason, failure.message)
            return 200, answer

    def _take_failure(self, api_method: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method == api_method:
                if failure.skip > 0:
                    failure.skip -= 1
                    return None
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _page(
        self,
        items: list[dict[str, Any]],
        query: dict[str, str],
        kind: str,
        link: str,
    ) -> dict[str, Any]:
        """One page of ``items`` (sorted by name): ``maxResults`` (at most 500), the token
        naming the last item of the page before."""
        unknown = {"orderBy"} & set(query)
        if unknown:
            raise _invalid("orderBy", query["orderBy"], "The fake does not serve orderBy.")
        try:
            terms = parse_label_filter(query.get("filter", ""))
        except FilterError as exc:
            raise _invalid(
                "filter",
                query.get("filter"),
                f"Invalid list filter expression ({exc}; the fake serves labels.KEY = "
                '"VALUE", labels.KEY:* and the AND of several, each in parentheses).',
            ) from None
        try:
            size = int(query.get("maxResults", MAX_RESULTS))
        except ValueError:
            raise _invalid("maxResults", query["maxResults"], "Expected an integer.") from None
        if not 0 <= size <= MAX_RESULTS:
            raise _invalid("maxResults", size, f"Must be between 0 and {MAX_RESULTS}.")
        size = size or MAX_RESULTS
        after = ""
        token = query.get("pageToken")
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
                if not after.startswith("after:"):
                    raise ValueError(token)
            except ValueError:
                raise _invalid("pageToken", token, "Invalid page token.") from None
            after = after[len("after:") :]
        chosen = sorted(
            (i for i in items if _matches(i["labels"], terms) and i["name"] > after),
            key=lambda i: str(i["name"]),
        )
        page = chosen[:size]
        answer: dict[str, Any] = {
            "kind": kind,
            "id": link.removeprefix(API_ROOT + "/"),
            "items": page,
            "selfLink": link,
        }
        if not page:
            del answer["items"]
        if len(chosen) > size:
            answer["nextPageToken"] = base64.urlsafe_b64encode(
                f"after:{page[-1]['name']}".encode()
            ).decode()
        return answer

    # ------------------------------------------------------------------ instances

    def _instances_list(self, *, query: dict[str, str], **_: Any) -> dict[str, Any]:
        items = [self._instance_body(i) for i in self._instances.values()]
        return self._page(items, query, "compute#instanceList", self._zone_link("instances"))

    def _instances_get(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        instance = self._get_instance(params["name"])
        body = self._instance_body(instance)
        if instance.upcoming:
            instance.status = instance.upcoming.pop(0)
        return body

    def _instances_insert(
        self, *, doc: dict[str, Any], query: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        if "sourceInstanceTemplate" in query or "sourceMachineImage" in query:
            raise _invalid("sourceInstanceTemplate", "", "The fake does not serve templates.")
        name = self._check_new_name("instances", doc.get("name"), "resource.name")
        machine_type = self._ref(
            doc.get("machineType"), "resource.machineType", "machineTypes", zonal=True
        )
        if not self.has_machine_type(machine_type):
            raise _invalid(
                "resource.machineType",
                doc.get("machineType"),
                f"Machine type with name '{machine_type}' does not exist in zone '{self.zone}'.",
            )
        labels = self._labels(doc.get("labels"), "resource.labels")
        nics = doc.get("networkInterfaces") or []
        if not nics:
            raise _Error(
                400,
                "required",
                "Required field 'resource.networkInterfaces' not specified",
            )
        interfaces = [self._nic(n, i) for i, n in enumerate(nics)]
        specs = doc.get("disks") or []
        if not specs:
            raise _Error(400, "required", "Required field 'resource.disks' not specified")
        plan: list[tuple[_Attached, dict[str, Any] | None]] = []
        devices: set[str] = set()
        sources: set[str] = set()
        new_disks: set[str] = set()
        for index, spec in enumerate(specs):
            where = f"resource.disks[{index}]"
            boot = bool(spec.get("boot", False))
            if boot != (index == 0):
                raise _invalid(
                    f"{where}.boot",
                    boot,
                    "Boot disk must be the first disk attached to the instance.",
                )
            if spec.get("type", "PERSISTENT") != "PERSISTENT":
                raise _invalid(
                    f"{where}.type", spec.get("type"), "The fake serves PERSISTENT disks."
                )
            device = spec.get("deviceName") or f"persistent-disk-{index}"
            if device in devices:
                raise _invalid(f"{where}.deviceName", device, "Device names must be unique.")
            devices.add(device)
            mode = spec.get("mode", "READ_WRITE")
            if mode not in _MODES:
                raise _invalid(f"{where}.mode", mode, "Expected READ_WRITE or READ_ONLY.")
            if boot and mode != "READ_WRITE":
                raise _invalid(f"{where}.mode", mode, "A boot disk is attached READ_WRITE.")
            auto_delete = bool(spec.get("autoDelete", False))
            init = spec.get("initializeParams")
            if spec.get("source") is not None:
                if init is not None:
                    raise _invalid(
                        f"{where}.initializeParams",
                        "",
                        "Source and initializeParams are exclusive.",
                    )
                disk_name = self._ref(spec["source"], f"{where}.source", "disks", zonal=True)
                self._get_disk(disk_name)
                if disk_name in sources:
                    raise _invalid(f"{where}.source", spec["source"], "Disk attached twice.")
                # a disk in use is the operation's error, as for attachDisk
                sources.add(disk_name)
                plan.append((_Attached(disk_name, device, boot, auto_delete, mode), None))
                continue
            if init is None:
                raise _Error(400, "required", f"Required field '{where}.source' not specified")
            disk_name = init.get("diskName") or (name if index == 0 else f"{name}-{index}")
            self._check_new_name("disks", disk_name, f"{where}.initializeParams.diskName")
            if disk_name in new_disks:
                raise _invalid(f"{where}.initializeParams.diskName", disk_name, "Duplicate name.")
            new_disks.add(disk_name)
            if init.get("sourceImage") is not None:
                raise _invalid(
                    f"{where}.initializeParams.sourceImage",
                    init["sourceImage"],
                    "The fake does not serve images.",
                )
            checked = dict(init)
            checked["diskName"] = disk_name
            checked["diskType"] = self._disk_type(
                init.get("diskType"), f"{where}.initializeParams.diskType"
            )
            checked["labels"] = self._labels(init.get("labels"), f"{where}.initializeParams.labels")
            if init.get("sourceSnapshot") is not None:
                snapshot = self._get_snapshot(
                    self._ref(
                        init["sourceSnapshot"],
                        f"{where}.initializeParams.sourceSnapshot",
                        "snapshots",
                        zonal=False,
                    )
                )
                checked["sourceSnapshot"] = snapshot.name
                checked["diskSizeGb"] = self._size_gb(
                    init.get("diskSizeGb"),
                    f"{where}.initializeParams.diskSizeGb",
                    checked["diskType"],
                    snapshot,
                )
            else:
                if boot:
                    raise _Error(
                        400,
                        "required",
                        f"Required field '{where}.initializeParams.sourceImage' not specified "
                        "(a boot disk needs a source image or snapshot)",
                    )
                checked["diskSizeGb"] = self._size_gb(
                    init.get("diskSizeGb"),
                    f"{where}.initializeParams.diskSizeGb",
                    checked["diskType"],
                )
            plan.append((_Attached(disk_name, device, boot, auto_delete, mode), checked))
        instance_id = self._new_id()
        self._pending.add(("instances", name))
        self._pending.update(("disks", d) for d in new_disks)

        def release() -> None:
            self._pending.discard(("instances", name))
            for d in new_disks:
                self._pending.discard(("disks", d))

        def then() -> None:
            release()
            for item, init in plan:
                if init is None:
                    disk = self._get_disk(item.disk)
                    if self._conflicts(disk, item.mode):
                        raise self._in_use(disk)
            made: list[_Disk] = []
            try:
                for item, init in plan:
                    if init is not None:
                        source = (
                            self._get_snapshot(init["sourceSnapshot"])
                            if "sourceSnapshot" in init
                            else None
                        )
                        disk = self._new_disk(
                            item.disk, init["diskSizeGb"], init["diskType"], source=source
                        )
                        disk.labels = init["labels"]
                        made.append(disk)
            except _Error:
                for disk in made:
                    self._remove_disk(disk)
                raise
            instance = _Instance(
                name=name,
                id=instance_id,
                machine_type=machine_type,
                created=_now(),
                labels=labels,
                network_interfaces=interfaces,
                description=str(doc.get("description", "")),
                metadata={"items": doc["metadata"]["items"]}
                if isinstance(doc.get("metadata"), dict) and "items" in doc["metadata"]
                else {},
            )
            statuses = list(self.start_statuses) or ["RUNNING"]
            instance.status, instance.upcoming = statuses[0], statuses[1:]
            self._instances[name] = instance
            for item, _init in plan:
                self._attach(instance, item)

        return self._operation(
            "insert",
            self._zone_link("instances", name),
            instance_id,
            zonal=True,
            then=then,
            undo=release,
            failure=failure,
        )

    def _in_use(self, disk: _Disk) -> _Error:
        return _Error(
            400,
            "resourceInUseByAnotherResource",
            f"The disk resource 'projects/{self.project}/zones/{self.zone}/disks/{disk.name}' "
            f"is already being used by 'projects/{self.project}/zones/{self.zone}/instances/"
            f"{disk.users[0]}'",
        )

    def _instances_delete(
        self, *, params: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        instance = self._get_instance(params["name"])

        def then() -> None:
            current = self._get_instance(instance.name)
            for item in list(current.disks):
                self._detach(current, item)
                disk = self._disks.get(item.disk)
                if item.auto_delete and disk is not None and not disk.users:
                    self._remove_disk(disk)
            del self._instances[current.name]

        return self._operation(
            "delete",
            self._zone_link("instances", instance.name),
            instance.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _set_labels(
        self,
        current: dict[str, str],
        doc: dict[str, Any],
        resource: str,
    ) -> dict[str, str]:
        if "labelFingerprint" not in doc:
            raise _Error(400, "required", "Required field 'labelFingerprint' not specified")
        if doc["labelFingerprint"] != label_fingerprint(current):
            raise _Error(
                412,
                "conditionNotMet",
                f"Labels fingerprint either invalid or resource labels have changed "
                f"(resource {resource})",
            )
        return self._labels(doc.get("labels") or {}, "labels")

    def _instances_setLabels(
        self, *, params: dict[str, str], doc: dict[str, Any], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        instance = self._get_instance(params["name"])
        labels = self._set_labels(instance.labels, doc, instance.name)
        fingerprint = doc["labelFingerprint"]

        def then() -> None:
            current = self._get_instance(instance.name)
            if label_fingerprint(current.labels) != fingerprint:
                raise _Error(
                    412,
                    "conditionNotMet",
                    "Labels fingerprint either invalid or resource labels have changed",
                )
            current.labels = labels

        return self._operation(
            "setLabels",
            self._zone_link("instances", instance.name),
            instance.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _instances_attachDisk(
        self,
        *,
        params: dict[str, str],
        doc: dict[str, Any],
        query: dict[str, str],
        failure: _Failure | None,
        **_: Any,
    ) -> dict[str, Any]:
        instance = self._get_instance(params["name"])
        disk_name = self._ref(doc.get("source"), "resource.source", "disks", zonal=True)
        self._get_disk(disk_name)
        boot = bool(doc.get("boot", False))
        mode = doc.get("mode", "READ_WRITE")
        if mode not in _MODES:
            raise _invalid("resource.mode", mode, "Expected READ_WRITE or READ_ONLY.")
        device = doc.get("deviceName") or f"persistent-disk-{len(instance.disks)}"
        if not isinstance(device, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9_]{0,62})", device):
            raise _invalid("resource.deviceName", device, "Bad device name.")
        item = _Attached(disk_name, device, boot, bool(doc.get("autoDelete", False)), mode)

        def check() -> tuple[_Instance, _Disk]:
            current = self._get_instance(instance.name)
            target = self._get_disk(disk_name)
            if any(a.device_name == device for a in current.disks):
                raise _invalid(
                    "resource.deviceName", device, "Device name already used by the instance."
                )
            if any(a.disk == disk_name for a in current.disks):
                raise _invalid("resource.source", doc.get("source"), "Disk already attached.")
            if boot and current.status != "TERMINATED":
                raise _invalid(
                    "resource.boot", boot, "Instance must be stopped to attach a boot disk."
                )
            return current, target

        check()

        def then() -> None:
            current, target = check()
            # GCE accepts the request and its operation fails (RESOURCE_IN_USE_BY_ANOTHER_
            # RESOURCE): the disk's users are checked when the attach happens
            if self._conflicts(target, mode):
                raise self._in_use(target)
            self._attach(current, item)

        return self._operation(
            "attachDisk",
            self._zone_link("instances", instance.name),
            instance.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _instances_detachDisk(
        self,
        *,
        params: dict[str, str],
        query: dict[str, str],
        failure: _Failure | None,
        **_: Any,
    ) -> dict[str, Any]:
        instance = self._get_instance(params["name"])
        device = query.get("deviceName")
        if not device:
            raise _Error(400, "required", "Required field 'deviceName' not specified")

        def find() -> tuple[_Instance, _Attached]:
            current = self._get_instance(instance.name)
            for item in current.disks:
                if item.device_name == device:
                    if item.boot and current.status != "TERMINATED":
                        raise _invalid(
                            "deviceName",
                            device,
                            "Cannot detach the boot disk of a running instance.",
                        )
                    return current, item
            raise _invalid("deviceName", device, "No attached disk found with that device name.")

        find()

        def then() -> None:
            current, item = find()
            self._detach(current, item)

        return self._operation(
            "detachDisk",
            self._zone_link("instances", instance.name),
            instance.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _power(self, name: str, status: str, kind: str, failure: _Failure | None) -> dict[str, Any]:
        instance = self._get_instance(name)

        def then() -> None:
            self._get_instance(name).status = status

        return self._operation(
            kind,
            self._zone_link("instances", instance.name),
            instance.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _instances_start(
        self, *, params: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        return self._power(params["name"], "RUNNING", "start", failure)

    def _instances_stop(
        self, *, params: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        return self._power(params["name"], "TERMINATED", "stop", failure)

    # ------------------------------------------------------------------ disks

    def _disks_list(self, *, query: dict[str, str], **_: Any) -> dict[str, Any]:
        items = [self._disk_body(d) for d in self._disks.values()]
        return self._page(items, query, "compute#diskList", self._zone_link("disks"))

    def _disks_get(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._disk_body(self._get_disk(params["name"]))

    def _disks_insert(
        self, *, doc: dict[str, Any], query: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        if query.get("sourceImage") or doc.get("sourceImage"):
            raise _invalid(
                "sourceImage",
                query.get("sourceImage") or doc.get("sourceImage"),
                "The fake does not serve images.",
            )
        name = self._check_new_name("disks", doc.get("name"), "resource.name")
        disk_type = self._disk_type(doc.get("type"), "resource.type")
        labels = self._labels(doc.get("labels"), "resource.labels")
        source: _Snapshot | None = None
        if doc.get("sourceSnapshot") is not None:
            source = self._get_snapshot(
                self._ref(
                    doc["sourceSnapshot"], "resource.sourceSnapshot", "snapshots", zonal=False
                )
            )
        size = self._size_gb(doc.get("sizeGb"), "resource.sizeGb", disk_type, source)
        disk_id = self._new_id()
        self._pending.add(("disks", name))
        # a disk made from a snapshot holds the snapshot's bytes as they are now
        staged = self.state_dir / "disks" / f".{name}.{disk_id}.staged"
        if source is not None:
            copy_sparse(source.path, staged, size * GiB)

        def undo() -> None:
            self._pending.discard(("disks", name))
            staged.unlink(missing_ok=True)

        def then() -> None:
            self._pending.discard(("disks", name))
            disk = self._new_disk(name, size, disk_type)
            if source is not None:
                staged.replace(disk.path)
                disk.source_snapshot, disk.source_snapshot_id = source.name, source.id
            disk.labels = labels
            disk.description = str(doc.get("description", ""))

        return self._operation(
            "insert",
            self._zone_link("disks", name),
            disk_id,
            zonal=True,
            then=then,
            undo=undo,
            failure=failure,
        )

    def _not_ready(self, collection: str, name: str) -> None:
        """GCE's answer to a delete of a disk or snapshot still being made."""
        if (collection, name) in self._pending:
            scope = f"zones/{self.zone}" if collection != "snapshots" else "global"
            raise _Error(
                400,
                "resourceNotReady",
                f"The resource 'projects/{self.project}/{scope}/{collection}/{name}' is not ready",
                "RESOURCE_NOT_READY",
            )

    def _disks_delete(
        self, *, params: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        self._not_ready("disks", params["name"])
        disk = self._get_disk(params["name"])
        if disk.users:
            raise self._in_use(disk)

        def then() -> None:
            current = self._get_disk(disk.name)
            if current.users:
                raise self._in_use(current)
            self._remove_disk(current)

        return self._operation(
            "delete",
            self._zone_link("disks", disk.name),
            disk.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _disks_setLabels(
        self, *, params: dict[str, str], doc: dict[str, Any], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        disk = self._get_disk(params["name"])
        labels = self._set_labels(disk.labels, doc, disk.name)

        def then() -> None:
            self._get_disk(disk.name).labels = labels

        return self._operation(
            "setLabels",
            self._zone_link("disks", disk.name),
            disk.id,
            zonal=True,
            then=then,
            failure=failure,
        )

    def _snapshot_of(
        self, disk: _Disk, doc: dict[str, Any], failure: _Failure | None, zonal: bool
    ) -> dict[str, Any]:
        name = self._check_new_name("snapshots", doc.get("name"), "resource.name")
        labels = self._labels(doc.get("labels"), "resource.labels")
        snapshot_id = self._new_id()
        self._pending.add(("snapshots", name))
        # the snapshot holds the disk's bytes as they were when it was asked for
        path = self.state_dir / "snapshots" / f"{name}.{snapshot_id}.img"
        stored = copy_sparse(disk.path, path, disk.size_gb * GiB)

        def undo() -> None:
            self._pending.discard(("snapshots", name))
            path.unlink(missing_ok=True)

        def then() -> None:
            self._pending.discard(("snapshots", name))
            self._snapshots[name] = _Snapshot(
                name=name,
                id=snapshot_id,
                size_gb=disk.size_gb,
                path=path,
                created=_now(),
                source_disk=disk.name,
                source_disk_id=disk.id,
                storage_bytes=stored,
                labels=labels,
                description=str(doc.get("description", "")),
            )

        return self._operation(
            "createSnapshot" if zonal else "insert",
            self._zone_link("disks", disk.name) if zonal else self._global_link("snapshots", name),
            disk.id if zonal else snapshot_id,
            zonal=zonal,
            then=then,
            undo=undo,
            failure=failure,
        )

    def _disks_createSnapshot(
        self, *, params: dict[str, str], doc: dict[str, Any], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        return self._snapshot_of(self._get_disk(params["name"]), doc, failure, zonal=True)

    # ------------------------------------------------------------------ snapshots

    def _snapshots_list(self, *, query: dict[str, str], **_: Any) -> dict[str, Any]:
        items = [self._snapshot_body(s) for s in self._snapshots.values()]
        return self._page(items, query, "compute#snapshotList", self._global_link("snapshots"))

    def _snapshots_get(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._snapshot_body(self._get_snapshot(params["name"]))

    def _snapshots_insert(
        self, *, doc: dict[str, Any], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        if doc.get("sourceDisk") is None:
            raise _Error(400, "required", "Required field 'resource.sourceDisk' not specified")
        disk = self._get_disk(
            self._ref(doc["sourceDisk"], "resource.sourceDisk", "disks", zonal=True)
        )
        return self._snapshot_of(disk, doc, failure, zonal=False)

    def _snapshots_delete(
        self, *, params: dict[str, str], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        self._not_ready("snapshots", params["name"])
        snapshot = self._get_snapshot(params["name"])

        def then() -> None:
            current = self._get_snapshot(snapshot.name)
            del self._snapshots[current.name]
            current.path.unlink(missing_ok=True)

        return self._operation(
            "delete",
            self._global_link("snapshots", snapshot.name),
            snapshot.id,
            zonal=False,
            then=then,
            failure=failure,
        )

    def _snapshots_setLabels(
        self, *, params: dict[str, str], doc: dict[str, Any], failure: _Failure | None, **_: Any
    ) -> dict[str, Any]:
        snapshot = self._get_snapshot(params["name"])
        labels = self._set_labels(snapshot.labels, doc, snapshot.name)

        def then() -> None:
            self._get_snapshot(snapshot.name).labels = labels

        return self._operation(
            "setLabels",
            self._global_link("snapshots", snapshot.name),
            snapshot.id,
            zonal=False,
            then=then,
            failure=failure,
        )

    # ------------------------------------------------------------------ operations

    def _zoneOperations_get(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._poll(params["name"], zonal=True)

    def _zoneOperations_wait(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._poll(params["name"], zonal=True)

    def _globalOperations_get(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._poll(params["name"], zonal=False)

    def _globalOperations_wait(self, *, params: dict[str, str], **_: Any) -> dict[str, Any]:
        return self._poll(params["name"], zonal=False)


# --------------------------------------------------------------------------- routing

_STATUS_TEXT = {
    400: "BAD REQUEST",
    403: "FORBIDDEN",
    404: "NOT FOUND",
    409: "CONFLICT",
    412: "PRECONDITION FAILED",
    429: "TOO MANY REQUESTS",
    500: "INTERNAL SERVER ERROR",
    503: "SERVICE UNAVAILABLE",
}
_BASE = r"/compute/v1/projects/(?P<project>[^/]+)"
_ZONE = _BASE + r"/zones/(?P<zone>[^/]+)"
_GLOBAL = _BASE + r"/global"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(rx), api)
    for m, rx, api in (
        ("GET", _ZONE + r"/instances", "instances.list"),
        ("POST", _ZONE + r"/instances", "instances.insert"),
        ("GET", _ZONE + r"/instances/(?P<name>[^/]+)", "instances.get"),
        ("DELETE", _ZONE + r"/instances/(?P<name>[^/]+)", "instances.delete"),
        ("POST", _ZONE + r"/instances/(?P<name>[^/]+)/setLabels", "instances.setLabels"),
        ("POST", _ZONE + r"/instances/(?P<name>[^/]+)/attachDisk", "instances.attachDisk"),
        ("POST", _ZONE + r"/instances/(?P<name>[^/]+)/detachDisk", "instances.detachDisk"),
        ("POST", _ZONE + r"/instances/(?P<name>[^/]+)/start", "instances.start"),
        ("POST", _ZONE + r"/instances/(?P<name>[^/]+)/stop", "instances.stop"),
        ("GET", _ZONE + r"/disks", "disks.list"),
        ("POST", _ZONE + r"/disks", "disks.insert"),
        ("GET", _ZONE + r"/disks/(?P<name>[^/]+)", "disks.get"),
        ("DELETE", _ZONE + r"/disks/(?P<name>[^/]+)", "disks.delete"),
        ("POST", _ZONE + r"/disks/(?P<name>[^/]+)/createSnapshot", "disks.createSnapshot"),
        ("POST", _ZONE + r"/disks/(?P<name>[^/]+)/setLabels", "disks.setLabels"),
        ("GET", _GLOBAL + r"/snapshots", "snapshots.list"),
        ("POST", _GLOBAL + r"/snapshots", "snapshots.insert"),
        ("GET", _GLOBAL + r"/snapshots/(?P<name>[^/]+)", "snapshots.get"),
        ("DELETE", _GLOBAL + r"/snapshots/(?P<name>[^/]+)", "snapshots.delete"),
        ("POST", _GLOBAL + r"/snapshots/(?P<name>[^/]+)/setLabels", "snapshots.setLabels"),
        ("GET", _ZONE + r"/operations/(?P<name>[^/]+)", "zoneOperations.get"),
        ("POST", _ZONE + r"/operations/(?P<name>[^/]+)/wait", "zoneOperations.wait"),
        ("GET", _GLOBAL + r"/operations/(?P<name>[^/]+)", "globalOperations.get"),
        ("POST", _GLOBAL + r"/operations/(?P<name>[^/]+)/wait", "globalOperations.wait"),
    )
]
_API_METHODS = frozenset(api for _m, _rx, api in _ROUTES)
#: the methods that answer an Operation
_MUTATIONS = frozenset(
    api for m, _rx, api in _ROUTES if m != "GET" and not api.endswith("Operations.wait")
)


def _method(name: str) -> str:
    """``instances.insert`` from it or ``compute.instances.insert``; ValueError otherwise."""
    name = name.removeprefix("compute.")
    if name not in _API_METHODS:
        raise ValueError(f"the fake serves no method {name!r} (one of {sorted(_API_METHODS)})")
    return name


def _route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for verb, rx, api in _ROUTES:
        if verb == method:
            match = rx.fullmatch(path)
            if match is not None:
                return api, {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
    return None


def _now() -> str:
    """GCE's timestamps: RFC 3339 with milliseconds and the zone's offset."""
    return (
        dt.datetime.now(dt.UTC)
        .astimezone(dt.timezone(dt.timedelta(hours=-8)))
        .isoformat(timespec="milliseconds")
    )


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    gce: GceFake
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`GceFake.requests` instead."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        try:
            status, payload = self.gce.handle(self.command, parsed.path, query, body)
        except _Error as exc:
            status = exc.status
            payload = {
                "error": {
                    "code": exc.status,
                    "message": exc.message,
                    "errors": [{"message": exc.message, "domain": "global", "reason": exc.reason}],
                }
            }
        except Exception as exc:  # a bug in the fake: say so to the client
            status = 500
            message = f"the fake failed: {type(exc).__name__}: {exc}"
            payload = {
                "error": {
                    "code": 500,
                    "message": message,
                    "errors": [{"message": message, "domain": "global", "reason": "backendError"}],
                }
            }
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _answer


# --------------------------------------------------------------------------- seeding over the API


def seed_instance_over_api(
    *,
    endpoint: str | None,
    project: str,
    zone: str,
    worker_instance: str,
    device_dir: Path,
    name: str,
    disks: Sequence[bytes],
    labels: dict[str, str] | None = None,
    machine_type: str = "e2-standard-2",
    network: str = "global/networks/default",
    disk_type: str = "pd-balanced",
    credentials: Any = None,
    poll_interval: float = 0.0,
    max_polls: int = 600,
) -> str:
    """An instance made only through the public API, as on GCE (so it works against the
    fake, and on a real worker): per item of ``disks`` a blank disk ``<name>-<i>`` (whole GB,
    at least 10), attached to ``worker_instance``, written through
    ``device_dir/google-<name>-<i>``, detached; then the instance with those disks (the first
    the boot disk, all auto-delete), ``labels`` and ``machine_type``. Every operation is
    polled through the zone operations client of the same endpoint (never
    ``ExtendedOperation.result()``, which polls the public endpoint). Returns the instance's
    name; on a failure, removes the disks it made and raises RuntimeError naming the step."""
    import importlib
    import time

    from google.cloud import compute_v1

    if credentials is None:
        if endpoint is None:
            raise ValueError("credentials are needed for the real Compute Engine API")
        credentials = importlib.import_module("google.auth.credentials").AnonymousCredentials()
    options = {"api_endpoint": endpoint} if endpoint is not None else None
    instances = compute_v1.InstancesClient(credentials=credentials, client_options=options)
    disk_client = compute_v1.DisksClient(credentials=credentials, client_options=options)
    operations = compute_v1.ZoneOperationsClient(credentials=credentials, client_options=options)

    def wait(op: compute_v1.Operation, what: str) -> None:
        for _ in range(max_polls):
            if op.status == compute_v1.Operation.Status.DONE:
                if op.error.errors:
                    errors = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
                    raise RuntimeError(f"{what} failed: {errors}")
                return
            if poll_interval:
                time.sleep(poll_interval)
            op = operations.wait(project=project, zone=zone, operation=op.name)
        raise RuntimeError(f"{what} not done after {max_polls} polls")

    made: list[str] = []
    try:
        for index, data in enumerate(disks):
            disk = f"{name}-{index}"[:63].rstrip("-")
            size_gb = max(MIN_DISK_GB, -(-len(data) // GiB))
            resource = compute_v1.Disk(
                name=disk, size_gb=size_gb, type_=f"zones/{zone}/diskTypes/{disk_type}"
            )
            wait(
                disk_client.insert_unary(project=project, zone=zone, disk_resource=resource),
                f"disks.insert {disk}",
            )
            made.append(disk)
            attached = compute_v1.AttachedDisk(
                source=f"zones/{zone}/disks/{disk}", device_name=disk
            )
            wait(
                instances.attach_disk_unary(
                    project=project,
                    zone=zone,
                    instance=worker_instance,
                    attached_disk_resource=attached,
                ),
                f"attachDisk {disk}",
            )
            try:
                device = Path(device_dir) / f"google-{disk}"
                for _ in range(max_polls):  # on GCE, udev makes the link a moment later
                    if device.exists():
                        break
                    time.sleep(max(poll_interval, 0.01))
                fd = os.open(device, os.O_WRONLY)
                try:
                    view = memoryview(data)
                    offset = 0
                    while offset < len(data):  # each round writes at least one byte
                        offset += os.pwrite(fd, view[offset : offset + (8 << 20)], offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                wait(
                    instances.detach_disk_unary(
                        project=project, zone=zone, instance=worker_instance, device_name=disk
                    ),
                    f"detachDisk {disk}",
                )
        instance = compute_v1.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{machine_type}",
            labels=dict(labels or {}),
            network_interfaces=[compute_v1.NetworkInterface(network=network)],
            disks=[
                compute_v1.AttachedDisk(
                    boot=index == 0,
                    auto_delete=True,
                    source=f"zones/{zone}/disks/{disk}",
                    device_name=f"persistent-disk-{index}",
                )
                for index, disk in enumerate(made)
            ],
        )
        wait(
            instances.insert_unary(project=project, zone=zone, instance_resource=instance),
            f"instances.insert {name}",
        )
        return name
    except BaseException:
        for disk in made:
            try:
                op = disk_client.delete_unary(project=project, zone=zone, disk=disk)
                wait(op, f"disks.delete {disk}")
            except Exception:  # the first failure is the one to report
                pass
        raise
    finally:
        for client in (instances, disk_client, operations):
            transport: Any = client.transport  # its close() is not annotated
            transport.close()


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m regionvault.providers.gcp.fakes.compute",
        description="a fake Compute Engine API on 127.0.0.1 (regionvault's offline tests)",
    )
    parser.add_argument("--project", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-instance", default="rv-worker")
    parser.add_argument("--operation-polls", type=int, default=1)
    args = parser.parse_args(argv)
    fake = GceFake(
        project=args.project,
        zone=args.zone,
        state_dir=args.state_dir,
        worker_instance=args.worker_instance,
        operation_polls=args.operation_polls,
        port=args.port,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(fake.start(), flush=True)
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
