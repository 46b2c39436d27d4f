"""The four service interfaces a provider implements, and the Provider that builds them.

Providers implement primitives, never formats: the data plane (chunking, packing, encryption,
manifests) lives in the core and works on any Vault + KeyService. See docs/interfaces.md.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from regionvault.core.errors import (
    KeyServiceError,
    ObjectExists,
    ObjectNotFound,
    UnsupportedOperation,
    VaultError,
)
from regionvault.core.types import (
    Capabilities,
    CaptureIssue,
    CaptureKind,
    DataKey,
    Disk,
    FileEntry,
    Instance,
    InstancePage,
    LaunchSpec,
    ObjectInfo,
    RegionConfig,
    RetentionMode,
    Tags,
    Temporary,
    disk_layout,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "PURPOSE_KEY",
    "BlockCapture",
    "BlockSink",
    "Capture",
    "CloudHealth",
    "Compute",
    "ComputeScope",
    "FileCapture",
    "FileSink",
    "KeyService",
    "Provider",
    "RestoreSink",
    "Sealer",
    "Service",
    "Transit",
    "Vault",
    "context_bytes",
    "establish_vault_id",
    "purpose_context",
]

EncryptionContext = Mapping[str, str]

#: the encryption-context entry a cloud KeyService adds to say what a wrapped secret is for
#: (a data key, a sealed secret), so that one can never be opened as the other
PURPOSE_KEY = "regionvault:purpose"


def purpose_context(
    context: EncryptionContext, purpose: str, *, provider: str, region: str
) -> dict[str, str]:
    """``context`` checked (a mapping of non-empty string keys to string values, without
    :data:`PURPOSE_KEY`) with ``PURPOSE_KEY: purpose`` added: what a KeyService binds a
    wrap or a seal to. :class:`KeyServiceError` names a bad entry."""
    if not isinstance(context, Mapping):
        raise KeyServiceError(
            f"encryption context must be a mapping, got {type(context).__name__}",
            provider=provider,
            region=region,
        )
    out: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise KeyServiceError(
                f"encryption context entry {key!r}={value!r}: keys and values must be strings",
                provider=provider,
                region=region,
            )
        if key == PURPOSE_KEY:
            raise KeyServiceError(
                f"encryption context key {PURPOSE_KEY!r} is reserved by the {provider} provider",
                provider=provider,
                region=region,
            )
        out[key] = value
    out[PURPOSE_KEY] = purpose
    return out


def establish_vault_id(
    read: Callable[[], bytes],
    create: Callable[[bytes], object],
    *,
    provider: str,
    region: str,
) -> str:
    """A vault's :attr:`Vault.vault_id`, kept in the vault itself so that every process and
    every later run sees the same one: ``read()`` it (``ObjectNotFound`` when absent), else
    make ``<provider>-<random hex>`` and ``create`` it if-absent (``ObjectExists``: another
    process made one between the read and the create, whose id is then read)."""
    for _attempt in range(3):
        try:
            return read().decode("ascii").strip()
        except ObjectNotFound:
            pass
        made = f"{provider}-{uuid.uuid4().hex}"
        try:
            create(made.encode("ascii"))
            return made
        except ObjectExists:
            continue  # another process made it between our read and create: read theirs
    raise VaultError("cannot establish the vault id", provider=provider, region=region)


def context_bytes(context: Mapping[str, str]) -> bytes:
    """A context as canonical JSON (keys sorted, no spaces, UTF-8): the additional
    authenticated data of a service that takes bytes rather than a context."""
    return json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


class Service(abc.ABC):
    """Common ground of the four services: who they are, what they can do."""

    def __init__(self, *, provider: str, region: str, capabilities: Capabilities) -> None:
        self.provider = provider
        self.region = region
        self.capabilities = capabilities

    def unsupported(self, operation: str) -> UnsupportedOperation:
        return UnsupportedOperation(operation, provider=self.provider, region=self.region)

    def close(self) -> None:
        """Release connections and processes held by this service."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.region}>"


