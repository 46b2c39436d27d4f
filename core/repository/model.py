"""Value types of the repository API: settings, progress, manifests, reports."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from regionvault.core.types import CaptureIssue, Disk, FileKind, RecoveryPoint

__all__ = [
    "ChunkerParams",
    "Extent",
    "Manifest",
    "Problem",
    "Progress",
    "ProgressCallback",
    "ProtectReport",
    "PruneReport",
    "ReleaseReport",
    "RepositorySettings",
    "RestoreReport",
    "TreeEntry",
    "VerifyReport",
]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC parameters, fixed for a repository when it is created (stored in its config).

    ``avg_size`` is FastCDC's target (a power of two); as the FastCDC paper's cut-point
    skipping implies, the mean chunk of long inputs comes out near ``avg_size + min_size``.
    """

    min_size: int = 32 * KiB
    avg_size: int = 128 * KiB
    max_size: int = 512 * KiB

    def problem(self) -> str | None:
        """Why these parameters cannot be used, or None."""
        if self.avg_size & (self.avg_size - 1) or not 256 <= self.avg_size <= 4 * MiB:
            return f"avg_size {self.avg_size} must be a power of two from 256 to 4 MiB"
        if not 64 <= self.min_size <= self.avg_size:
            return f"min_size {self.min_size} must be from 64 to avg_size"
        if not self.avg_size <= self.max_size <= 8 * MiB:
            return f"max_size {self.max_size} must be from avg_size to 8 MiB"
        return None


@dataclass(frozen=True)
class RepositorySettings:
    """How this process works on a repository; nothing here is stored in the vault."""

    #: hash/compress/encrypt workers in a backup, fetch/decrypt/write threads in a restore
    #: (0: one per CPU, at least 2, at most 4)
    workers: int = 0
    #: files a backup reads at once (reading and chunking run on these threads, hashing on
    #: the workers; more than one pays off only with more than two cores)
    read_threads: int = 1
    #: a pack is closed once it holds this many bytes (tens of MiB: few, large puts)
    pack_size: int = 16 * MiB
    #: packs put at once (each holds a pack buffer: memory is pack_size x (this + 1)); two
    #: overlap one put's latency (an fsync, a cloud round trip) with the next
    upload_threads: int = 2
    #: zstd level for chunks (0 stores every chunk uncompressed)
    compression_level: int = 1
    #: an index object is written after this many packs (and at the end of every run), so a
    #: killed backup's uploaded packs are found again by the next one
    index_every_packs: int = 8
    #: a lock not refreshed for this long is stale; the holder refreshes it every ttl/4
    lock_ttl: timedelta = timedelta(minutes=30)
    #: how long an operation retries while another process holds a conflicting lock
    lock_wait: timedelta = timedelta(seconds=60)
    #: a restore fetches chunks in windows of about this many bytes ...
    restore_window: int = 16 * MiB
    #: ... keeps this many windows in flight (memory: about window x (read_ahead + 1)) ...
    read_ahead: int = 3
    #: ... and reads at most this many bytes of a pack in one ranged get
    max_read: int = 8 * MiB

    def worker_count(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True)
