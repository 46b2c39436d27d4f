"""The repository: an encrypted, deduplicating store of recovery points in one region's Vault,
under that region's KeyService. The format is written down in docs/format.md.

Why this module is longer than the others: it is the data plane's whole public API, a
method per operation (backup, listing, restore, retention, verify, prune) with the
documentation its callers read; what each does beneath it is a module of its own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from regionvault.core.errors import (
    IntegrityError,
    ObjectNotFound,
    PathNotFound,
    RegionVaultError,
    RepositoryNotFound,
    RetentionLocked,
)
from regionvault.core.interfaces import (
    BlockCapture,
    BlockSink,
    Capture,
    FileCapture,
    FileSink,
    KeyService,
    Vault,
)
from regionvault.core.repository import _events, _prune, _retention, _rotate, _verify
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._backup import BackupRun
from regionvault.core.repository._backup_blocks import block_plan
from regionvault.core.repository._backup_walk import ParentLookup
from regionvault.core.repository._events import Event
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._links import keyed_tag
from regionvault.core.repository._locks import RepositoryLock
from regionvault.core.repository._manifest import (
    PointCache,
    decode_manifest,
    encode_manifest,
    load_manifests,
    load_points,
    tree_records,
)
from regionvault.core.repository._pipeline import Fetcher
from regionvault.core.repository._restore import FileRestorer, Selection
from regionvault.core.repository._restore_blocks import BlockRestorer, check_sink_disks
from regionvault.core.repository._restore_writer import ParallelWriter, Reporter
from regionvault.core.repository._store import Store, config_context
from regionvault.core.repository._tree import to_public
from regionvault.core.repository.model import (
    ChunkerParams,
    Extent,
    Manifest,
    Problem,
    ProgressCallback,
    ProtectReport,
    PruneReport,
    ReleaseReport,
    RepositorySettings,
    RestoreReport,
    TreeEntry,
    VerifyReport,
)
from regionvault.core.types import (
    CaptureIssue,
    CaptureKind,
    Instance,
    Lineage,
    ObjectInfo,
    RecoveryPoint,
    RetentionMode,
)

__all__ = ["Repository"]

log = logging.getLogger(__name__)


class Repository:
    """A recovery-point repository in ``vault``, encrypted under ``keys`` (the same region's).

    Build one with :meth:`init_or_open` (creates the repository on first use: writers) or
    :meth:`open` (never writes; :class:`RepositoryNotFound` when there is none: readers).
    Every method is safe to call from several threads and several processes at once:
    writers take a shared lock object in the vault, prune an exclusive one.
    """

    def __init__(
        self,
        vault: Vault,
        keys: KeyService,
        *,
        region: str,
        settings: RepositorySettings | None = None,
    ) -> None:
        self.vault = vault
        self.keys = keys
        self.region = region
        self.settings = settings or RepositorySettings()
        self._store = Store(vault, keys, region=region, settings=self.settings)
        self._opened = False
        #: the points of the manifests this object has decrypted (immutable once
        #: written): a listing decrypts only the new ones (:class:`PointCache`)
        self._points = PointCache()

    # ------------------------------------------------------------------ opening

    @classmethod
    def init_or_open(
        cls,
        vault: Vault,
        keys: KeyService,
        *,
        region: str,
        chunker: ChunkerParams | None = None,
        settings: RepositorySettings | None = None,
    ) -> Repository:
        """Open the repository in ``vault``, creating it first when the vault has none.

        ``chunker`` applies only when this call creates the repository (the parameters are
        stored in its config). Raises :class:`KeyAccessDenied` naming ``config`` when
        ``keys`` is not the KeyService the repository was created under.
        """
        repo = cls(vault, keys, region=region, settings=settings)
        repo._store.init_or_open(chunker)
        repo._opened = True
        return repo

    @classmethod
    def open(
        cls,
        vault: Vault,
        keys: KeyService,
        *,
        region: str,
        settings: RepositorySettings | None = None,
    ) -> Repository:
        """Open an existing repository, writing nothing to the vault: reading operations
        use this, so that they never create a repository. Raises
        :class:`RepositoryNotFound` (an :class:`ObjectNotFound` named ``config``) when the
        vault holds none yet, and :class:`KeyAccessDenied` naming ``config`` when ``keys``
        is not the KeyService the repository was created under."""
        repo = cls(vault, keys, region=region, settings=settings)
        repo._ensure_open()
        return repo

    def _ensure_open(self) -> Store:
        if not self._opened:
            try:
                self._store.open()
            except ObjectNotFound as exc:
                if exc.name != fmt.CONFIG_NAME:
                    raise
                raise RepositoryNotFound(self.region, provider=self.vault.provider) from None
            self._opened = True
        return self._store

    @property
    def repository_id(self) -> str:
        return self._ensure_open().config.repository_id

    @property
    def chunker(self) -> ChunkerParams:
        return self._ensure_open().config.chunker

    def _lock(self, *, exclusive: bool, operation: str) -> RepositoryLock:
        return RepositoryLock(self._ensure_open(), exclusive=exclusive, operation=operation)

    def _pool(self) -> ThreadPoolExecutor:
        # one thread per worker: with more threads than cores, the GIL hand-offs between
        # them cost more than the overlap of their waits gains
        return ThreadPoolExecutor(
            max_workers=self.settings.worker_count(), thread_name_prefix="regionvault-read"
        )

    # ------------------------------------------------------------------ backup

    def backup(
        self,
        capture: Capture,
        *,
        instance: Instance | None = None,
        policy: str | None = None,
        expires_at: datetime | None = None,
        parent: str | Literal[False] | None = None,
        lineage: Lineage | None = None,
        progress: ProgressCallback | None = None,
        before_commit: Callable[[], Iterable[CaptureIssue]] | None = None,
        base: str | None = None,
        point_id: str | None = None,
    ) -> RecoveryPoint:
        """Back up ``capture`` (a :class:`FileCapture` or :class:`BlockCapture`) as a new
        recovery point and return it once it is committed.

        Only chunks the repository lacks are written. For a file capture, a file whose size,
        mtime, mode and identity (inode, ctime: where the capture gives one) equal its entry
        in the parent recovery point is not read again; the
        parent is ``parent`` (a point id), or by default (None) the newest point of the same
        instance and kind; ``False`` reads every file. ``instance`` defaults to
        ``capture.instance``; ``policy``, ``expires_at`` and ``lineage`` are recorded in the
        manifest. ``progress`` is called from this thread a few times a second.

        Packs, then index objects, then the manifest (if-absent) are written; the point is
        visible only once everything it references is durable. ``before_commit`` is called
        once every byte has been read and stored, before the manifest is written (where a
        hook's ``after`` step runs); the issues it returns are recorded in the point with the
        capture's own (:class:`~regionvault.core.types.CaptureIssue`).

        A file capture that can change (entries with an ``identity``) is taken honestly: an
        entry that cannot be read or vanished is left out, one that changed while it was
        read is read again (at most three reads, then kept as last read), every entry is
        checked once more when the capture ends, and each of these is recorded in the point
        (``RecoveryPoint.issues`` counts them; the manifest names them). The point is
        committed with what was taken; only a failure of the whole run commits nothing.

        A block capture taken with ``since`` (``BlockCapture.changed_ranges`` is not None)
        is backed up incrementally against ``base``: the point made from the capture that
        ``since`` names (the caller knows which; the repository cannot tell). The base's
        chunks that no changed range touches are taken whole; only the changed ranges and
        the base chunks they touch are read. When anything leaves doubt (no ``base``, one of
        another image size, block size or disks, a damaged base), the image is read in
        full. The point restores the same image either way; its manifest names the base as
        ``parent``, its stats say ``bytes_read`` and ``bytes_from_base`` (docs/jobs.md).

        ``point_id`` commits the point under that id (from :meth:`new_point_id`; a fresh
        one by default), for a caller that records the id before the point exists.
        """
        store = self._ensure_open()
        if not isinstance(capture, FileCapture | BlockCapture):
            raise TypeError(f"cannot back up a {type(capture).__name__}")
        instance = instance or capture.instance
        if point_id is not None:
            fmt.parse_hex_id(point_id, "recovery point id")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        with self._lock(exclusive=False, operation="backup") as lock:
            # a damaged index object costs only dedup (its chunks are stored again), never
            # the backup; verify names it, and prune refuses to run until it is fixed
            state = store.load_index(tolerant=True)
            for name, reason in state.problems:
                log.warning("backup in %s ignores %s: %s", self.region, name, reason)
            parent_manifest = self._parent(capture, instance, parent)
            with self._pool() as pool:
                lookup = None
                plan = None
                if parent_manifest is not None and isinstance(capture, FileCapture):
                    records = _tolerant(tree_records(store, state.index, pool, parent_manifest))
                    lookup = ParentLookup(records)
                elif base is not None and isinstance(capture, BlockCapture):
                    plan = block_plan(store, state.index, pool, capture, instance.id, base)
                run = BackupRun(store, state.index, progress=progress)
                result = run.run(capture, lookup, plan)
            issues = list(result.issues)
            if before_commit is not None:
                issues.extend(before_commit())
            point_id = fmt.new_id() if point_id is None else point_id
            parent_id = (
                plan.base_id
                if plan is not None
                else None
                if parent_manifest is None
                else parent_manifest.point.id
            )
            created = datetime.now(UTC)
            image = (
                (capture.size, capture.block_size) if isinstance(capture, BlockCapture) else None
            )
            body = encode_manifest(
                store,
                point_id=point_id,
                kind=capture.kind,
                instance_id=instance.id,
                instance_name=instance.name,
                tags=instance.tags,
                function=instance.function,
                policy=policy,
                created_at=created,
                taken_at=capture.taken_at,
                expires_at=expires_at,
                lineage=lineage,
                parent=parent_id,
                size=result.size,
                image=image,
                tree_chunks=result.tree_chunks,
                tree_bytes=result.tree_bytes,
                entries=result.entries,
                stats=result.stats,
                issues=issues,
                disks=capture.disks if isinstance(capture, BlockCapture) else None,
                launch=capture.launch_facts(),
            )
            lock.check()
            store.put_sealed(
                fmt.ObjectKind.MANIFEST, fmt.point_name(point_id), body, if_absent=True
            )
        return RecoveryPoint(
            id=point_id,
            region=self.region,
            instance_id=instance.id,
            instance_name=instance.name,
            kind=capture.kind,
            created_at=created,
            expires_at=expires_at,
            size=result.size,
            policy=policy,
            lineage=lineage,
            tags=instance.tags,
            function=instance.function,
            issues=len(issues),
        )

    @staticmethod
    def new_point_id() -> str:
        """A fresh recovery point id, for :meth:`backup`'s ``point_id``."""
        return fmt.new_id()

    def slot_point_id(self, instance_id: str, slot: str) -> str:
        """The id of the scheduled backup of ``instance_id`` for ``slot`` (its text, as the
        slot tag holds it) in this repository: a keyed hash (the chunk-id key), so it says
        nothing of the instance, and the same for every run of that job. The manifest is put
        if-absent, so a second run that reaches the commit (its runner paused past its lock,
        docs/jobs.md) gets :class:`ObjectExists` and no second point for the slot."""
        return keyed_tag(self._ensure_open(), f"slot:{instance_id}:{slot}")

    def _parent(
        self, capture: Capture, instance: Instance, parent: str | Literal[False] | None
    ) -> Manifest | None:
        if parent is False or not isinstance(capture, FileCapture):
            return None
        if parent is not None:
            manifest = self.load_manifest(parent)
            if manifest.point.kind is not capture.kind:
                raise ValueError(f"parent {parent} is a {manifest.point.kind} point")
            return manifest
        candidates = [p for p in self.points(instance.id, tolerant=True) if p.kind is capture.kind]
        for candidate in reversed(candidates):
            try:
                return self.load_manifest(candidate.id)
            except (IntegrityError, ObjectNotFound) as exc:
                # damaged or forgotten since it was listed: the one before will do
                log.warning("backup in %s: parent %s not used: %s", self.region, candidate.id, exc)
        return None

    # ------------------------------------------------------------------ reading

    def points(
        self, instance_id: str | None = None, *, tolerant: bool = False
    ) -> list[RecoveryPoint]:
        """Every recovery point (of ``instance_id``, if given), oldest first. Each call lists
        the vault's manifests once; a manifest is decrypted the first time this object
        lists it and its point kept (immutable once written: :class:`PointCache`), so nothing
        about a point is readable without the keys, and a listing costs one decryption per
        point new since the last. With ``tolerant``, a manifest that cannot be read is
        logged (naming it) and left out instead of raising :class:`IntegrityError`."""
        points, problems = load_points(self._ensure_open(), self._points, tolerant=tolerant)
        for problem in problems:
            log.warning("%s: a point left out of the listing: %s", self.region, problem)
        return [p for p in points if instance_id is None or p.instance_id == instance_id]

    def load_manifest(self, point_id: str) -> Manifest:
        """The manifest of ``point_id``, authenticated; :class:`ObjectNotFound` if absent."""
        store = self._ensure_open()
        name = self._point_name(point_id)
        return decode_manifest(store, name, store.get_sealed(fmt.ObjectKind.MANIFEST, name))

    def _point_name(self, point_id: str) -> str:
        """The manifest's object name; a malformed id is simply not found."""
        try:
            return fmt.point_name(fmt.parse_hex_id(point_id, "recovery point id"))
        except ValueError:
            raise ObjectNotFound(
                f"{fmt.POINT_PREFIX}{point_id}",
                provider=self.vault.provider,
                region=self.vault.region,
            ) from None

    def entries(self, point: str | Manifest) -> Iterator[TreeEntry | Extent]:
        """The entries (file captures) or extents (block captures) of a point, in order,
        streamed from the vault."""
        manifest = point if isinstance(point, Manifest) else self.load_manifest(point)
        store = self._ensure_open()
        name = fmt.point_name(manifest.point.id)
        state = store.load_index()
        with self._pool() as pool:
            for record in tree_records(store, state.index, pool, manifest):
                yield to_public(record, name)

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        point_id: str,
        target: Path | str | FileSink | BlockSink,
        *,
        paths: Iterable[str] | None = None,
        progress: ProgressCallback | None = None,
        sync: bool = False,
    ) -> RestoreReport:
        """Restore a recovery point byte-exact: a file tree into a directory (a path or a
        :class:`FileSink`), with modes, mtimes, symlinks, hard links, FIFOs, device nodes,
        owners, extended attributes, empty and sparse files; a block image into a file
        (holes stay holes, fsynced) or a :class:`BlockSink` (written in block-aligned
        pieces; committing the sink is left to its owner; it must hold the image's disks
        at their offsets). An image of several disks restores into a path as a new or empty
        directory holding one raw image file per disk, ``disk<N>-<name>.img`` (N from 0,
        the disk it boots from; see :func:`~regionvault.core.repository._disks.disk_file_names`).

        ``paths`` (file trees only) restores those entries, what lies under them, and the
        directories above them. Every chunk is authenticated and checked against its id
        before it is written; files are written under temporary names and renamed when
        complete, so nothing unverified ever appears under a restored name. Raises
        :class:`IntegrityError` naming the damaged object.

        What could not be applied (owners and device nodes when not root, sockets, extended
        attributes the target filesystem refuses) is in the report's ``notes``: the restore
        still succeeds. Into a new or empty directory a marker (``.rv-restore``) stays until
        the restore is complete: the same restore run again after a kill finishes it, and
        any other restore into that directory is refused.

        Like restic and borg, a restore leaves the written data to the kernel's writeback: a
        kill at any moment is harmless (the page cache outlives the process), but a power
        loss soon after the restore may leave files empty or partial with nothing saying so.
        ``sync=True`` makes a file tree durable before the restore returns and before its
        marker goes (writeback started per file, then one ``syncfs`` of the target's
        filesystem): at about a quarter more wall time on this machine's disk.
        """
        store = self._ensure_open()
        manifest = self.load_manifest(point_id)
        name = fmt.point_name(point_id)
        zero = bytes(store.config.chunker.max_size)
        kind = manifest.point.kind
        with self._lock(exclusive=False, operation="restore"):
            # a damaged index object fails the restore only if it lists a needed chunk
            state = store.load_index(tolerant=True)
            with self._pool() as pool:

                def records() -> Iterator[fmt.RawRecord]:
                    return tree_records(store, state.index, pool, manifest)

                fetcher = Fetcher(
                    store,
                    state.index,
                    pool,
                    what=name,
                    window_bytes=self.settings.restore_window,
                    ahead=self.settings.read_ahead,
                    max_read=self.settings.max_read,
                )
                if kind is CaptureKind.FILES:
                    if isinstance(target, BlockSink):
                        raise ValueError(f"{point_id} is a file tree; it cannot go to a BlockSink")
                    root = Path(target.root if isinstance(target, FileSink) else target)
                    selection = None if paths is None else Selection(paths)
                    if selection is not None:
                        self._check_selection(selection, records(), point_id)
                    report = Reporter(
                        progress,
                        manifest.stats.get("files"),
                        manifest.point.size if selection is None else None,
                    )
                    writer = self._writer(store, state.index, pool, name, zero, report)
                    writer.writeback = sync
                    notes = FileRestorer(writer, root, what=name, point_id=point_id, sync=sync).run(
                        records, selection
                    )
                    files, size, read = report.files_done, report.bytes_done, writer.bytes_read
                else:
                    if paths is not None:
                        raise RegionVaultError(
                            f"{point_id} is a block image: paths apply to file trees only"
                        )
                    if isinstance(target, FileSink):
                        raise ValueError(f"{point_id} is a block image; it needs a BlockSink")
                    assert manifest.image_size is not None
                    assert manifest.block_size is not None
                    report = Reporter(progress, None, manifest.image_size)
                    blocks = BlockRestorer(
                        what=name,
                        image_size=manifest.image_size,
                        report=report,
                        disks=manifest.disks,
                    )
                    if isinstance(target, BlockSink):
                        if manifest.disks:
                            check_sink_disks(name, manifest.disks, target)
                        blocks.to_sink(records(), target, fetcher)
                        read = fetcher.bytes_read
                    elif manifest.several_disks:
                        blocks.to_disk_files(records(), Path(target), fetcher, manifest.block_size)
                        read = fetcher.bytes_read
                    elif manifest.odd_disks:
                        # one disk, not the whole image: the file is that disk
                        blocks.to_disk_file(records(), Path(target), fetcher, manifest.block_size)
                        read = fetcher.bytes_read
                    else:
                        writer = self._writer(store, state.index, pool, name, zero, report)
                        blocks.to_file(records(), Path(target), writer)
                        read = writer.bytes_read
                    files, size, notes = 1, manifest.image_size, []
            # no lock.check() here, unlike the writers: a restore commits nothing to the
            # vault and verified every chunk it wrote, so a lock lost midway cannot have made
            # it wrong (a pack pruned meanwhile fails the read instead)
        return RestoreReport(point_id, files, size, read, tuple(notes))

    def _writer(
        self,
        store: Store,
        index: ChunkIndex,
        pool: ThreadPoolExecutor,
        name: str,
        zero: bytes,
        report: Reporter,
    ) -> ParallelWriter:
        return ParallelWriter(
            store,
            index,
            pool,
            what=name,
            zero=zero,
            report=report,
            batch_bytes=self.settings.restore_window,
            ahead=self.settings.read_ahead,
            max_read=self.settings.max_read,
        )

    @staticmethod
    def _check_selection(
        selection: Selection, records: Iterator[fmt.RawRecord], point_id: str
    ) -> None:
        wanted = set(selection.paths)
        for record in records:
            path = record.path.decode("utf-8", "surrogateescape")
            for sel in list(wanted):
                if path == sel or path.startswith(sel + "/"):
                    wanted.discard(sel)
            if not wanted:
                return
        raise PathNotFound(point_id, sorted(wanted))

    # ------------------------------------------------------------------ retention

    def forget(self, point_ids: Iterable[str]) -> list[str]:
        """Delete these recovery points' manifests (their data stays until :meth:`prune`).
        Refuses, deleting nothing, with :class:`RetentionLocked` if any manifest is under a
        WORM lock or legal hold; :class:`ObjectNotFound` if any is absent."""
        store = self._ensure_open()
        names = [self._point_name(p) for p in point_ids]
        now = datetime.now(UTC)
        for name in names:
            info = store.vault.head(name)
            reason = _retention.retention_hold(info, now)
            if reason is not None:
                raise RetentionLocked(
                    name, reason, provider=store.vault.provider, region=store.vault.region
                )
        for name in names:
            store.vault.delete(name)
            self._points.discard(name)
        return [name[len(fmt.POINT_PREFIX) :] for name in names]

    def forget_expired(
        self, *, now: datetime | None = None, instance_id: str | None = None
    ) -> list[str]:
        """Forget every point whose ``expires_at`` has passed, except those a WORM lock or
        legal hold still protects (they go once it ends). Returns the forgotten ids."""
        now = now or datetime.now(UTC)
        forgotten = []
        for point in self.points(instance_id):
            if point.expires_at is None or point.expires_at > now:
                continue
            with contextlib.suppress(RetentionLocked, ObjectNotFound):
                forgotten.extend(self.forget([point.id]))
        return forgotten

    def protect(
        self,
        point_id: str,
        *,
        until: datetime | None = None,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        legal_hold: bool = False,
    ) -> ProtectReport:
        """Put a WORM lock (``until``, ``mode``) and/or a legal hold on a recovery point: on
        every pack and index object it uses, then on its manifest. Locks only ever grow: an
        object already locked longer is left alone, so protecting a newer point extends the
        locks of packs it shares with older ones. Needs a vault with ``worm_lock`` /
        ``legal_hold`` (otherwise :class:`UnsupportedOperation`)."""
        if until is None and not legal_hold:
            raise ValueError("protect needs until, legal_hold, or both")
        if until is not None and until.tzinfo is None:
            raise ValueError("until must be timezone-aware")
        store = self._ensure_open()
        manifest = self.load_manifest(point_id)
        with self._lock(exclusive=False, operation="protect"):
            return _retention.protect(
                store, manifest, until=until, mode=mode, legal_hold=legal_hold
            )

    def point_object(self, point_id: str) -> ObjectInfo:
        """The manifest object of ``point_id`` as the vault reports it: when it was committed
        (``modified``) and the lock and hold it carries (:meth:`protect` locks the manifest
        last, so a manifest that carries a lock says every object the point uses does)."""
        return self._ensure_open().vault.head(self._point_name(point_id))

    def point_objects(self) -> dict[str, ObjectInfo]:
        """:meth:`point_object` of every point, by id, from one listing (a vault whose
        listing does not say an object's lock reports none: ask :meth:`point_object`)."""
        return {
            info.name[len(fmt.POINT_PREFIX) :]: info
            for info in self._ensure_open().vault.list(fmt.POINT_PREFIX)
        }

    def release(
        self, point_id: str, *, legal_hold: bool = True, bypass_governance: bool = False
    ) -> ReleaseReport:
        """Lift a point's legal hold and, with ``bypass_governance`` (the administrator's
        act), its governance lock, from its manifest and from each object it uses that no
        other protected point needs (those keep what the other points ask).
        :class:`RetentionLocked` names a compliance lock, which nobody lifts. Takes the
        exclusive lock: it lifts protection that a point committed meanwhile (under the shared
        lock) may rely on, having found the shared objects already held."""
        store = self._ensure_open()
        manifest = self.load_manifest(point_id)
        with self._lock(exclusive=True, operation="release"):
            others, _ = load_manifests(store)
            return _retention.release(
                store,
                manifest,
                others,
                legal_hold=legal_hold,
                bypass_governance=bypass_governance,
            )

    # ------------------------------------------------------------------ maintenance

    def verify(
        self,
        read_data: bool = False,
        progress: ProgressCallback | None = None,
        *,
        repair: bool = False,
    ) -> VerifyReport:
        """Check the repository. Structure: the config, every index, manifest, link object
        and copy record decrypts and authenticates, every chunk a point uses is indexed,
        every indexed pack exists with its indexed size. With ``read_data``, every pack is
        read whole, every byte authenticated and every chunk checked against its id.
        Problems are reported (each naming its object), not raised.

        With ``repair`` (takes the exclusive lock, like prune): rebuild the index from the
        packs when an index object is damaged or lost, remove damaged link objects and copy
        records (losing one costs a re-send, never data), and remove the temporaries killed
        writers left in the vault (:meth:`Vault.stale_temporaries`); then check again. What
        was done is in ``report.repaired``; a damaged manifest or pack is reported, never
        removed."""
        store = self._ensure_open()
        operation = "verify --repair" if repair else "verify"
        with self._lock(exclusive=repair, operation=operation) as lock:
            return _verify.verify(
                store, read_data=read_data, progress=progress, lock=lock, repair=repair
            )

    def prune(
        self, progress: ProgressCallback | None = None, *, max_unused: float = 0.0
    ) -> PruneReport:
        """Remove data no recovery point uses: packs wholly unused are deleted, packs partly
        unused (more than ``max_unused`` of their bytes) are rewritten, leftovers of killed
        runs removed. Order: new packs, new index (superseding the old), then deletions, so
        a crash at any point loses nothing. Objects under a WORM lock or legal hold are
        never deleted: they are skipped and listed in the report. Takes the exclusive lock
        (waits up to ``settings.lock_wait`` for running backups)."""
        if not 0.0 <= max_unused < 1.0:
            raise ValueError("max_unused is a fraction from 0 up to 1")
        store = self._ensure_open()
        with self._lock(exclusive=True, operation="prune") as lock:
            return _prune.prune(store, lock=lock, max_unused=max_unused, progress=progress)

    def rotate_keys(
        self,
        progress: Callable[[int, int], None] | None = None,
        *,
        step: Callable[[str], None] | None = None,
    ) -> _rotate.RotationReport:
        """Make a new master key of the KeyService current and re-wrap what the repository
        holds under it, without rewriting a pack: a new keyring (every run's data key,
        sealed under a data key of the new master key), then the config rewritten under the
        new key, then older keyrings deleted. Afterwards the old master key can be disabled:
        every point still restores. Takes the exclusive lock (no backup writes packs under
        the old key meanwhile). A run again after a crash finishes the interrupted rotation.
        ``progress(packs done, packs)`` while the pack headers are read; ``step`` is for
        tests (told "rotated", "keyring", "config", "deleted" as each completes)."""
        store = self._ensure_open()
        with self._lock(exclusive=True, operation="rotate-keys") as lock:
            return _rotate.rotate_keys(store, lock=lock, progress=progress, step=step)

    def rebuild_index(self) -> int:
        """Index every readable pack again from its own header and authenticated blob table,
        superseding all index objects (after index objects were lost or damaged); packs that
        do not authenticate stay out (verify names them). Takes the exclusive lock. Returns
        the packs indexed."""
        store = self._ensure_open()
        with self._lock(exclusive=True, operation="rebuild-index"):
            return _verify.rebuild_index(store)

    # ------------------------------------------------------------------ event log

    def record_event(
        self,
        action: str,
        *,
        at: datetime,
        who: Mapping[str, Any],
        point: str | None = None,
        instance: str | None = None,
        result: str = "ok",
        error: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        """Append one event to this region's event log: a sealed ``events/<seq>`` object
        chained to the one before, put if-absent, never rewritten; prune never deletes it
        (docs/format.md section 17). ``action`` is an :class:`EventAction`, ``result`` an
        :class:`EventResult`; ``detail`` a small mapping of texts, whole numbers, booleans
        and lists of them (no secrets: it is for counts, sizes, key ids). Takes no lock:
        a writer that loses a number to another takes the next. EventError names a bad
        field."""
        return _events.write_event(
            self._ensure_open(),
            action,
            at=at,
            who=who,
            point=point,
            instance=instance,
            result=result,
            error=error,
            detail=detail,
        )

    def events(
        self, since: datetime | None = None, *, problems: list[Problem] | None = None
    ) -> list[Event]:
        """This region's events at or after ``since`` (all by default), oldest first. An
        event object that does not authenticate raises :class:`IntegrityError` naming it;
        with a ``problems`` list, it is added there (as a :class:`Problem`) and left out."""
        return _events.read_events(self._ensure_open(), since, problems)

    def event_log(self, since: datetime | None = None) -> _events.EventLog:
        """This region's event log from the first event at or after ``since`` (all by
        default), with every problem found (a damaged event, a gap, a broken chain) and
        what reading it cost (docs/audit.md)."""
        return _events.read_event_log(self._ensure_open(), since)

    def wrapped_pack_keys(self, limit: int) -> list[tuple[str, bytes, dict[str, str]]]:
        """The wrapped run data keys of the ``limit`` packs the vault lists as most
        recently written (one per run), each with its pack's name and the encryption
        context it is bound to: read by ranged GETs of the pack headers, for an audit to
        hand another region's KeyService (docs/audit.md)."""
        store = self._ensure_open()
        listed = sorted(store.vault.list(fmt.PACK_PREFIX), key=lambda i: i.modified, reverse=True)
        found: list[tuple[str, bytes, dict[str, str]]] = []
        runs: set[bytes] = set()
        for info in listed:
            if len(found) >= limit:
                break
            head = store.vault.get(info.name, length=fmt.PACK_HEADER.size + 4096)
            header = fmt.PackHeader.parse(info.name, head)
            if header.run_id in runs:
                continue
            runs.add(header.run_id)
            found.append((info.name, header.wrapped_key, store.data_key_context(header.run_id)))
        return found

    def wrapped_config_key(self) -> tuple[bytes, dict[str, str]]:
        """The config's wrapped data key and the encryption context it is bound to, read
        from the config's cleartext header: what an audit hands another region's KeyService
        to see it refused (docs/audit.md)."""
        store = self._ensure_open()
        data = store.vault.get(fmt.CONFIG_NAME)
        header = fmt.EnvelopeHeader.parse(fmt.CONFIG_NAME, data, fmt.ObjectKind.CONFIG)
        return header.wrapped_key, config_context(store.vault_id)


def _tolerant(records: Iterator[fmt.RawRecord]) -> Iterator[fmt.RawRecord]:
    """The parent's records until one cannot be read: a damaged parent only costs the
    skipping of unchanged files (everything is read again), never the backup."""
    with contextlib.suppress(IntegrityError, RegionVaultError):
        yield from records
