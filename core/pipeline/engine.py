"""The regional pipeline: tag, schedule, back up, copy, restore and launch, retain.

:class:`Engine` is the embedding API. Every step is also an idempotent job with a stable key
(core/pipeline/jobs.py); :meth:`Engine.tick` runs one pass of all of them through an executor, and
:meth:`Engine.run` ticks until stopped. See docs/embedding.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from regionvault.core.errors import (
    InstanceNotFound,
    IntegrityError,
    ObjectNotFound,
    PolicyError,
    RegionVaultError,
    RepositoryNotFound,
    RetentionLocked,
    TransitError,
)
from regionvault.core.interfaces import BlockSink, FileSink, RestoreSink
from regionvault.core.pipeline.executor import ThreadExecutor
from regionvault.core.pipeline.hooks import HOOK_WORK_DIR, HookRun
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    LISTED_ISSUES,
    RETENTION,
    TAG,
    Incomplete,
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
    copy_job,
    copy_jobs_for,
    copy_phase_job,
    copy_receipt_job,
    format_slot,
    parse_slot,
    retention_job,
    slot_of,
    tag_job,
)
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.pipeline.scheduler import ScheduleReport, due_instances
from regionvault.core.pipeline.state import DrillRecord, StateStore
from regionvault.core.pipeline.tagger import TagReport, tag_region
from regionvault.core.policy import instance_hooks, resolve_policy
from regionvault.core.repository import (
    CommitReport,
    CopyProgress,
    CopyReceipt,
    CopyReceiver,
    CopyResult,
    CopySender,
    CopyTracker,
    Repository,
    RepositorySettings,
    SentNotice,
    copy_point,
    offer_name,
    open_receipt,
    open_sent_notice,
    receipt_name,
    seal_receipt,
    seal_sent_notice,
    sent_name,
)
from regionvault.core.types import CaptureIssue, Instance, LaunchSpec, RecoveryPoint, Tags

if TYPE_CHECKING:
    from regionvault.core.pipeline.executor import Executor
    from regionvault.core.repository import ProgressCallback
    from regionvault.core.site import Region, Site

__all__ = [
    "DEFAULT_COPY_GRACE",
    "SLOT_TAG",
    "Engine",
    "RestoreResult",
    "RetentionReport",
    "StatusRow",
    "TickReport",
    "run_chains",
]

log = logging.getLogger(__name__)

_Half = TypeVar("_Half", CopySender, CopyReceiver)

#: recorded in a recovery point's tags: the schedule slot it was made for
SLOT_TAG = "regionvault:slot"
#: how long a launch may take to become healthy before the restore reports it unhealthy
DEFAULT_HEALTH_TIMEOUT = 60.0
#: a region's own tick offers a point again when no receipt came this long after its offer
DEFAULT_COPY_GRACE = timedelta(hours=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RestoreResult:
    point: RecoveryPoint
    region: str
    #: where the data was restored (a directory or image file), None for a cloud sink
    target: Path | None
    instance: Instance | None = None
    #: the RTO: from the restore request to a healthy instance; None if it never was healthy
    seconds_to_healthy: float | None = None
    seconds_to_restore: float = 0.0
    #: why a launched instance is not healthy (timed out, terminated, health check raised);
    #: the instance is left as it is, never removed by the engine
    health_error: str | None = None
    #: what the restore could not apply (owners and device nodes when not root, sockets,
    #: extended attributes the target refuses), one line per kind; the data is whole
    notes: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.seconds_to_healthy is not None


@dataclass
class RetentionReport:
    region: str
    forgotten: list[str] = field(default_factory=list)
    #: expired points that a WORM lock or legal hold keeps
    protected: list[str] = field(default_factory=list)
    prune: dict[str, Any] = field(default_factory=dict)


@dataclass
class TickReport:
    at: datetime
    tagged: list[TagReport] = field(default_factory=list)
    schedule: list[ScheduleReport] = field(default_factory=list)
    jobs: list[JobOutcome] = field(default_factory=list)
    #: problems met outside any job (a region that could not be listed, ...)
    problems: list[str] = field(default_factory=list)
    #: the region of a region's own tick (``tick(region=...)``); None for a whole-site tick
    region: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures()

    def failures(self) -> list[JobOutcome]:
        # a BUSY job is not a failure: another runner is doing it right now
        return [o for o in self.jobs if o.status is JobStatus.FAILED]

    def incomplete(self) -> list[JobOutcome]:
        """The jobs this tick ran that did their work but not whole (a backup whose point
        names entries it could not take); one replayed from an earlier tick is not counted
        again."""
        return [o for o in self.jobs if o.status is JobStatus.DONE and o.incomplete]

    @property
    def outcome(self) -> str:
        """``failed`` (a job failed, or a problem outside any job), else ``incomplete`` (a
        job ran but did not do its work whole), else ``ok``."""
        if not self.ok:
            return "failed"
        return "incomplete" if self.incomplete() else "ok"


@dataclass(frozen=True)
class StatusRow:
    """Where one instance stands in one region."""

    instance_id: str
    instance_name: str
    region: str
    #: home region (backups) or a copy destination
    role: str
    newest_point: str | None
    newest_at: datetime | None
    #: the RPO right now: age of the data in the newest recovery point (since its capture;
    #: for a copy, since the source was captured, not since the copy was made)
    rpo_seconds: float | None
    points: int
    last_copy_at: datetime | None = None
    #: entries the newest point names as not taken whole (0: it is complete)
    newest_issues: int = 0
    last_drill_at: datetime | None = None
    last_drill_rto: float | None = None
    last_drill_healthy: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "instance_id": self.instance_id,
            "instance_name": self.instance_name,
            "region": self.region,
            "role": self.role,
            "newest_point": self.newest_point,
            "newest_at": iso(self.newest_at),
            "rpo_seconds": self.rpo_seconds,
            "points": self.points,
            "newest_issues": self.newest_issues,
            "last_copy_at": iso(self.last_copy_at),
            "last_drill_at": iso(self.last_drill_at),
            "last_drill_rto": self.last_drill_rto,
            "last_drill_healthy": self.last_drill_healthy,
        }


class Engine:
    """The pipeline over a :class:`Site`.

    >>> engine = Engine(Site.load("site.toml"))              # doctest: +SKIP
    >>> point = engine.backup("vcu-1")                        # doctest: +SKIP
    >>> copy = engine.copy(point.id, to="west").point        # doctest: +SKIP
    >>> result = engine.restore(copy.id, region="west", launch=True)  # doctest: +SKIP

    With ``split_copies``, :meth:`tick` copies through the four phase jobs (``copy-offer``,
    ``copy-request``, ``copy-send``, ``copy-commit``), each of which needs only one region's
    credentials, instead of one ``copy`` job that needs both (docs/jobs.md).

    ``tick(region=R)`` is region R's own tick: it needs R's credentials alone (the other
    regions' Sealers and inboxes aside), and drives R's side of every copy from what its
    inbox holds; ``copy_grace`` is how long it waits for a destination's receipt before it
    offers a point again (docs/jobs.md, "One service per region").
    """

    def __init__(
        self,
        site: Site,
        *,
        clock: Callable[[], datetime] = utcnow,
        settings: RepositorySettings | None = None,
        workers: int = 2,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        split_copies: bool = False,
        copy_grace: timedelta = DEFAULT_COPY_GRACE,
    ) -> None:
        if copy_grace <= timedelta(0):
            raise RegionVaultError(f"copy_grace must be positive, got {copy_grace}")
        self.site = site
        self.split_copies = split_copies
        self.copy_grace = copy_grace
        self.clock = clock
        self.settings = settings
        self.workers = workers
        self.health_timeout = health_timeout
        self.state = StateStore(site.config.state_dir)
        self._repos: dict[str, Repository] = {}
        self._repo_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def region(self, ref: str) -> Region:
        return self.site.region(ref)

    def repository(self, region: str, *, create: bool = True) -> Repository:
        """The recovery-point repository in ``region``'s vault, under its own KeyService.

        With ``create`` (the default, for writers: backup, the receiving end of a copy) it is
        created on first use. With ``create=False`` nothing is written to the vault, and
        :class:`RepositoryNotFound` is raised when it holds no repository yet: every
        reading path of the engine (listing, status, restore, retention, verify) opens it
        so, and never creates one.
        """
        r = self.region(region)
        with self._repo_lock:
            repo = self._repos.get(r.name)
            if repo is None:
                if create:
                    repo = Repository.init_or_open(
                        r.vault, r.keys, region=r.name, settings=self.settings
                    )
                else:
                    repo = Repository.open(r.vault, r.keys, region=r.name, settings=self.settings)
                self._repos[r.name] = repo
            return repo

    def _points(self, region: str, instance_id: str | None = None) -> list[RecoveryPoint]:
        """The recovery points in ``region`` (of ``instance_id``), none when it holds no
        repository yet (which is not created)."""
        try:
            repo = self.repository(region, create=False)
        except RepositoryNotFound:
            return []
        return repo.points(instance_id)

    def find_point(self, point_id: str, region: str | None = None) -> RecoveryPoint:
        """A recovery point by id (a unique prefix of at least 6 characters is enough), in
        ``region`` or, when None, in whichever region holds it."""
        regions = [self.region(region)] if region else self.site.regions
        found: list[RecoveryPoint] = []
        for r in regions:
            try:
                points = self.repository(r.name, create=False).points()
            except RepositoryNotFound as exc:
                if region is None:
                    continue  # a region nothing was backed up or copied into yet
                raise RepositoryNotFound(
                    r.name,
                    provider=exc.provider,
                    message=f"no recovery point {point_id!r} in {r.name}: it holds no "
                    "repository yet (nothing has been backed up or copied there)",
                ) from None
            for point in points:
                if point.id == point_id or (len(point_id) >= 6 and point.id.startswith(point_id)):
                    found.append(point)
        if len(found) == 1:
            return found[0]
        where = f" in {regions[0].name}" if region else ""
        if not found:
            raise RegionVaultError(f"no recovery point {point_id!r}{where}")
        listed = ", ".join(f"{p.id} ({p.region})" for p in found[:5])
        raise RegionVaultError(f"recovery point {point_id!r} is ambiguous{where}: {listed}")

    def _hook(self, name: str, **kwargs: Any) -> Any:
        return getattr(self.site.plugin_manager.hook, name)(**kwargs)

    # ------------------------------------------------------------------ tag

    def tag(self, region: str) -> TagReport:
        """Give the untagged instances of ``region`` the site's default policy tag."""
        return tag_region(self.region(region).compute, self.site.config)

    # ------------------------------------------------------------------ backup

    def newest_point(self, instance: Instance) -> RecoveryPoint | None:
        """The instance's newest recovery point in its home region (copies excluded)."""
        points = [p for p in self._points(instance.region, instance.id) if p.lineage is None]
        return points[-1] if points else None

    def _newest_slot(self, instance: Instance) -> datetime | None:
        point = self.newest_point(instance)
        if point is None:
            return None
        slot = point.tags.get(SLOT_TAG)
        return parse_slot(slot) if slot else point.created_at

    def backup(
        self,
        instance: str | Instance,
        *,
        region: str | None = None,
        slot: datetime | None = None,
        progress: ProgressCallback | None = None,
    ) -> RecoveryPoint:
        """Back up an instance (id, unique name or :class:`Instance`) in its home region.

        With ``slot``, the backup belongs to that schedule slot: when a recovery point for
        the slot exists already (a job run twice, two runners), that point is returned and
        nothing new is written.

        A point whose capture could not take every entry whole (an entry that vanished, could
        not be read, or kept changing while it was read) is committed with what was taken,
        and its ``issues`` count what it names (:meth:`point_issues`); a failure of the whole
        backup raises and commits nothing.
        """
        inst = (
            instance
            if isinstance(instance, Instance)
            else self.site.find_instance(instance, region=region)
        )
        home = self.region(inst.region)
        policy = resolve_policy(inst, self.site.config)
        repo = self.repository(home.name)
        tags = dict(inst.tags)
        if slot is not None:
            slot_text = format_slot(slot)
            for point in repo.points(inst.id):
                if point.lineage is None and point.tags.get(SLOT_TAG) == slot_text:
                    return point
            tags[SLOT_TAG] = slot_text
        now = self.clock()
        expires = now + policy.retention if policy is not None else None
        hooks = HookRun(
            instance_hooks(inst, self.site.config),
            self.site.config.hooks,
            inst,
            region=home.name,
            work_root=self.site.config.state_dir / HOOK_WORK_DIR,
        )
        self._hook("regionvault_before_capture", region=home.name, instance=inst)
        with hooks:
            # the site's hooks nest inside the plugins' before/after_capture: their befores
            # run after the plugins', their afters before the plugins' (docs/hooks.md)
            hooks.before()
            capture = home.compute.capture(inst.id)
            error: BaseException | None = None
            try:
                hooks.captured(capture)
                point = repo.backup(
                    hooks.wrap(capture),
                    instance=replace(inst, tags=Tags(tags)),
                    policy=policy.spec if policy is not None else None,
                    expires_at=expires,
                    progress=progress,
                    before_commit=hooks.before_commit,
                )
            except BaseException as exc:
                error = exc
                hooks.after(failed=True)  # still inside the plugins' after_capture
                raise
            finally:
                try:
                    self._hook(
                        "regionvault_after_capture",
                        region=home.name,
                        instance=inst,
                        capture=capture,
                        error=error,
                    )
                finally:
                    capture.close()
        self._hook("regionvault_after_backup", region=home.name, recovery_point=point)
        return point

    def point_issues(self, point: RecoveryPoint) -> tuple[CaptureIssue, ...]:
        """What ``point`` names as not taken whole, in capture order (its manifest lists the
        first 1000 of ``point.issues``); empty for a complete point."""
        if not point.issues:
            return ()
        return self.repository(point.region, create=False).load_manifest(point.id).issues

    # ------------------------------------------------------------------ copy

    def copy(
        self,
        point_id: str,
        *,
        source: str | None = None,
        to: str,
        retention: timedelta | None = None,
        progress: Callable[[CopyProgress], None] | None = None,
    ) -> CopyResult:
        """Copy a recovery point into region ``to``, re-encrypted under ``to``'s keys.

        Only chunks ``to`` does not hold yet cross the link, sealed for ``to``; the copy is
        committed with its lineage, and kept for ``retention`` (default: the instance's copy
        retention for ``to``, else the source point's own). Copying a point again returns the
        existing copy; running an interrupted copy again resumes it.
        """
        point = self.find_point(point_id, source)
        src = self.region(point.region)
        dst = self.region(to)
        if src.name == dst.name:
            raise RegionVaultError(f"cannot copy {point.id} from {src.name} to itself")
        result = copy_point(
            source=self.repository(src.name, create=False),
            destination=self.repository(dst.name),
            forward=self.site.transit(src.name, dst.name),
            backward=self.site.transit(dst.name, src.name),
            seal_to_destination=dst.sealer(),
            seal_to_source=src.sealer(),
            point_id=point.id,
            expires_at=self._copy_expiry(point, dst.name, retention),
            progress=progress,
        )
        if not result.existing:
            self._hook(
                "regionvault_after_copy",
                source_region=src.name,
                region=dst.name,
                source=point,
                copy=result.point,
            )
        return result

    def _copy_expiry(
        self, point: RecoveryPoint, destination: str, retention: timedelta | None
    ) -> datetime | None:
        if retention is not None:
            return self.clock() + retention
        try:
            instance = self.region(point.region).compute.get_instance(point.instance_id)
            policy = resolve_policy(instance, self.site.config)
        except (InstanceNotFound, PolicyError):
            policy = None
        if policy is not None:
            return point.created_at + policy.copy_retention(destination)
        return point.expires_at

    def copy_jobs(
        self,
        point_id: str,
        *,
        source: str | None = None,
        to: str,
        retention: timedelta | None = None,
        slot: datetime | None = None,
    ) -> list[Job]:
        """The four phase jobs that copy a recovery point into ``to``, in the order they
        must run (each once the one before has succeeded): ``copy-offer`` and ``copy-send``
        run in the source region, ``copy-request`` and ``copy-commit`` in ``to``, each with
        that region's credentials alone. The copy's expiry is worked out here, as
        :meth:`copy` does, and travels in the commit's payload."""
        point = self.find_point(point_id, source)
        dst = self.region(to)
        if point.region == dst.name:
            raise RegionVaultError(f"cannot copy {point.id} from {dst.name} to itself")
        return copy_jobs_for(
            point.region,
            point.id,
            dst.name,
            expires_at=self._copy_expiry(point, dst.name, retention),
            slot=slot,
        )

    def copy_sender(self, source: str, destination: str) -> CopySender:
        """The source's half of a copy into ``destination``: the source's own repository,
        the destination's Sealer and the two Transits; nothing of the destination's keys."""
        src, dst = self.region(source), self.region(destination)
        return CopySender(
            self.repository(src.name, create=False),
            forward=self.site.transit(src.name, dst.name),
            backward=self.site.transit(dst.name, src.name),
            seal_to_destination=dst.sealer(),
        )

    def copy_receiver(self, source: str, destination: str) -> CopyReceiver:
        """The destination's half of a copy from ``source``: the destination's own
        repository, the source's Sealer and the two Transits; nothing of the source's keys."""
        src, dst = self.region(source), self.region(destination)
        return CopyReceiver(
            self.repository(dst.name),
            forward=self.site.transit(src.name, dst.name),
            backward=self.site.transit(dst.name, src.name),
            seal_to_source=src.sealer(),
        )

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        point_id: str,
        *,
        region: str,
        target: Path | str | None = None,
        paths: Iterable[str] | None = None,
        launch: bool = False,
        name: str | None = None,
        progress: ProgressCallback | None = None,
        sync: bool = False,
    ) -> RestoreResult:
        """Restore a recovery point held in ``region`` with ``region``'s keys alone.
        ``sync=True`` waits for a restored file tree to reach the disk
        (:meth:`Repository.restore`).

        With ``target``, the data is restored there. With ``launch``, the region's Compute
        makes a restore sink, the data is restored into it and a new instance performing the
        same function is started, health-checked through ``regionvault_health_check``; the
        time from this call to a healthy instance is the RTO, recorded as a drill.

        Nothing is created in ``region``'s vault: with no repository there,
        :class:`RepositoryNotFound` is raised. When the restore or the launch fails before
        an instance exists, the sink is discarded (``RestoreSink.discard``: no restored
        data stays behind) and the error is raised. An instance that was launched but does
        not become healthy (or whose health check raised) is never removed: the result has
        ``healthy`` false and ``health_error`` saying why, the drill is recorded unhealthy,
        and the instance stays for inspection until it is terminated.
        """
        started = time.monotonic()
        r = self.region(region)
        point = self.find_point(point_id, r.name)
        repo = self.repository(r.name, create=False)
        if not launch:
            if target is None:
                raise RegionVaultError("restore needs a target path, or launch")
            report = repo.restore(point.id, Path(target), paths=paths, progress=progress, sync=sync)
            return RestoreResult(
                point,
                r.name,
                Path(target),
                seconds_to_restore=time.monotonic() - started,
                notes=report.notes,
            )
        manifest = repo.load_manifest(point.id)
        spec = LaunchSpec(
            name=self._launch_name(r, point, name),
            tags=point.tags.without([SLOT_TAG]),
            function=point.function,
            extra={"source_point": point.id, "source_instance": point.instance_id},
        )
        sink = r.compute.open_restore_sink(spec, point.kind, size=manifest.image_size)
        try:
            if not isinstance(sink, FileSink | BlockSink):
                raise RegionVaultError(
                    f"{r.name}: compute gave a {type(sink).__name__}, not a FileSink or BlockSink"
                )
            report = repo.restore(point.id, sink, paths=paths, progress=progress, sync=sync)
            if isinstance(sink, BlockSink):
                sink.commit()
            restored = time.monotonic() - started
            instance = r.compute.launch(spec, sink)
        except BaseException as exc:
            # no instance holds the restored data: it must not stay behind
            self._discard(r, sink, exc)
            raise
        rto, health_error = self._await_healthy(r, instance, started)
        try:
            instance = r.compute.get_instance(instance.id)
        except RegionVaultError as exc:
            health_error = health_error or f"cannot read the launched instance back: {exc}"
        if rto is None:
            log.warning(
                "instance %s (%s) launched in %s from %s did not become healthy%s; it is "
                "left as it is for inspection: terminate it when done",
                instance.id,
                instance.name,
                r.name,
                point.id,
                f" ({health_error})" if health_error else "",
            )
        self._hook(
            "regionvault_after_launch",
            region=r.name,
            instance=instance,
            recovery_point=point,
            seconds_to_healthy=rto,
        )
        self.state.record_drill(
            DrillRecord(
                region=r.name,
                instance_id=point.instance_id,
                point_id=point.id,
                launched_id=instance.id,
                at=self.clock(),
                healthy=rto is not None,
                rto_seconds=rto,
            )
        )
        target_path = sink.root if isinstance(sink, FileSink) else None
        return RestoreResult(
            point,
            r.name,
            target_path,
            instance,
            rto,
            restored,
            health_error=health_error,
            notes=report.notes,
        )

    @staticmethod
    def _discard(region: Region, sink: RestoreSink, error: BaseException) -> None:
        """Discard the sink of a restore or launch that failed with ``error``. If that fails
        too, ``error`` (what the caller sees) still wins: the leftover is logged and noted
        on it."""
        try:
            sink.discard()
        except Exception as exc:
            log.error(
                "the restored data of a failed launch in %s stays behind: %s", region.name, exc
            )
            error.add_note(f"the restored data in {region.name} could not be discarded: {exc}")
        else:
            log.info("discarded the restored data of a failed launch in %s", region.name)

    @staticmethod
    def _launch_name(region: Region, point: RecoveryPoint, name: str | None) -> str:
        """``name``, refused before any data is restored when a live instance has it; else
        ``<instance>-<point id[:8]>``, with ``-2``, ``-3``... when a drill of the same point
        is still running."""
        taken = {
            i.name
            for i in region.compute.list_instances()
            if i.state not in ("terminated", "pending")
        }
        if name is not None:
            if name in taken:
                raise RegionVaultError(
                    f"{region.name} already has an instance named {name!r}", region=region.name
                )
            return name
        base = f"{point.instance_name}-{point.id[:8]}"
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def _await_healthy(
        self, region: Region, instance: Instance, started: float
    ) -> tuple[float | None, str | None]:
        """``(seconds from started to healthy, None)``, or ``(None, why)`` when the instance
        did not become healthy in time or its health check raised (the instance exists
        either way: this is reported, never raised)."""
        deadline = time.monotonic() + self.health_timeout
        while True:
            try:
                current = region.compute.get_instance(instance.id)
                answer = self._hook(
                    "regionvault_health_check", region=region.name, instance=current
                )
            except Exception as exc:
                log.warning("health check of %s in %s raised: %r", instance.id, region.name, exc)
                return None, f"health check raised {type(exc).__name__}: {exc}"
            if answer is None:
                answer = current.state == "running"
            if answer:
                return time.monotonic() - started, None
            if current.state == "terminated":
                return None, "the instance terminated"
            if time.monotonic() >= deadline:
                return None, f"not healthy after {self.health_timeout:g}s (state {current.state})"
            time.sleep(0.05)

    # ------------------------------------------------------------------ retention

    def sweep_inboxes(self, region: str) -> list[str]:
        """Remove the partial payloads killed copies left in ``region``'s inboxes (one per
        other region of the site) that no sender can still be writing: those whose writer is
        gone, or older than the lock expiry (``settings.lock_ttl``). Whole payloads stay:
        a re-run of their copy takes them in. Returns a line per removal, naming it."""
        r = self.region(region)
        ttl = (self.settings or RepositorySettings()).lock_ttl
        removed: list[str] = []
        for peer in self.site.regions:
            if peer.name == r.name:
                continue
            try:
                transit = self.site.transit(peer.name, r.name)
                try:
                    for temporary in list(transit.stale_temporaries(ttl)):
                        transit.remove_temporary(temporary)
                        removed.append(
                            f"{r.name}: inbox from {peer.name}: "
                            f"{temporary.name or temporary.handle}: partial "
                            f"payload removed ({temporary.reason})"
                        )
                finally:
                    transit.close()
            except RegionVaultError as exc:
                # one unreachable inbox does not stop the sweep of the others
                log.warning("%s: inbox from %s not swept: %s", r.name, peer.name, exc)
        return removed

    def retain(self, region: str) -> RetentionReport:
        """Forget ``region``'s recovery points past their retention, then collect their
        data. WORM locks and legal holds win: a protected point stays, and is reported."""
        r = self.region(region)
        report = RetentionReport(r.name)
        try:
            repo = self.repository(r.name, create=False)
        except RepositoryNotFound:
            return report  # nothing was ever kept here: nothing to forget
        now = self.clock()
        for point in repo.points():
            if point.expires_at is None or point.expires_at > now:
                continue
            try:
                repo.forget([point.id])
                report.forgotten.append(point.id)
            except RetentionLocked:
                report.protected.append(point.id)
            except ObjectNotFound:
                continue  # another runner forgot it meanwhile
        if report.forgotten:
            # what a region's own tick kept about copies of the forgotten points goes too
            try:
                CopyTracker(repo).tidy({p.id for p in repo.points()})
            except RegionVaultError as exc:
                log.warning("%s: tidying copy receipts failed: %s", r.name, exc)
            pruned = repo.prune()
            report.prune = {
                "packs_deleted": pruned.packs_deleted,
                "packs_rewritten": pruned.packs_rewritten,
                "bytes_freed": pruned.bytes_freed,
                "skipped": [str(p) for p in pruned.skipped],
            }
        return report

    # ------------------------------------------------------------------ jobs and ticks

    def handlers(self) -> JobHandlers:
        """The function that runs each kind of job; a distributed executor uses the same."""

        def run_tag(job: Job) -> Any:
            report = self.tag(job.region or "")
            return {
                "tagged": [t.instance_id for t in report.tagged],
                "malformed": [str(m) for m in report.malformed],
            }

        def run_backup(job: Job) -> Any:
            instance = self.region(job.region or "").compute.get_instance(
                job.payload["instance_id"]
            )
            point = self.backup(instance, slot=parse_slot(job.payload["slot"]))
            result = {"point": point.id}
            if point.issues:
                # done for its slot all the same (the point exists), and saying so
                listed = self.point_issues(point)[:LISTED_ISSUES]
                return Incomplete({**result, "issues": point.issues}, listed, point.issues)
            return result

        def run_copy(job: Job) -> Any:
            result = self.copy(
                job.payload["recovery_point"], source=job.region, to=job.payload["destination"]
            )
            return {
                "copy": result.point.id,
                "existing": result.existing,
                "bytes_moved": result.bytes_moved,
            }

        def run_retention(job: Job) -> Any:
            report = self.retain(job.region or "")
            return {"forgotten": report.forgotten, "protected": report.protected}

        return JobHandlers(
            {
                TAG: run_tag,
                BACKUP: run_backup,
                COPY: run_copy,
                RETENTION: run_retention,
                COPY_OFFER: self._run_copy_offer,
                COPY_REQUEST: self._run_copy_request,
                COPY_SEND: self._run_copy_send,
                COPY_COMMIT: self._run_copy_commit,
                COPY_RECEIPT: self._run_copy_receipt,
            }
        )

    # The copy phases: each builds only its own region's repository (vault and keys), plus
    # the other region's Sealer and the Transits, all from configuration.

    def _copy_phase(self, job: Job, *, source_side: bool) -> tuple[str, str, str]:
        """``(point id, source, destination)`` of a copy-phase job, whose region must be
        the side that runs it."""
        try:
            point_id = str(job.payload["recovery_point"])
            source = self.region(str(job.payload["source"])).name
            destination = self.region(str(job.payload["destination"])).name
        except KeyError as exc:
            raise RegionVaultError(f"job {job.key}: payload lacks {exc.args[0]!r}") from None
        runs_in = source if source_side else destination
        if job.region is None or self.region(job.region).name != runs_in:
            raise RegionVaultError(
                f"job {job.key}: a {job.kind} job runs in {runs_in}, not in {job.region}"
            )
        return point_id, source, destination

    @staticmethod
    @contextlib.contextmanager
    def _links_closed(half: _Half) -> Iterator[_Half]:
        """Use ``half``, then close the Transits built for it (a job builds its own)."""
        try:
            yield half
        finally:
            for transit in (half.forward, half.backward):
                try:
                    transit.close()
                except Exception as exc:
                    log.warning("closing %r failed: %s", transit, exc)

    def _run_copy_offer(self, job: Job) -> Any:
        point_id, source, destination = self._copy_phase(job, source_side=True)
        with self._links_closed(self.copy_sender(source, destination)) as sender:
            sent = sender.offer(point_id)
            if job.payload.get("track"):
                # a region's own tick: remember when, so that it waits for the receipt
                CopyTracker(sender.repository).mark_offered(destination, point_id, self.clock())
        return {"offer": offer_name(point_id), "bytes_sent": sent}

    def _run_copy_request(self, job: Job) -> Any:
        point_id, source, destination = self._copy_phase(job, source_side=False)
        with self._links_closed(self.copy_receiver(source, destination)) as receiver:
            if job.payload.get("receipt"):
                found = self._answer_with_receipt(receiver, point_id)
                if found is not None:
                    return {
                        "existing": found.id,
                        "chunks_total": 0,
                        "chunks_requested": 0,
                        "leftovers": 0,
                        "bytes_sent": 0,
                        "receipt": True,
                    }
            report = receiver.request(point_id, source)
        return {
            "existing": report.existing.id if report.existing is not None else None,
            "chunks_total": report.chunks_total,
            "chunks_requested": report.chunks_requested,
            "leftovers": report.leftovers,
            "bytes_sent": report.bytes_sent,
        }

    def _run_copy_send(self, job: Job) -> Any:
        point_id, source, destination = self._copy_phase(job, source_side=True)
        notified = False
        with self._links_closed(self.copy_sender(source, destination)) as sender:
            report = sender.send(point_id)
            if job.payload.get("notify") and report.requested:
                # a region's own tick: tell the destination every batch has landed, and how
                # long to keep the copy (the source's policy says)
                point = self.find_point(point_id, source)
                notice = SentNotice(
                    point_id,
                    source,
                    destination,
                    self._copy_expiry(point, destination, None),
                    report.batches,
                    report.chunks_sent,
                )
                sender.forward.send(
                    sent_name(point_id), seal_sent_notice(sender.seal_to_destination, notice)
                )
                notified = True
        result = {
            "requested": report.requested,
            "chunks_sent": report.chunks_sent,
            "batches": report.batches,
            "bytes_sent": report.bytes_sent,
        }
        if job.payload.get("notify"):
            result["notified"] = notified
        return result

    def _run_copy_commit(self, job: Job) -> Any:
        point_id, source, destination = self._copy_phase(job, source_side=False)
        if job.payload.get("notice"):
            return self._commit_on_notice(job, point_id, source, destination)
        if "expires_at" not in job.payload:
            raise RegionVaultError(f"job {job.key}: payload lacks 'expires_at' (null: keep)")
        expiry = job.payload["expires_at"]
        try:
            expires_at = None if expiry is None else datetime.fromisoformat(str(expiry))
        except ValueError:
            raise RegionVaultError(
                f"job {job.key}: expires_at {expiry!r} is not an ISO 8601 time"
            ) from None
        if expires_at is not None and expires_at.utcoffset() is None:
            raise RegionVaultError(f"job {job.key}: expires_at {expiry!r} has no time zone")
        with self._links_closed(self.copy_receiver(source, destination)) as receiver:
            report = receiver.commit(point_id, source, expires_at)
        self._after_commit(source, destination, report)
        return {
            "copy": report.point.id,
            "existing": report.existing,
            "batches_ingested": report.batches_ingested,
        }

    def _after_commit(self, source: str, destination: str, report: CommitReport) -> None:
        if not report.existing and report.source is not None:
            self._hook(
                "regionvault_after_copy",
                source_region=source,
                region=destination,
                source=report.source,
                copy=report.point,
            )

    # A region's own tick adds three small steps to the phases (docs/copy.md, "Receipts"):
    # the source's copy-send ends with a sealed *sent notice*; the destination commits on it
    # and answers with a sealed *receipt*, as it does an offer for a point it holds already;
    # the source's copy-receipt takes the receipt in and records it in its own vault.

    def _answer_with_receipt(self, receiver: CopyReceiver, point_id: str) -> RecoveryPoint | None:
        """When the destination holds the copy already: send the source a receipt, then drop
        what is left in the inbox for the point (a crash in between leaves the offer or the
        notice, and the next tick answers again). Returns the copy, or None."""
        found = receiver.existing(point_id)
        if found is None:
            return None
        receipt = CopyReceipt.of(receiver.source, point_id, found)
        receiver.backward.send(
            receipt_name(point_id), seal_receipt(receiver.seal_to_source, receipt)
        )
        receiver.tidy(point_id)
        return found

    def _commit_on_notice(self, job: Job, point_id: str, source: str, destination: str) -> Any:
        with self._links_closed(self.copy_receiver(source, destination)) as receiver:
            found = self._answer_with_receipt(receiver, point_id)
            if found is not None:
                return {"copy": found.id, "existing": True, "batches_ingested": 0, "receipt": True}
            inbox = receiver.forward
            notice_name = sent_name(point_id)
            try:
                sealed = inbox.receive(notice_name)
            except TransitError:
                if inbox.has(notice_name):
                    raise
                raise RegionVaultError(
                    f"job {job.key}: no sent notice for {point_id} in {destination}'s inbox",
                    region=destination,
                ) from None
            try:
                notice = open_sent_notice(
                    receiver.repository.keys,
                    point_id,
                    sealed,
                    source=source,
                    destination=destination,
                )
            except IntegrityError:
                inbox.discard(notice_name)  # damaged: the next tick asks again
                raise
            if not inbox.has(offer_name(point_id)):
                inbox.discard(notice_name)
                raise RegionVaultError(
                    f"job {job.key}: a sent notice for {point_id} but no offer in "
                    f"{destination}'s inbox; the notice is dropped (the source offers again)",
                    region=destination,
                )
            try:
                report = receiver.commit(point_id, source, notice.expires_at)
            except RegionVaultError as exc:
                if "has not arrived" in str(exc):
                    # a chunk was collected, or a damaged batch dropped, since the request:
                    # without the notice, the next tick requests what is missing again
                    inbox.discard(notice_name)
                raise
            receipt = CopyReceipt.of(source, point_id, report.point)
            receiver.backward.send(
                receipt_name(point_id), seal_receipt(receiver.seal_to_source, receipt)
            )
            inbox.discard(notice_name)
        self._after_commit(source, destination, report)
        return {
            "copy": report.point.id,
            "existing": report.existing,
            "batches_ingested": report.batches_ingested,
            "receipt": True,
        }

    def _run_copy_receipt(self, job: Job) -> Any:
        point_id, source, destination = self._copy_phase(job, source_side=True)
        repo = self.repository(source, create=False)
        name = receipt_name(point_id)
        transit = self.site.transit(destination, source)
        try:
            try:
                sealed = transit.receive(name)
            except TransitError:
                if transit.has(name):
                    raise
                return {"copy": None, "recorded": False}  # taken in already
            try:
                receipt = open_receipt(
                    repo.keys, point_id, sealed, source=source, destination=destination
                )
            except IntegrityError as exc:
                # a damaged receipt: the point is offered again after the grace period, and
                # the destination, holding the copy, answers with a new receipt
                log.warning("discarding a damaged receipt from %s: %s", destination, exc)
                transit.discard(name)
                return {"copy": None, "recorded": False, "discarded": str(exc)}
            recorded = CopyTracker(repo).record(receipt)
            transit.discard(name)
        finally:
            try:
                transit.close()
            except Exception as exc:
                log.warning("closing %r failed: %s", transit, exc)
        return {"copy": receipt.copy, "recorded": recorded}

    def ledger(self) -> JobLedger:
        # JobLedger keeps its files under <state_dir>/jobs, the same ledger docs/jobs.md's
        # workers use, so their runs and this engine's see each other's locks and records
        return JobLedger(self.site.config.state_dir)

    def tick(self, region: str | None = None) -> TickReport:
        """One pass: tag every region, back up what is due, copy new points where their
        policies say, apply retention. Each step is a job: a step already done for its
        slot is not done again.

        With ``region``, region's own tick (:meth:`region_tick`): the same for that region
        alone, with its credentials alone."""
        if region is not None:
            return self.region_tick(region)
        now = self.clock()
        report = TickReport(at=now)
        cfg = self.site.config
        with ThreadExecutor(
            self.handlers(),
            self.ledger(),
            max_workers=self.workers,
            plugin_manager=self.site.plugin_manager,
        ) as executor:
            tag_slot = slot_of(now, cfg.tag_interval)
            for outcome in executor.run([tag_job(r.name, tag_slot) for r in self.site.regions]):
                report.jobs.append(outcome)
            backups: list[Job] = []
            for r in self.site.regions:
                try:
                    schedule = due_instances(r.compute, self._newest_slot, cfg, now)
                except RegionVaultError as exc:
                    report.problems.append(f"{r.name}: schedule: {exc}")
                    continue
                report.schedule.append(schedule)
                backups.extend(schedule.jobs())
            outcomes = executor.run(backups)
            report.jobs.extend(outcomes)
            retain_slot = slot_of(now, cfg.schedule_interval)
            copies = self._copies_due(report)
            if self.split_copies:
                chains = [
                    copy_jobs_for(
                        point.region,
                        point.id,
                        dest,
                        expires_at=self._copy_expiry(point, dest, None),
                        slot=retain_slot,
                    )
                    for point, dest in copies
                ]
                report.jobs.extend(run_chains(executor, chains))
            else:
                jobs = [copy_job(point.region, point.id, dest) for point, dest in copies]
                report.jobs.extend(executor.run(jobs))
            report.jobs.extend(
                executor.run([retention_job(r.name, retain_slot) for r in self.site.regions])
            )
        return report

    def region_tick(self, region: str) -> TickReport:
        """Region ``region``'s own tick, for a backup service running in that region with
        its own credentials alone (of the other regions: their Sealers, and write access to
        their inboxes). Each step is a job with a stable key (the schedule slot's):

        1. tag its untagged instances; back up its due instances;
        2. take in what its inbox holds from each other region: a destination's receipt
           (``copy-receipt``: recorded in its own vault), a sent notice (``copy-commit``:
           commit the copy, answer with a receipt), a request (``copy-send``: send the
           chunks, then a sent notice), an offer (``copy-request``; or a receipt when it
           holds the copy already);
        3. offer the newest point of each of its instances to every region its policy copies
           to (``copy-offer``), unless a receipt says the destination holds it, or it was
           offered less than ``copy_grace`` ago;
        4. apply retention to its vault.

        The other regions' ticks do their sides of each copy; one round of alternating
        ticks moves a copy one phase on (docs/jobs.md, "One service per region")."""
        here = self.region(region)
        r_name = here.name
        now = self.clock()
        report = TickReport(at=now, region=r_name)
        cfg = self.site.config
        slot = slot_of(now, cfg.schedule_interval)
        with ThreadExecutor(
            self.handlers(),
            self.ledger(),
            max_workers=self.workers,
            plugin_manager=self.site.plugin_manager,
        ) as executor:
            report.jobs.extend(executor.run([tag_job(r_name, slot_of(now, cfg.tag_interval))]))
            try:
                schedule = due_instances(here.compute, self._newest_slot, cfg, now)
            except RegionVaultError as exc:
                report.problems.append(f"{r_name}: schedule: {exc}")
            else:
                report.schedule.append(schedule)
                report.jobs.extend(executor.run(schedule.jobs()))
            first: list[Job] = []
            then: list[Job] = []
            for peer, points in self._inbox(r_name, report).items():
                for point_id, what in sorted(points.items()):
                    if "receipt" in what:
                        first.append(copy_receipt_job(r_name, point_id, peer, slot=slot))
                    if "sent" in what:
                        first.append(
                            copy_phase_job(
                                COPY_COMMIT,
                                r_name,
                                point_id,
                                peer,
                                slot=slot,
                                payload={"notice": True, "receipt": True},
                            )
                        )
                    elif "offer" in what:
                        then.append(
                            copy_phase_job(
                                COPY_REQUEST,
                                r_name,
                                point_id,
                                peer,
                                slot=slot,
                                payload={"receipt": True},
                            )
                        )
                    if "request" in what:
                        then.append(
                            copy_phase_job(
                                COPY_SEND,
                                r_name,
                                point_id,
                                peer,
                                slot=slot,
                                payload={"notify": True},
                            )
                        )
            report.jobs.extend(executor.run(first))
            report.jobs.extend(executor.run(then))
            offers = [
                copy_phase_job(
                    COPY_OFFER, r_name, point.id, dest, slot=slot, payload={"track": True}
                )
                for point, dest in self._offers_due(report, now)
            ]
            report.jobs.extend(executor.run(offers))
            report.jobs.extend(executor.run([retention_job(r_name, slot)]))
        return report

    def _inbox(self, region: str, report: TickReport) -> dict[str, dict[str, set[str]]]:
        """What ``region``'s inbox holds from each other region: ``{peer: {point id:
        {"offer", "request", "sent", "receipt", "batch"}}}`` (names only: nothing opened)."""
        found: dict[str, dict[str, set[str]]] = {}
        for peer in self.site.regions:
            if peer.name == region:
                continue
            try:
                transit = self.site.transit(peer.name, region)
                try:
                    names = list(transit.inbox("copy/"))
                finally:
                    transit.close()
            except RegionVaultError as exc:
                report.problems.append(f"{region}: inbox from {peer.name}: {exc}")
                continue
            for name in names:
                parts = name.split("/")
                if len(parts) != 3 or not parts[1]:
                    continue
                what = "batch" if parts[2].startswith("batch-") else parts[2]
                found.setdefault(peer.name, {}).setdefault(parts[1], set()).add(what)
        return found

    def _offers_due(self, report: TickReport, now: datetime) -> list[tuple[RecoveryPoint, str]]:
        """``(point, destination)`` for the newest point of each instance of the tick's
        region and each region its policy copies to, unless the region's vault holds a
        receipt for it or it was offered less than ``copy_grace`` ago."""
        due: list[tuple[RecoveryPoint, str]] = []
        tracker: CopyTracker | None = None
        for schedule in report.schedule:
            instances = [d.instance for d in schedule.due] + [n.instance for n in schedule.not_due]
            for instance in instances:
                try:
                    policy = resolve_policy(instance, self.site.config)
                    point = self.newest_point(instance)
                    if policy is None or point is None:
                        continue
                    if tracker is None:
                        tracker = CopyTracker(self.repository(point.region, create=False))
                    for ref in policy.copy_to:
                        dest = self.region(str(ref)).name
                        if dest == point.region or tracker.receipt(dest, point.id) is not None:
                            continue
                        offered = tracker.offered_at(dest, point.id)
                        if offered is None or now - offered >= self.copy_grace:
                            due.append((point, dest))
                except RegionVaultError as exc:
                    report.problems.append(f"{instance.id}: copy: {exc}")
        return due

    def _copies_due(self, report: TickReport) -> list[tuple[RecoveryPoint, str]]:
        """``(point, destination)`` for every destination of every instance's newest point
        that the destination does not hold yet (new points, and copies an earlier tick did
        not finish)."""
        due: list[tuple[RecoveryPoint, str]] = []
        for schedule in report.schedule:
            instances = [d.instance for d in schedule.due] + [n.instance for n in schedule.not_due]
            for instance in instances:
                try:
                    policy = resolve_policy(instance, self.site.config)
                    point = self.newest_point(instance)
                except RegionVaultError as exc:
                    report.problems.append(f"{instance.id}: copy: {exc}")
                    continue
                if policy is None or point is None:
                    continue
                for dest in policy.copy_to:
                    held = {
                        p.lineage.source_recovery_point
                        for p in self._points(str(dest), instance.id)
                        if p.lineage is not None
                    }
                    if point.id not in held:
                        due.append((point, self.region(str(dest)).name))
        return due

    def run(
        self,
        stop: threading.Event,
        *,
        interval: timedelta | None = None,
        on_tick: Callable[[TickReport], None] | None = None,
        max_ticks: int | None = None,
        region: str | None = None,
    ) -> int:
        """Tick every ``interval`` (default: the shorter of the site's tag and schedule
        intervals) until ``stop`` is set; a tick in progress finishes first. Returns the
        number of ticks run. With ``region``, each tick is that region's own tick."""
        cfg = self.site.config
        every = interval or min(cfg.tag_interval, cfg.schedule_interval)
        ticks = 0
        while not stop.is_set() and (max_ticks is None or ticks < max_ticks):
            report = self.tick(region)
            ticks += 1
            if on_tick is not None:
                on_tick(report)
            if stop.wait(every.total_seconds()):
                break
        return ticks

    # ------------------------------------------------------------------ status

    def status(self) -> list[StatusRow]:
        """Per instance and region: newest recovery point and the age of its data (RPO),
        last copy, last restore drill and its RTO."""
        now = self.clock()
        rows: list[StatusRow] = []
        for r in self.site.regions:
            try:
                repo = self.repository(r.name, create=False)
            except RepositoryNotFound:
                continue  # nothing backed up or copied here yet
            try:
                points = repo.points()
            except ObjectNotFound:
                continue
            by_instance: dict[str, list[RecoveryPoint]] = {}
            for p in points:
                by_instance.setdefault(p.instance_id, []).append(p)
            for instance_id, pts in sorted(by_instance.items()):
                newest = pts[-1]
                try:
                    captured = repo.load_manifest(newest.id).taken_at
                except RegionVaultError:
                    captured = newest.created_at
                copies = [p for p in pts if p.lineage is not None]
                drill = self.state.last_drill(r.name, instance_id)
                rows.append(
                    StatusRow(
                        instance_id=instance_id,
                        instance_name=newest.instance_name,
                        region=r.name,
                        role="copy" if copies and len(copies) == len(pts) else "home",
                        newest_point=newest.id,
                        newest_at=newest.created_at,
                        rpo_seconds=(now - captured).total_seconds(),
                        points=len(pts),
                        last_copy_at=copies[-1].created_at if copies else None,
                        newest_issues=newest.issues,
                        last_drill_at=drill.at if drill else None,
                        last_drill_rto=drill.rto_seconds if drill else None,
                        last_drill_healthy=drill.healthy if drill else None,
                    )
                )
        return rows


def run_chains(executor: Executor, chains: Iterable[list[Job]]) -> list[JobOutcome]:
    """Run chains of jobs (such as :func:`~regionvault.core.pipeline.jobs.copy_jobs_for`'s) through
    ``executor``, one step of every chain at a time: a chain goes on only while its jobs
    succeed (a failed or busy step stops it until the next run). Returns every outcome."""
    live = [list(chain) for chain in chains]
    outcomes: list[JobOutcome] = []
    step = 0
    while live:
        current = [chain for chain in live if step < len(chain)]
        if not current:
            break
        results = executor.run([chain[step] for chain in current])
        outcomes.extend(results)
        live = [chain for chain, outcome in zip(current, results, strict=True) if outcome.ok]
        step += 1
    return outcomes