class Progress:
    """A progress report; ``*_total`` are None while unknown. Backup and restore count files
    and their bytes; verify and prune count packs (``files_*``) and the bytes they read.
    Reports come a few times a second from the thread that called the operation (restore:
    from that thread while it waits), and once more with ``done`` at the end."""

    operation: str
    files_done: int = 0
    files_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    #: bytes stored in new packs so far (after compression and encryption)
    bytes_written: int = 0
    done: bool = False


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a recovery point's file tree: a file, directory, symlink, FIFO, socket
    or device. ``path``, ``target``, ``link``, ``user`` and ``group`` are surrogate-escaped
    like :attr:`FileEntry.path <regionvault.core.types.FileEntry.path>`. A point of format
    version 1 recorded no owners, device numbers, hard links or extended attributes: its
    entries have the defaults (None, 0, None, ())."""

    path: str
    kind: FileKind
    #: permission bits with set-user-id, set-group-id and sticky
    mode: int
    mtime_ns: int
    #: a regular file's size (a hard link's too: the size of the file it links to)
    size: int = 0
    target: str | None = None
    chunks: tuple[bytes, ...] = ()
    #: owner and group by number and by name (None: not recorded)
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    #: a character or block device's number
    rdev: int = 0
    #: the earlier path of the same tree this entry is a hard link to (no chunks of its own)
    link: str | None = None
    #: extended attributes, POSIX ACLs included, as (name, value) in name order
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Extent:
    """A written range of a block image; everything outside the extents is a hole (zeros)."""

    offset: int
    length: int
    chunks: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A recovery point's manifest as stored (docs/format.md, "Manifests")."""

    point: RecoveryPoint
    format_version: int
    vault_id: str
    taken_at: datetime
    parent: str | None
    root_hash: str
    tree_chunks: tuple[bytes, ...]
    tree_bytes: int
    entry_count: int
    image_size: int | None = None
    block_size: int | None = None
    stats: Mapping[str, int] = field(default_factory=dict)
    #: the entries the capture did not take whole, as named (``point.issues`` counts all)
    issues: tuple[CaptureIssue, ...] = ()
    #: a block image's disks, the first the one it boots from (one disk, "disk", that is the
    #: whole image when the manifest records none); empty for a file tree
    disks: tuple[Disk, ...] = ()
    #: what the capture recorded for a launch (``Capture.launch_facts``): key pair, security
    #: groups, user data...; may hold secrets, kept only inside this sealed manifest
    launch: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def several_disks(self) -> bool:
        return len(self.disks) > 1

    @property
    def odd_disks(self) -> bool:
        """Whether the disks are other than one disk that is the whole image: several, or
        one shorter than the image or not at offset 0 (what a manifest records)."""
        if self.image_size is None or not self.disks:
            return False
        first = self.disks[0]
        return len(self.disks) > 1 or first.offset != 0 or first.size != self.image_size


@dataclass(frozen=True)
class Problem:
    """Something wrong with one object."""

    object: str
    message: str

    def __str__(self) -> str:
        return f"{self.object}: {self.message}"


@dataclass
class VerifyReport:
    read_data: bool
    points: int = 0
    indexes: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    errors: list[Problem] = field(default_factory=list)
    #: harmless findings: leftovers of killed runs, unreferenced data (prune collects them)
    warnings: list[Problem] = field(default_factory=list)
    #: link entries and copy records read and authenticated
    links: int = 0
    copy_records: int = 0
    #: events of the event log read and authenticated
    events: int = 0
    #: what ``verify(repair=True)`` removed or rebuilt, each naming its object
    repaired: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class RestoreReport:
    point_id: str
    files: int
    #: bytes restored (file contents, or the image size)
    bytes: int
    #: bytes read from the vault
    bytes_read: int
    #: what could not be applied, one line per kind of thing (owners when not root, device
    #: nodes, sockets, extended attributes the target filesystem lacks); the data is whole
    notes: tuple[str, ...] = ()


@dataclass
class PruneReport:
    points: int = 0
    packs_before: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_written: int = 0
    blobs_removed: int = 0
    #: stored bytes no longer in the vault (deleted packs minus the packs written instead)
    bytes_freed: int = 0
    indexes_written: int = 0
    indexes_deleted: int = 0
    stale_locks_removed: int = 0
    #: temporaries killed writers left in the vault, removed (see Vault.stale_temporaries)
    temporaries_removed: int = 0
    #: objects prune would have deleted but a WORM lock or legal hold protects
    skipped: list[Problem] = field(default_factory=list)
    #: objects whose lock or hold prune extended to a protected point's that uses them
    locks_extended: int = 0


@dataclass
class ProtectReport:
    point_id: str
    retain_until: datetime | None
    legal_hold: bool
    #: objects whose lock was set or extended (packs, indexes, then the manifest)
    locked: list[str] = field(default_factory=list)
    #: objects already locked at least as long
    unchanged: int = 0


@dataclass
class ReleaseReport:
    point_id: str
    #: objects whose hold was lifted or governance lock shortened
    released: list[str] = field(default_factory=list)
    #: objects left as they were because another protected point uses them
    kept: list[str] = field(default_factory=list)
