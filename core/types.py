"""Value types shared by the engine and the providers: frozen, comparable, free of I/O."""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from regionvault.core.errors import ConfigError

__all__ = [
    "Capabilities",
    "CaptureIssue",
    "CaptureKind",
    "DataKey",
    "Disk",
    "FileEntry",
    "FileKind",
    "Instance",
    "InstancePage",
    "IssueKind",
    "LaunchSpec",
    "Lineage",
    "ObjectInfo",
    "RecoveryPoint",
    "RegionConfig",
    "RegionId",
    "RetentionMode",
    "ServiceConfig",
    "Tags",
    "Temporary",
    "disk_layout",
    "split_by_disk",
]

_REGION_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, order=True)
class RegionId:
    """A region's full name, ``provider:name`` (``aws:us-east-1``, ``local:east``)."""

    provider: str
    name: str

    def __post_init__(self) -> None:
        for part, what in ((self.provider, "provider"), (self.name, "name")):
            if not _REGION_PART.match(part):
                raise ValueError(f"bad region {what} {part!r}: letters, digits, '_', '.', '-' only")

    @classmethod
    def parse(cls, text: str) -> RegionId:
        provider, sep, name = text.partition(":")
        if not sep or not provider or not name:
            raise ValueError(f"region {text!r} is not of the form provider:name")
        return cls(provider, name)

    def __str__(self) -> str:
        return f"{self.provider}:{self.name}"


@dataclass(frozen=True)
class ServiceConfig:
    """Which provider serves one of a region's services, with that provider's settings."""

    provider: str
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class RegionConfig:
    """One region as site.toml configures it: its id, its provider settings, and the provider
    of each service. What a provider is handed to build a region's services from."""

    id: RegionId
    settings: Mapping[str, Any]
    services: Mapping[str, ServiceConfig]
    #: directory that relative paths in settings are resolved against
    base_dir: Path
    #: the file this came from, for error messages
    source: str = "<memory>"
    #: services with a table of their own (``[regions."x".vault]``)
    overridden: frozenset[str] = frozenset()
    #: set on the view :meth:`for_service` gives a provider, when that service is overridden
    service: str | None = None

    @property
    def name(self) -> str:
        return str(self.id)

    @property
    def provider(self) -> str:
        return self.id.provider

    def key(self, *parts: str) -> str:
        """The TOML key path of a setting, for error messages."""
        head = [f'regions."{self.id}"'] + ([self.service] if self.service else [])
        return ".".join([*head, *parts])

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.source, key=self.key(key), region=self.name)

    def for_service(self, service: str) -> RegionConfig:
        """This region as seen by the provider of ``service``: settings are that service's."""
        svc = self.services[service]
        return replace(
            self,
            settings=svc.settings,
            service=service if service in self.overridden else None,
        )

    def path(self, key: str) -> Path:
        """A path setting, resolved against the site file's directory."""
        value = self.settings.get(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, "missing or not a string path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self.settings.get(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {type(value).__name__}")
        return value


class Tags(Mapping[str, str]):
    """An immutable, hashable mapping of tag keys to values."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        data: dict[str, str] = {}
        for key, value in pairs:
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"tag {key!r}={value!r}: keys and values must be strings")
            data[key] = value
        self._items: tuple[tuple[str, str], ...] = tuple(sorted(data.items()))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Tags):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Tags({dict(self._items)!r})"

    def merged(self, updates: Mapping[str, str]) -> Tags:
        return Tags({**dict(self._items), **dict(updates)})

    def without(self, keys: Iterable[str]) -> Tags:
        drop = set(keys)
        return Tags((k, v) for k, v in self._items if k not in drop)

    def matches(self, filters: Mapping[str, str | None]) -> bool:
        """True when every filter key is present and, where a value is given, equal."""
        mine = dict(self._items)
        return all(
            key in mine and (want is None or mine[key] == want) for key, want in filters.items()
        )


@dataclass(frozen=True)
class Instance:
    """A compute resource performing a function, as its region's Compute reports it."""

    id: str
    name: str
    region: str
    tags: Tags = field(default_factory=Tags)
    state: str = "running"
    #: what the instance runs: a command line (local), an image or instance type (clouds)
    function: str | None = None
    capture_kinds: frozenset[CaptureKind] = frozenset()
    #: provider-specific facts (instance type, volume ids, data directory, ...)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: on the instance :meth:`Compute.launch` returns: what of the source it could not carry
    #: over (a key pair the destination lacks, billing codes an image loses), one line each
    not_carried: tuple[str, ...] = field(default=(), compare=False, hash=False)