# --------------------------------------------------------------------------- captures


class Capture(abc.ABC):
    """A consistent, point-in-time view of an instance's data; close it when done."""

    kind: ClassVar[CaptureKind]

    def __init__(self, instance: Instance, taken_at: datetime) -> None:
        self.instance = instance
        self.taken_at = taken_at

    def close(self) -> None:
        """Release the snapshot (temporary copies, cloud snapshots) behind this capture."""

    def launch_facts(self) -> Mapping[str, Any]:
        """What a launch elsewhere needs to know of the captured instance beyond its data
        and tags (EC2: key pair, instance profile, security groups, user data, billing
        details), as JSON values. Called once by a backup, after the data is read; recorded
        in the point's sealed manifest (``launch``), carried to its copies, and handed to
        :meth:`Compute.launch` as ``LaunchSpec.launch_facts``. It may hold secrets (user
        data): never put it in tags or logs. The default records nothing."""
        return {}

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FileCapture(Capture):
    """A file tree: every entry (files, directories, symlinks, hard links, FIFOs, sockets,
    devices) with its metadata.

    A capture that is not a snapshot (a live directory) can change under the engine: its
    entries then carry an ``identity``; :meth:`open` refuses a file that is no longer the
    one walked, and :meth:`restat` tells the engine what an entry is now, so it can re-read
    a file that changed while it was read and check every entry once more at the end.
    """

    kind = CaptureKind.FILES

    def __init__(self, instance: Instance, taken_at: datetime) -> None:
        super().__init__(instance, taken_at)
        #: what the latest walk could not take (an unreadable directory, an entry that
        #: vanished while it was listed), appended while :meth:`entries` runs
        self.issues: list[CaptureIssue] = []

    @abc.abstractmethod
    def entries(self) -> Iterator[FileEntry]:
        """Yield every entry, parents before children, in a stable (sorted) order; each
        call walks anew and starts :attr:`issues` afresh."""

    @abc.abstractmethod
    def open(self, entry: FileEntry) -> BinaryIO:
        """Open a regular file entry for reading its bytes as captured.

        :class:`~regionvault.core.errors.EntryProblem` when it cannot: unreadable,
        vanished, or (``issue`` "changed") not the file that was walked."""

    def restat(self, entry: FileEntry) -> FileEntry | None:
        """The entry at ``entry.path`` as it is now (None if it is gone), with a fresh
        ``identity``. The default, for a capture that cannot change, returns ``entry``."""
        return entry

    def current_identity(self, entry: FileEntry) -> tuple[int, ...] | None:
        """The ``identity`` the entry at ``entry.path`` has now (None if it is gone): what
        :meth:`restat` would give, which a capture may tell more cheaply (one ``stat``,
        without owners or xattrs). The engine asks once after reading each file, and once
        for every entry when the capture ends; it calls :meth:`restat` only for a file it
        reads again. The default asks :meth:`restat`."""
        now = self.restat(entry)
        return None if now is None else now.identity

    def names(self, entry: FileEntry) -> list[str] | None:
        """The names in the directory ``entry`` (a directory of this capture) as it is now;
        None when it is gone, or the capture cannot list it again (the default). The engine
        asks only of a directory whose identity moved while the capture ran, to find an
        entry moved into it after it was listed (it is then in no directory the walk saw)."""
        return None

    def totals(self) -> tuple[int, int] | None:
        """``(regular files, their bytes)``, for progress reports, when the capture can count
        them without holding its entries (a second cheap listing, a snapshot's metadata);
        None, the default, when it cannot. A backup then learns them only for a capture
        small enough to list ahead, and streams a larger one without totals. A backup with
        no progress callback never asks."""
        return None


class BlockCapture(Capture):
    """A disk image: ``size`` bytes in blocks of ``block_size``, holding ``disks`` one
    after another (one disk, the whole image, unless the provider says otherwise).

    Incremental captures: a capture taken with ``keep=True`` keeps what it read from (its
    cloud snapshots) when closed and names it in ``ref``; a later capture of the same
    instance taken with ``since=ref`` can say, through :meth:`changed_ranges`, where its
    image may differ from that one, so that a backup reads only those ranges and takes the
    rest from the earlier point.
    """

    kind = CaptureKind.BLOCKS

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        size: int,
        block_size: int,
        disks: Sequence[Disk] | None = None,
    ) -> None:
        super().__init__(instance, taken_at)
        self.size = size
        self.block_size = block_size
        self.disks = disk_layout(disks, size, block_size)
        #: what this capture keeps for a later ``Compute.capture(..., since=ref)``, when it
        #: was taken with ``keep=True`` and the provider can keep it; None otherwise. The
        #: owner releases it with ``Compute.release_capture`` when no longer needed.
        self.ref: str | None = None

    @abc.abstractmethod
    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` in ascending offset; ranges never written may be left out
        (they restore as zeros)."""

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """``(offset, length)`` ranges, ascending and disjoint, outside of which this image is
        byte for byte the image of the capture named by ``since`` (a range cleared since
        counts as changed); None when the capture was taken without ``since``, or cannot
        tell (the earlier snapshots are gone, a disk was added or resized): the caller
        then reads the whole image. A provider must never leave out a range that changed."""
        return None

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Like :meth:`blocks`, only within ``spans`` (``(offset, length)``, ascending,
        disjoint, block-aligned): the written data there, ascending. The default filters
        :meth:`blocks`; a provider that can read ranges directly overrides it."""
        it = iter(spans)
        span = next(it, None)
        for offset, data in self.blocks():
            end = offset + len(data)
            while span is not None and span[0] + span[1] <= offset:
                span = next(it, None)
            while span is not None and span[0] < end:
                lo = max(offset, span[0])
                hi = min(end, span[0] + span[1])
                if lo < hi:
                    yield lo, data[lo - offset : hi - offset]
                if span[0] + span[1] > end:
                    break
                span = next(it, None)
            if span is None:
                return


class RestoreSink(abc.ABC):
    """Where restored data goes before a launch; made by the Compute that will launch it."""

    kind: ClassVar[CaptureKind]

    def discard(self) -> None:
        """Remove whatever this sink holds (restored data, an unfinished snapshot), because
        the restore or the launch from it failed; the engine calls it before re-raising.

        Safe to call more than once and after a partial restore. A sink that was launched
        from is left alone: its data belongs to the instance, which ``Compute.terminate``
        removes. After a discard the sink cannot be launched from. The default does
        nothing (for a sink that keeps nothing of its own); a provider whose sinks hold
        data or cloud resources overrides it.
        """


class FileSink(RestoreSink):
    """A directory the engine restores a file tree into."""

    kind = CaptureKind.FILES

    def __init__(self, root: Path) -> None:
        self.root = root


class BlockSink(RestoreSink):
    """A block device or cloud snapshot the engine writes restored blocks into."""

    kind = CaptureKind.BLOCKS

    def __init__(self, size: int, block_size: int, disks: Sequence[Disk] | None = None) -> None:
        self.size = size
        self.block_size = block_size
        #: the disks to make, one per :class:`Disk` of the image (offsets in the image)
        self.disks = disk_layout(disks, size, block_size)

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (a multiple of ``block_size``)."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make everything written durable; the sink is then ready to launch from."""


# --------------------------------------------------------------------------- services


class Compute(Service):
    """A region's instances: list and tag them, capture their data, launch from restored data."""

    @abc.abstractmethod
    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        """One page of instances that are not terminated. ``tag_filters`` maps a key to the
        value it must have, or to None for "has this key with any value"."""

    def list_instances(
        self, *, tag_filters: Mapping[str, str | None] | None = None, page_size: int = 100
    ) -> Iterator[Instance]:
        token: str | None = None
        while True:
            page = self.list_instances_page(
                tag_filters=tag_filters, page_token=token, page_size=page_size
            )
            yield from page.instances
            token = page.next_token
            if token is None:
                return

    @abc.abstractmethod
    def get_instance(self, instance_id: str) -> Instance:
        """The instance with this id; :class:`InstanceNotFound` otherwise."""

    @abc.abstractmethod
    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        """Add or overwrite these tags; return the instance's tags afterwards."""

    @abc.abstractmethod
    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        """Remove these tag keys (absent keys are ignored); return the tags afterwards."""

    @abc.abstractmethod
    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        """A consistent capture of the instance's data (the instance's own kind by default).

        For block captures: ``keep`` asks the capture to keep its snapshots when closed and
        name them in ``BlockCapture.ref``; ``since`` is such a ref from an earlier capture
        of this instance, for ``BlockCapture.changed_ranges``. A provider that cannot do
        either ignores them (``ref`` stays None, ``changed_ranges`` gives None); a ``since``
        whose snapshots are gone is no error (``changed_ranges`` gives None)."""

    def release_capture(self, ref: str) -> None:
        """Remove what a capture taken with ``keep=True`` kept (``BlockCapture.ref``).
        Idempotent: what is already gone is no error. The default has nothing to remove."""

    @abc.abstractmethod
    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        """A place to restore data of ``kind`` into, ready for :meth:`launch`; for blocks,
        an image of ``size`` bytes holding ``disks`` (one disk when None). A compute that
        cannot launch ``kind`` raises :class:`UnsupportedOperation` naming the kind."""

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        """Start a new instance performing ``spec.function`` from the data in ``sink``."""

    @abc.abstractmethod
    def terminate(self, instance_id: str) -> None:
        """Stop the instance for good; it no longer appears in listings."""

    def cloud_health(self, instance: Instance) -> CloudHealth | None:
        """The cloud's own checks of a launched instance (EC2: the instance and system
        status checks), asked after a launch until healthy, together with the plugins'
        ``regionvault_health_check``: both must pass. None (the default): the cloud has no
        such checks, and a running instance counts when no plugin answers."""
        return None

    def register_instance(
        self,
        name: str,
        data: Path,
        *,
        function: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Instance:
        """Adopt existing data as an instance (local and on-prem providers)."""
        raise self.unsupported("register_instance")

    def unregister_instance(self, instance_id: str) -> None:
        """Forget an instance :meth:`register_instance` adopted (its data is left where it
        is), or the record of one already terminated; a launched instance still running is
        refused (terminate it). Providers that register no instances do not override it."""
        raise self.unsupported("unregister_instance")


@dataclass(frozen=True)
class CloudHealth:
    """What a cloud's own checks say of an instance: ``ok``, and ``detail`` for the reader
    when not ("instance status initializing, system status ok")."""

    ok: bool
    detail: str = ""


class Sealer(abc.ABC):
    """Seals small secrets so that only one region's KeyService can unseal them.

    Another region holds a Sealer for region B, never B's KeyService: it may seal, never
    unseal. A Sealer is built from configuration alone (a public key, an Encrypt-only grant).
    """

    def __init__(self, *, region: str) -> None:
        self.region = region

    @abc.abstractmethod
    def seal(self, secret: bytes, context: EncryptionContext) -> bytes:
        """Seal ``secret`` (at most 1 KiB) bound to ``context``."""


class KeyService(Service):
    """One region's key management: envelope data keys, sealing, rotation."""

    @property
    @abc.abstractmethod
    def key_id(self) -> str:
        """The id of the current master key (new data keys are wrapped under it)."""

    @abc.abstractmethod
    def generate_data_key(self, context: EncryptionContext) -> DataKey:
        """A fresh 256-bit data key, plaintext and wrapped under the current master key,
        the wrap bound to ``context``."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        """The plaintext of a data key this KeyService wrapped with the same ``context``;
        :class:`KeyAccessDenied` for anything else."""

    @abc.abstractmethod
    def sealer(self) -> Sealer:
        """A seal-only handle for this region, safe to give to other regions."""

    def seal(self, secret: bytes, context: EncryptionContext) -> bytes:
        return self.sealer().seal(secret, context)

    @abc.abstractmethod
    def unseal(self, sealed: bytes, context: EncryptionContext) -> bytes:
        """Open what a Sealer of this region sealed with the same ``context``;
        :class:`KeyAccessDenied` for anything else."""

    @abc.abstractmethod
    def rotate(self) -> str:
        """Make a new master key current and return its id; older keys still unwrap."""


class Vault(Service):
    """One region's object store. Names are '/'-separated, without leading '/'."""

    @property
    @abc.abstractmethod
    def vault_id(self) -> str:
        """A stable id for this vault, bound into every object's AAD by the data plane."""

    @abc.abstractmethod
    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        """Store ``data`` atomically: readers see the old object or the whole new one, never
        part. With ``if_absent``, :class:`ObjectExists` if the name is taken."""

    @abc.abstractmethod
    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or the range ``[offset, offset+length)``."""

    @abc.abstractmethod
    def head(self, name: str) -> ObjectInfo:
        """Facts about the object; :class:`ObjectNotFound` if absent."""

    def exists(self, name: str) -> bool:
        try:
            self.head(name)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix``, in name order."""

    @abc.abstractmethod
    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        """Remove the object (absent is not an error). :class:`RetentionLocked` while a
        retain-until date is in the future (governance mode may be bypassed) or a legal
        hold is on."""

    def set_retention(
        self,
        name: str,
        until: datetime,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        *,
        bypass_governance: bool = False,
    ) -> ObjectInfo:
        """Lock the object until ``until`` (WORM). A lock may be extended, never shortened,
        except a governance lock with ``bypass_governance``."""
        raise self.unsupported("set_retention")

    def set_legal_hold(self, name: str, on: bool) -> ObjectInfo:
        """Place or lift a legal hold; while on, the object cannot be deleted."""
        raise self.unsupported("set_legal_hold")

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """What killed writers left behind and nobody can still be writing: temporary files
        or incomplete multipart uploads whose writer is known to be gone, or that were last
        written more than ``older_than`` ago (the engine passes its lock expiry). The
        default: a vault whose puts leave nothing behind reports none."""
        return iter(())

    def remove_temporary(self, temporary: Temporary) -> None:
        """Remove one of :meth:`stale_temporaries` (gone already is not an error)."""
        raise self.unsupported("remove_temporary")

    def versions_over_locks(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        """``(name, what lies over it)`` for each object under ``prefix`` whose WORM-locked
        version has a newer version or a delete marker in front of it, which a versioned
        store (S3) lets anyone with write access add: never the framework's doing, so
        ``verify`` reports each as tampering. :meth:`get` and :meth:`head` still use the
        locked version. The default, for a store without versions: none."""
        return iter(())


class Transit(Service):
    """A one-way link from a source region into a destination region's inbox.

    Payloads are opaque and already sealed for the destination; Transit only moves them.
    ``region`` is the destination's name, ``source`` the source's.
    """

    def __init__(
        self, *, provider: str, source: str, region: str, capabilities: Capabilities
    ) -> None:
        super().__init__(provider=provider, region=region, capabilities=capabilities)
        self.source = source

    @abc.abstractmethod
    def send(self, name: str, payload: bytes | memoryview) -> None:
        """Deliver ``payload`` under ``name`` to the destination's inbox, atomically."""

    @abc.abstractmethod
    def has(self, name: str) -> bool:
        """True when ``name`` already sits in the inbox (lets an interrupted copy resume)."""

    @abc.abstractmethod
    def inbox(self, prefix: str = "") -> Iterator[str]:
        """Names waiting in the destination's inbox, in name order."""

    @abc.abstractmethod
    def receive(self, name: str) -> bytes:
        """Read a payload from the inbox (destination side)."""

    @abc.abstractmethod
    def discard(self, name: str) -> None:
        """Remove an ingested payload from the inbox (destination side)."""

    @property
    @abc.abstractmethod
    def bytes_sent(self) -> int:
        """Payload bytes this Transit has delivered since it was made."""

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """Partial payloads in the destination's inbox from this link that no sender can
        still be writing (its writer is known to be gone, or it was last written more than
        ``older_than`` ago). The default: a Transit whose sends leave nothing behind
        reports none."""
        return iter(())

    def remove_temporary(self, temporary: Temporary) -> None:
        """Remove one of :meth:`stale_temporaries` (gone already is not an error)."""
        raise self.unsupported("remove_temporary")


# --------------------------------------------------------------------------- provider


@dataclass(frozen=True)
class ComputeScope:
    """Which instances a region's Compute lists, from its settings alone: those of ``account``
    (what names an account, project or subscription statically) in cloud region
    ``location``, of zone ``zone`` only, or of every zone there when ``zone`` is None. Two
    regions of a site whose scopes overlap would both claim an instance; the site refuses
    them (:func:`~regionvault.core.config.check_region_claims`)."""

    provider: str
    account: str
    location: str
    zone: str | None = None

    def overlaps(self, other: ComputeScope) -> bool:
        same_place = (self.provider, self.account, self.location) == (
            other.provider,
            other.account,
            other.location,
        )
        return same_place and (self.zone is None or other.zone is None or self.zone == other.zone)

    def __str__(self) -> str:
        where = f"zone {self.zone}" if self.zone else f"every zone of {self.location}"
        return f"{where} ({self.provider} {self.account})"


class Provider(abc.ABC):
    """Builds one region's services from its configuration, and Transit between regions.

    Register a Provider class through the ``regionvault_register_providers`` hook.
    """

    #: the name used in region ids and in site.toml (``local``, ``aws``)
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: settings keys a region of this provider must have / may have (for validation)
    required_settings: ClassVar[frozenset[str]] = frozenset()
    optional_settings: ClassVar[frozenset[str]] = frozenset()

    def validate(self, region: RegionConfig) -> None:
        """Raise :class:`ConfigError` naming the key if ``region``'s settings are wrong.

        The engine has already checked required and unknown keys by the class variables.
        """

    def region_capabilities(self, region: RegionConfig) -> Capabilities:
        """What ``region``'s services of this provider offer as configured, from its settings
        alone (no request): :attr:`capabilities` less what the settings turn off, such as WORM
        on a bucket made without object lock. ``region`` is the service's view of the region
        (:meth:`RegionConfig.for_service`). The default is :attr:`capabilities`."""
        return self.capabilities

    @abc.abstractmethod
    def compute(self, region: RegionConfig) -> Compute: ...

    @abc.abstractmethod
    def key_service(self, region: RegionConfig) -> KeyService: ...

    @abc.abstractmethod
    def vault(self, region: RegionConfig) -> Vault: ...

    @abc.abstractmethod
    def sealer(self, region: RegionConfig) -> Sealer:
        """A seal-only handle for ``region`` built from configuration alone."""

    @abc.abstractmethod
    def transit(self, source: RegionConfig, destination: RegionConfig) -> Transit: ...

    def close(self) -> None:
        """Release what the provider holds across regions (SDK clients, sessions, login
        credentials). Called by the provider registry when the last open :class:`Site`
        that uses this provider closes, after the sites' services were closed; the provider
        may be used again afterwards and then makes what it needs anew. The default holds
        nothing and does nothing."""

    def compute_scope(self, region: RegionConfig) -> ComputeScope | None:
        """Which instances ``region``'s Compute (its compute view, :meth:`RegionConfig.
        for_service`) lists, from its settings alone; None (the default) when the provider
        cannot say, and then only the tick's check of listed ids applies."""
        return None

    def exclusive_spaces(self, region: RegionConfig, service: str) -> Mapping[str, str]:
        """What ``region``'s ``service`` (``vault``: its objects and its transit inbox;
        ``keys``: its key) holds alone, from its settings: a label per space (``vault``,
        ``inbox``, ``key``) and the space as a location string. No space of one region of a
        site may begin with a space of another (one repository, one inbox, one key per
        region); a whole-name space ends with ``#`` so it matches only itself. The default
        claims nothing."""
        return {}