@dataclass(frozen=True)
class InstancePage:
    instances: tuple[Instance, ...]
    next_token: str | None

    @staticmethod
    def token(cloud_token: str | None, skip: int) -> str:
        """A page token of a cloud listing whose pages are cut again: the cloud's own token
        (None: its first page) and how many of that page's instances were handed out."""
        doc = json.dumps({"t": cloud_token, "s": skip}, separators=(",", ":"))
        return _TOKEN_PREFIX + base64.urlsafe_b64encode(doc.encode()).decode("ascii")

    @staticmethod
    def parse_token(token: str | None) -> tuple[str | None, int]:
        """``(cloud token, skip)`` of a :meth:`token` (None: the first page); ValueError
        when ``token`` is not one."""
        if not token:
            return None, 0
        try:
            if not token.startswith(_TOKEN_PREFIX):
                raise ValueError("no prefix")
            doc = json.loads(base64.urlsafe_b64decode(token[len(_TOKEN_PREFIX) :].encode()))
            cloud, skip = doc["t"], int(doc["s"])
            if (cloud is not None and not isinstance(cloud, str)) or skip < 0:
                raise ValueError("bad fields")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"bad page token {token[:40]!r}") from None
        return cloud, skip


_TOKEN_PREFIX = "rv1."


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch from restored data: the same function, under a name, with tags."""

    name: str
    tags: Tags = field(default_factory=Tags)
    function: str | None = None
    #: the instance this launch replaces or copies, when known
    source: Instance | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: what the capture recorded for a launch (``Capture.launch_facts``), from the point's
    #: sealed manifest; may hold secrets (user data)
    launch_facts: Mapping[str, Any] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )


class CaptureKind(enum.StrEnum):
    """What a capture holds (docs/interfaces.md, "Capture kinds and image formats")."""

    #: a file tree (entries with their metadata); launched by a compute that runs from files
    FILES = "files"
    #: a raw disk image of one or more disks (:class:`Disk`): bytes at their offsets, holes
    #: read as zeros; no VHD, VMDK or qcow2 framing in the point
    BLOCKS = "blocks"


@dataclass(frozen=True)
class Disk:
    """One disk of a block image: the image's bytes ``[offset, offset + size)``.

    A block image holds its instance's disks one after another, each at an offset that is
    a multiple of the image's block size. The first disk is the one the instance boots
    from; the others follow in the order the instance attaches them (a LUN, a device
    name), and a launch attaches them in that order. ``name`` says which disk it was where
    it was captured ("os", "lun0", "/dev/xvda"); it is informative, not an address.
    """

    name: str
    offset: int
    size: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size <= 0:
            raise ValueError(f"disk {self.name!r}: offset {self.offset}, size {self.size}")

    @property
    def end(self) -> int:
        return self.offset + self.size


def disk_layout(disks: Iterable[Disk] | None, size: int, block_size: int) -> tuple[Disk, ...]:
    """``disks`` checked against an image of ``size`` bytes in blocks of ``block_size``:
    ascending, disjoint, block-aligned and inside the image. None means one disk, "disk",
    that is the whole image (none for an empty image). ValueError names what is wrong."""
    if disks is None:
        return (Disk("disk", 0, size),) if size > 0 else ()
    layout = tuple(disks)
    if not layout:
        raise ValueError("a block image needs at least one disk")
    end = 0
    for d in layout:
        if d.offset % block_size:
            raise ValueError(
                f"disk {d.name!r} starts at {d.offset}, not a multiple of {block_size}"
            )
        if d.offset < end:
            raise ValueError(f"disk {d.name!r} at {d.offset} overlaps the disk before it")
        end = d.end
    if end > size:
        raise ValueError(f"disk {layout[-1].name!r} ends at {end}, past the {size}-byte image")
    return layout


def split_by_disk(
    disks: Sequence[Disk], offset: int, data: bytes | bytearray | memoryview
) -> list[tuple[int, int, memoryview]]:
    """A write of ``data`` at image ``offset`` cut at the disks' bounds: ``(index of the
    disk, offset in that disk, piece)`` for each disk it touches, in order. The bytes that
    lie outside every disk (a gap between two disks, the padding after the last) must be
    zeros, and are dropped; otherwise ValueError names the first offset of data outside the
    disks, and nothing is returned: a restore sink refuses such a write whole, before it
    writes any of it."""
    view = memoryview(data).cast("B")
    end = offset + len(view)
    pieces: list[tuple[int, int, memoryview]] = []
    at = offset
    for index, disk in enumerate(disks):
        if disk.end <= at:
            continue
        if disk.offset >= end:
            break
        if at < disk.offset:
            _zeros_outside(view[at - offset : disk.offset - offset], at)
            at = disk.offset
        stop = min(end, disk.end)
        pieces.append((index, at - disk.offset, view[at - offset : stop - offset]))
        at = stop
    if at < end:
        _zeros_outside(view[at - offset :], at)
    return pieces


def _zeros_outside(piece: memoryview, at: int) -> None:
    if bytes(piece).strip(b"\0"):
        first = at + len(piece) - len(bytes(piece).lstrip(b"\0"))
        raise ValueError(f"data at {first}, outside the image's disks")


class FileKind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    SOCKET = "socket"
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"


@dataclass(frozen=True)
class FileEntry:
    """One entry of a file capture.

    ``path`` is relative, '/'-separated, never '..'. It is the name's bytes as
    :func:`os.fsdecode` gives them: bytes that are not UTF-8 are surrogate-escaped, so
    ``path.encode("utf-8", "surrogateescape")`` is the raw name, whatever it is.
    """

    path: str
    kind: FileKind
    #: permission bits with set-user-id, set-group-id and sticky (``stat.S_IMODE``)
    mode: int
    mtime_ns: int
    size: int = 0
    #: a symlink's target (surrogate-escaped like ``path``)
    target: str | None = None
    #: owner and group, by number and, where the capture can tell, by name
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    #: a character or block device's number (``st_rdev``)
    rdev: int = 0
    #: an earlier entry of this capture that is the same file (a hard link): this entry
    #: carries no data of its own and restores as a link to that one
    link: str | None = None
    #: extended attributes, POSIX ACLs included (``system.posix_acl_access`` and
    #: ``system.posix_acl_default``), as (name, value) in name order
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    #: what must stay the same for the entry to be the one that was walked (the local
    #: capture: device, inode, size, mtime, ctime); None for a capture that cannot change
    #: under the engine (a snapshot)
    identity: tuple[int, ...] | None = field(default=None, compare=False)
    #: when the entry last changed, in ns since the epoch as the file system stamps it (the
    #: local capture: its ctime, which every write and metadata change moves); None when
    #: the capture cannot tell. A backup re-reads a file that changed too recently before
    #: its read began for a same-tick write to show in its timestamps
    changed_ns: int | None = field(default=None, compare=False)
    #: where the capture can read the bytes from, when it is a local file
    source: Path | None = field(default=None, compare=False)


class IssueKind(enum.StrEnum):
    """Why a capture did not take an entry whole."""

    #: could not be listed, opened or read (permission denied, I/O error)
    UNREADABLE = "unreadable"
    #: removed between the walk and the read
    VANISHED = "vanished"
    #: still changing after the bounded re-reads, or changed after it was read
    CHANGED = "changed"
    #: a hook that makes the capture consistent failed after the capture (``after``)
    HOOK = "hook"


@dataclass(frozen=True)
class CaptureIssue:
    """An entry a backup could not take whole: recorded in the recovery point, named on
    standard error, and the reason for exit status 3 ("incomplete")."""

    path: str
    kind: IssueKind
    message: str


@dataclass(frozen=True)
class DataKey:
    """A data key from a KeyService: the plaintext half never leaves memory."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes
    key_id: str


class RetentionMode(enum.StrEnum):
    #: may be shortened or removed by a privileged caller (``bypass_governance``)
    GOVERNANCE = "governance"
    #: may only be extended, by anyone, until it passes
    COMPLIANCE = "compliance"


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    modified: datetime
    retain_until: datetime | None = None
    retention_mode: RetentionMode | None = None
    legal_hold: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class Temporary:
    """What an interrupted write left in a vault or an inbox: a temporary file, an
    incomplete multipart upload. Never an object: listings do not show it, and nothing reads
    it. ``handle`` is the provider's own (give it back to ``remove_temporary``)."""

    handle: str
    #: the object or payload name it was on its way to, where the provider knows it
    name: str | None
    #: bytes it holds (None: unknown, as for a multipart upload's parts)
    size: int | None
    modified: datetime
    #: ``host:pid`` of the writer, where the provider records it
    owner: str | None = None
    #: why it counts as stale: "its writer ... is gone" or "older than ..."
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What a provider's services can do; the engine and the conformance suite read this."""

    worm_lock: bool = False
    legal_hold: bool = False
    server_side_copy: bool = False
    conditional_put: bool = False
    ranged_get: bool = True
    capture_kinds: frozenset[CaptureKind] = frozenset()
    launch: bool = False
    register_instance: bool = False
    key_rotation: bool = True
    #: the kinds of point a compute launches from; None: those it captures, when it launches
    launch_kinds: frozenset[CaptureKind] | None = None
    #: how long, in seconds, a launch here usually needs to become healthy (EC2's status
    #: checks take minutes); None: the engine's default. site.toml's ``[launch]`` overrides
    launch_health_timeout: float | None = None
    #: the launch facts a compute applies: those whose top-level member of this name (the
    #: facts' version) its provider's captures record ("aws"); None: it applies none, and a
    #: launch lists the recorded facts it ignored (core/pipeline/launch.py)
    launch_facts_of: str | None = None

    def launchable_kinds(self) -> frozenset[CaptureKind]:
        """The kinds of recovery point this compute can launch an instance from."""
        if not self.launch:
            return frozenset()
        return self.capture_kinds if self.launch_kinds is None else self.launch_kinds


@dataclass(frozen=True)
class Lineage:
    """Where a copy came from."""

    source_region: str
    source_recovery_point: str


@dataclass(frozen=True)
class RecoveryPoint:
    """One backup of one instance in one region's vault, as the engine reports it."""

    id: str
    region: str
    instance_id: str
    instance_name: str
    kind: CaptureKind
    created_at: datetime
    expires_at: datetime | None
    size: int
    policy: str | None = None
    lineage: Lineage | None = None
    tags: Tags = field(default_factory=Tags)
    #: what the instance ran (its command or image), so a launch performs the same function
    function: str | None = None
    #: entries the capture could not take whole (named in the manifest); 0 when complete
    issues: int = 0
