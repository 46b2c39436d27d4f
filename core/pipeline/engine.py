"""The embedding facade: tag, back up, copy, restore and launch, retain, status, one call
each over a :class:`Site`.

:class:`Engine` does each step now, in this process. The service (core/pipeline/service.py)
runs the same steps as idempotent jobs on an executor, tick after tick; the copy handshake of
those jobs is core/pipeline/copyflow.py. See docs/embedding.md.

Why this module is longer than the others: it is the whole embedding API, a method per step
an embedder calls (backup, copy and its phase halves, restore and launch, retain, sweep,
status), each with the documentation an embedder reads; what each step does beneath it is
the data plane's (core/repository) or a module of its own (launch.py, hooks.py).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import (
    InstanceNotFound,
    ObjectExists,
    ObjectNotFound,
    PolicyError,
    RegionVaultError,
    RepositoryNotFound,
    RetentionLocked,
)
from regionvault.core.interfaces import BlockCapture, BlockSink, FileSink
from regionvault.core.operations import Operations, resolve_operations
from regionvault.core.pipeline import locks as _locks
from regionvault.core.pipeline.acting import current_job
from regionvault.core.pipeline.hooks import HOOK_WORK_DIR, HookRun, remove_stale_runs
from regionvault.core.pipeline.jobs import RUN_TAG, SLOT_TAG, Job, copy_jobs_for, format_slot
from regionvault.core.pipeline.launch import (
    await_healthy,
    check_launchable,
    discard_sink,
    ignored_facts,
    launch_name,
)
from regionvault.core.pipeline.ledger import JobLedger, Ledger
from regionvault.core.pipeline.locks import LockFailed
from regionvault.core.pipeline.objectives import (
    StatusObjectives,
    newest_captured,
    point_instance,
)
from regionvault.core.pipeline.protection import (
    Judgement,
    LedgerFailures,
    ProtectionState,
    judge_copies,
    judge_gone,
    judge_home,
    state_rank,
)
from regionvault.core.pipeline.reports import RestoreResult, RetentionReport, StatusRow
from regionvault.core.pipeline.state import DrillRecord, KeptCapture, KeptCaptures, StateStore
from regionvault.core.pipeline.tagger import TagReport, tag_region
from regionvault.core.plugins import check_executor
from regionvault.core.policy import instance_hooks, resolve_policy
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import (
    CopyProgress,
    CopyReceiver,
    CopyResult,
    CopySender,
    CopyTracker,
    Event,
    EventAction,
    EventResult,
    ProtectReport,
    PruneReport,
    ReleaseReport,
    Repository,
    RepositorySettings,
    RotationReport,
    VerifyReport,
    copy_point,
    current_actor,
    forget_refusal,
)
from regionvault.core.types import (
    CaptureIssue,
    CaptureKind,
    Instance,
    LaunchSpec,
    RecoveryPoint,
    RetentionMode,
    Tags,
)

if TYPE_CHECKING:
    from regionvault.core.repository import ProgressCallback
    from regionvault.core.site import Region, Site

__all__ = [
    "DEFAULT_COPY_GRACE",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_KEPT_PENDING_LIMIT",
    "SLOT_TAG",
    "Engine",
    "PointsView",
]

log = logging.getLogger(__name__)

#: how long a launch may take to become healthy before the restore reports it unhealthy
DEFAULT_HEALTH_TIMEOUT = 60.0
#: a region's own tick offers a point again when no receipt came this long after its offer
DEFAULT_COPY_GRACE = timedelta(hours=1)
#: a kept capture left pending by a run whose liveness nobody here can tell (another host,
#: another pid namespace: a restarted container) is settled once it is this old
DEFAULT_KEPT_PENDING_LIMIT = timedelta(hours=24)

#: compute classes whose ``capture`` predates ``since``/``keep`` (warned about once)
_OLD_CAPTURE_WARNED: set[type] = set()


def _capture_takes_keep(compute: object) -> bool:
    """Whether ``compute.capture`` accepts ``since`` and ``keep`` (a block provider written
    before them does not: it is called the old way, and reads every backup in full)."""
    try:
        params = inspect.signature(compute.capture).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "since" in params and "keep" in params


def _same_run(entry: KeptCapture, point_id: str, run: str) -> bool:
    """Whether a pending kept capture is the one of this run of ``point_id`` (entries of
    earlier versions have no run: the point id alone, as then)."""
    return entry.point_id == point_id and (not entry.run or not run or entry.run == run)


def _made_by(entry: KeptCapture, points: dict[str, RecoveryPoint]) -> bool:
    """Whether ``entry``'s point is committed, and by its own run: a scheduled backup's id
    is the same for every run of its slot, and a capture must never become the base of a
    point that another run made from another capture."""
    point = points.get(entry.point_id)
    if point is None:
        return False
    made = point.tags.get(RUN_TAG)
    return not entry.run or made is None or made == entry.run


def utcnow() -> datetime:
    return datetime.now(UTC)


class PointsView:
    """The recovery points of the site's regions as one listing of each showed them, for
    one planning step (a tick's schedule, its copy planning, one plan job): each region's
    vault is listed once, when first asked about, however many instances ask (and its
    manifests decrypted only when new: :meth:`Repository.points`). Take a new view for each
    step: a point made or forgotten after its region was listed is not seen by this one.
    A listing that fails is not kept: the next question lists again (and fails alike, for
    a damaged manifest, as :meth:`Engine.points` does). Thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._listed: dict[str, dict[str, list[RecoveryPoint]]] = {}

    def points(self, region: str, instance_id: str) -> list[RecoveryPoint]:
        """:meth:`Engine.points` of ``region`` and ``instance_id``, from this view's
        listing of ``region``."""
        name = self._engine.region(region).name
        with self._lock:
            listed = self._listed.get(name)
            if listed is None:
                listed = {}
                for point in self._engine.points(name):
                    listed.setdefault(point.instance_id, []).append(point)
                self._listed[name] = listed
        return list(listed.get(instance_id, ()))

    def by_instance(self, region: str) -> dict[str, list[RecoveryPoint]]:
        """The points of ``region`` by instance id (each oldest first), from this view's
        listing of ``region``."""
        name = self._engine.region(region).name
        with self._lock:
            listed = self._listed.get(name)
            if listed is None:
                listed = {}
                for point in self._engine.points(name):
                    listed.setdefault(point.instance_id, []).append(point)
                self._listed[name] = listed
        return {instance_id: list(points) for instance_id, points in listed.items()}

    def newest_point(self, instance: Instance) -> RecoveryPoint | None:
        """:meth:`Engine.newest_point`, from this view's listing of the home region."""
        points = [p for p in self.points(instance.region, instance.id) if p.lineage is None]
        return points[-1] if points else None


class Engine:
    """The pipeline's steps over a :class:`Site`, one call each.

    >>> engine = Engine(Site.load("site.toml"))              # doctest: +SKIP
    >>> point = engine.backup("vcu-1")                        # doctest: +SKIP
    >>> copy = engine.copy(point.id, to="west").point        # doctest: +SKIP
    >>> result = engine.restore(copy.id, region="west", launch=True)  # doctest: +SKIP

    Ticks are :class:`~regionvault.core.pipeline.service.Service`'s, which reads three of
    these settings: ``workers`` (the threads of its default executor); ``split_copies``
    (a whole-site tick copies through the four phase jobs, each of which needs only one
    region's credentials, instead of one ``copy`` job that needs both); ``copy_grace`` (how
    long a region's own tick waits for a destination's receipt before it offers a point
    again). See docs/jobs.md. ``kept_pending_limit``: how old a kept capture left pending by
    a run nobody here can judge (another host or container) must be before it is settled
    (docs/jobs.md, "Incremental block backups").
    """

    def __init__(
        self,
        site: Site,
        *,
        clock: Callable[[], datetime] = utcnow,
        settings: RepositorySettings | None = None,
        workers: int = 2,
        health_timeout: float | None = None,
        split_copies: bool = False,
        copy_grace: timedelta = DEFAULT_COPY_GRACE,
        kept_pending_limit: timedelta = DEFAULT_KEPT_PENDING_LIMIT,
    ) -> None:
        if copy_grace <= timedelta(0):
            raise RegionVaultError(f"copy_grace must be positive, got {copy_grace}")
        if kept_pending_limit <= timedelta(0):
            raise RegionVaultError(f"kept_pending_limit must be positive, got {kept_pending_limit}")
        self.kept_pending_limit = kept_pending_limit
        self.site = site
        self.split_copies = split_copies
        self.copy_grace = copy_grace
        self.clock = clock
        self.settings = settings
        self.workers = workers
        #: the health timeout of every launch, overriding the site's and the computes'
        self.health_timeout = health_timeout
        self.state = StateStore(site.config.state_dir)
        # hook copies a killed run left (plain text: a database's copy) go before anything runs
        remove_stale_runs(site.config.state_dir / HOOK_WORK_DIR)
        self._repos: dict[str, Repository] = {}
        self._repo_lock = threading.Lock()
        self._hook_problems: list[str] = []
        self._hook_problems_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def region(self, ref: str) -> Region:
        return self.site.region(ref)

    def health_timeout_of(self, region: Region | str) -> float:
        """How long, in seconds, a launch in ``region`` may take to become healthy: the
        engine's ``health_timeout`` when given (``restore --health-timeout``), else
        site.toml's (``[launch.regions."<region>"]``, then ``[launch]``), else what the
        region's compute declares (``Capabilities.launch_health_timeout``: AWS 15 min),
        else :data:`DEFAULT_HEALTH_TIMEOUT`."""
        if self.health_timeout is not None:
            return self.health_timeout
        r = self.region(region) if isinstance(region, str) else region
        configured = self.site.config.launch.health_timeout_of(r.name)
        if configured is not None:
            return configured.total_seconds()
        declared = r.compute.capabilities.launch_health_timeout
        return DEFAULT_HEALTH_TIMEOUT if declared is None else declared

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

    def points(self, region: str, instance_id: str | None = None) -> list[RecoveryPoint]:
        """The recovery points in ``region`` (of ``instance_id``), none when it holds no
        repository yet (which is not created)."""
        try:
            repo = self.repository(region, create=False)
        except RepositoryNotFound:
            return []
        return repo.points(instance_id)

    def points_view(self) -> PointsView:
        """A :class:`PointsView`: one listing per region for a planning step's questions
        about many instances (the scheduler's, the copy flow's), instead of one per
        instance."""
        return PointsView(self)

    def point_at_origin(self, point: RecoveryPoint, region: str) -> RecoveryPoint | None:
        """The point in ``region`` that ``point`` is a copy of (following its lineage back,
        through copies of copies), or None when ``point`` did not come from ``region`` or
        the original is no longer there."""
        current = point
        for _ in range(len(self.site.regions)):
            if current.lineage is None:
                return None
            origin = current.lineage.source_region
            try:
                found = [
                    p for p in self.points(origin) if p.id == current.lineage.source_recovery_point
                ]
            except RegionVaultError:
                return None  # an origin this site no longer has, or cannot read
            if not found:
                return None
            if found[0].region == self.region(region).name:
                return found[0]
            current = found[0]
        return None

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
        where = regions[0].name if region else None
        raise RegionVaultError(self._point_hint(point_id, found, where))

    #: the shortest prefix :meth:`find_point` accepts
    MIN_POINT_PREFIX = 6

    def _point_hint(self, point_id: str, found: list[RecoveryPoint], region: str | None) -> str:
        """Why ``point_id`` names no one point (``found``: what it matched), naming the
        likely mistake: a prefix too short, one that matches several points, or a point of
        another region (with its copy in ``region`` when there is one)."""
        where = f" in {region}" if region else ""
        if found:
            listed = ", ".join(f"{p.id[:12]} ({p.region})" for p in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            return (
                f"recovery point {point_id!r} is ambiguous{where}: it matches "
                f"{len(found)} points: {listed}{more}; give more characters"
            )
        # nothing matched where it was looked for: look everywhere, any prefix length
        everywhere: list[RecoveryPoint] = []
        for r in self.site.regions:
            try:
                everywhere.extend(p for p in self.points(r.name) if p.id.startswith(point_id))
            except RegionVaultError:
                continue
        if len(point_id) < self.MIN_POINT_PREFIX and point_id and everywhere:
            return (
                f"recovery point prefix {point_id!r} is too short: give at least "
                f"{self.MIN_POINT_PREFIX} characters (it begins {len(everywhere)} point "
                f"id{'' if len(everywhere) == 1 else 's'})"
            )
        elsewhere = [p for p in everywhere if region is not None and p.region != region]
        if len(elsewhere) == 1 and region is not None:
            other = elsewhere[0]
            copies = [
                p
                for p in self.points(region)
                if p.lineage is not None and p.lineage.source_recovery_point == other.id
            ]
            if copies:
                return (
                    f"no recovery point {point_id!r} in {region}: this is a point of "
                    f"{other.region}; its copy in {region} is {copies[0].id[:12]}"
                )
            origin = self.point_at_origin(other, region)
            if origin is not None:
                return (
                    f"no recovery point {point_id!r} in {region}: this is a copy in "
                    f"{other.region} of {origin.id[:12]}, which {region} holds"
                )
            return (
                f"no recovery point {point_id!r} in {region}: this is a point of "
                f"{other.region}, and {region} holds no copy of it (name "
                f"{other.region} as its region, or copy it to {region} first)"
            )
        return f"no recovery point {point_id!r}{where}"

    def _hook(self, name: str, **kwargs: Any) -> Any:
        return getattr(self.site.plugin_manager.hook, name)(**kwargs)

    def notify(self, name: str, about: str, **kwargs: Any) -> None:
        """Call the plugin hook ``name`` about work that is done and cannot be undone (a
        point committed, a copy committed, an instance launched): a hook that raises does not
        turn that work into a failure (its job would fail for good, since the work is there
        and never runs again). The error is logged and kept for :meth:`take_hook_problems`,
        which the service makes problems of its tick."""
        try:
            getattr(self.site.plugin_manager.hook, name)(**kwargs)
        except Exception as exc:
            log.exception("%s hook failed for %s", name, about)
            with self._hook_problems_lock:
                self._hook_problems.append(
                    f"{name} hook failed for {about}: {type(exc).__name__}: {exc}"
                )

    def add_hook_problems(self, problems: Iterable[str]) -> None:
        """Hook failures met elsewhere on this engine's behalf (a distributed executor's
        workers), reported with the next :meth:`take_hook_problems`."""
        with self._hook_problems_lock:
            self._hook_problems.extend(problems)

    def take_hook_problems(self) -> list[str]:
        """The :meth:`notify` hook failures since the last call, oldest first (and forgets
        them)."""
        with self._hook_problems_lock:
            taken, self._hook_problems = self._hook_problems, []
        return taken

    # ------------------------------------------------------------------ tag

    def tag(self, region: str) -> TagReport:
        """Give the untagged instances of ``region`` the site's default policy tag."""
        return tag_region(self.region(region).compute, self.site.config)

    # ------------------------------------------------------------------ backup

    def operations(self, instance: Instance, *, keys: Collection[str] | None = None) -> Operations:
        """The instance's drill interval, RPO/RTO objectives, lock and hold
        (core/operations.py): its tags, else its named policy's ``[operations.<name>]``, else
        the site's ``[operations]``. :class:`PolicyError` names a bad value; an instance whose
        policy tag is bad takes the site's table only. ``keys``: only those settings
        (:func:`~regionvault.core.operations.resolve_operations`)."""
        try:
            policy = resolve_policy(instance, self.site.config)
        except PolicyError:
            policy = None
        return resolve_operations(
            instance,
            self.site.config.operations,
            policy_name=policy.name if policy is not None else None,
            keys=keys,
        )

    def newest_point(self, instance: Instance) -> RecoveryPoint | None:
        """The instance's newest recovery point in its home region (copies excluded)."""
        points = [p for p in self.points(instance.region, instance.id) if p.lineage is None]
        return points[-1] if points else None

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

        A committed point, and a failed backup, are recorded in the home region's event log
        (:meth:`record_event`); a run that finds its slot's point already there records
        nothing (it did nothing).
        """
        inst = (
            instance
            if isinstance(instance, Instance)
            else self.site.find_instance(instance, region=region)
        )
        try:
            return self._backup(inst, slot=slot, progress=progress)
        except Exception as exc:
            self.record_event(inst.region, EventAction.BACKUP, inst, exc)
            raise

    def _backup(
        self, inst: Instance, *, slot: datetime | None, progress: ProgressCallback | None
    ) -> RecoveryPoint:
        home = self.region(inst.region)
        policy = resolve_policy(inst, self.site.config)
        repo = self.repository(home.name)
        tags = dict(inst.tags)
        # the lock rule the point is taken under, kept in its tags (copies carry it)
        tags.pop(_locks.RULE_TAG, None)
        rule = _locks.rule_tag(self.operations, inst)
        if rule is not None:
            tags[_locks.RULE_TAG] = rule
        # a compute that captures blocks may keep its captures for the next backup; one of
        # files is called as before (providers written before since/keep still work)
        blocks = CaptureKind.BLOCKS in home.compute.capabilities.capture_kinds
        kept = blocks and self.state.has_kept(home.name, inst.id)
        # the instance's points, listed only when a slot or kept captures need them, and
        # tolerantly: a damaged manifest (of any instance) must not stop every backup
        points = (
            {p.id: p for p in repo.points(inst.id, tolerant=True)}
            if slot is not None or kept
            else {}
        )
        slot_text: str | None = None
        if slot is not None:
            slot_text = format_slot(slot)
            for point in points.values():
                if point.lineage is None and point.tags.get(SLOT_TAG) == slot_text:
                    self.apply_policy_lock(repo, point)  # a run killed before it
                    return point
            tags[SLOT_TAG] = slot_text
        since, base = self._kept_base(home, inst.id, points) if kept else (None, None)
        now = self.clock()
        expires = now + policy.retention if policy is not None else None
        hooks = HookRun(
            instance_hooks(inst, self.site.config),
            self.site.config.hooks,
            inst,
            region=home.name,
            work_root=self.site.config.state_dir / HOOK_WORK_DIR,
        )
        # a scheduled backup's id is fixed by its slot: of two runs that both reach the
        # commit (one paused past its lock), the vault's if-absent put admits one
        point_id = (
            repo.new_point_id() if slot_text is None else repo.slot_point_id(inst.id, slot_text)
        )
        run = secrets.token_hex(8)
        kept_ref: str | None = None
        intent = False
        self._hook("regionvault_before_capture", region=home.name, instance=inst)
        try:
            with hooks:
                # the site's hooks nest inside the plugins' before/after_capture: their
                # befores run after the plugins', their afters before the plugins'
                # (docs/hooks.md)
                hooks.before()
                if blocks and _capture_takes_keep(home.compute):
                    # an intent, recorded before the provider makes any snapshot: a run
                    # killed while it does is still on record (docs/jobs.md)
                    self._keep_pending(home.name, inst.id, None, point_id, run)
                    intent = True
                    if slot_text is not None:
                        tags[RUN_TAG] = run
                    capture = home.compute.capture(inst.id, since=since, keep=True)
                else:
                    if blocks:
                        self._warn_old_capture(home)
                    capture = home.compute.capture(inst.id)
                error: BaseException | None = None
                try:
                    if intent:
                        # recorded before anything is read: a run killed from here on
                        # leaves it pending, for the next backup or tick to release
                        ref = capture.ref if isinstance(capture, BlockCapture) else None
                        self._keep_ref(home.name, inst.id, point_id, ref, run)
                        kept_ref = ref
                    hooks.captured(capture)
                    point = repo.backup(
                        hooks.wrap(capture),
                        instance=replace(inst, tags=Tags(tags)),
                        policy=policy.spec if policy is not None else None,
                        expires_at=expires,
                        progress=progress,
                        before_commit=hooks.before_commit,
                        base=base,
                        point_id=point_id,
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
        except ObjectExists as exc:
            if intent:
                self._drop_kept(home, inst.id, point_id, kept_ref, run)
            if slot_text is None or not exc.name.endswith(point_id):
                raise
            # another run of this slot committed first (this one was paused past its lock):
            # its point stands, ours is not made; what we stored is garbage for prune
            log.warning(
                "%s: backup of %s for slot %s: point %s was committed by another run; this "
                "run's data is left for prune",
                home.name,
                inst.id,
                slot_text,
                point_id,
            )
            return repo.load_manifest(point_id).point
        except BaseException:
            if intent:
                self._drop_kept(home, inst.id, point_id, kept_ref, run)
            raise
        if kept_ref is not None:
            try:
                self._keep_current(home, inst.id, kept_ref, point_id)
            except Exception as exc:  # the point is committed; its pending record says so
                log.warning(
                    "%s: point %s of %s committed, its kept capture not recorded as current "
                    "yet (the next backup or tick settles it): %s",
                    home.name,
                    point_id,
                    inst.id,
                    exc,
                )
        self.record_event(
            home.name,
            EventAction.BACKUP,
            point,
            bytes=point.size,
            issues=point.issues,
            policy=point.policy,
            slot=slot_text,
        )
        # data first: the point is committed; its policy's lock now (docs/policies.md)
        lock_failed: LockFailed | None = None
        try:
            self.apply_policy_lock(repo, point)
        except LockFailed as exc:
            lock_failed = exc
        self.notify(
            "regionvault_after_backup",
            f"recovery point {point.id} of {inst.id} in {home.name}",
            region=home.name,
            recovery_point=point,
        )
        if lock_failed is not None:
            raise lock_failed
        return point

    # -- kept captures: incremental block backups (docs/jobs.md) ---------------------------

    def _kept_base(
        self, home: Region, instance_id: str, points: dict[str, RecoveryPoint]
    ) -> tuple[str | None, str | None]:
        """``(since, base)`` for the instance's next capture: the current kept capture's
        ref and the point made from it, when that point is still there and unexpired (else
        none: the image is read in full). Tidies first: what crashed runs left pending."""
        if not self.state.has_kept(home.name, instance_id):
            return None, None
        self._tidy_kept(home, instance_id, points)
        with self.state.kept_captures(home.name, instance_id) as kept:
            current = kept.current
        if current is None:
            return None, None
        point = points.get(current.point_id)
        if point is None or point.lineage is not None:
            return None, None
        if point.expires_at is not None and point.expires_at <= self.clock():
            return None, None  # retention may forget it while this backup runs
        return current.ref, current.point_id

    def _warn_old_capture(self, home: Region) -> None:
        compute_type = type(home.compute)
        if compute_type not in _OLD_CAPTURE_WARNED:
            _OLD_CAPTURE_WARNED.add(compute_type)
            log.warning(
                "%s: compute %s.%s captures blocks but its capture() takes no since/keep "
                "(written before them): every backup of its instances is read in full",
                home.name,
                compute_type.__module__,
                compute_type.__qualname__,
            )

    def _keep_pending(
        self, region: str, instance_id: str, ref: str | None, point_id: str, run: str = ""
    ) -> None:
        owner = ProcessIdentity.current().token()
        with self.state.kept_captures(region, instance_id) as kept:
            kept.pending.append(KeptCapture(ref, point_id, owner, at=time.time(), run=run))

    def _keep_ref(
        self, region: str, instance_id: str, point_id: str, ref: str | None, run: str = ""
    ) -> None:
        """The capture of ``point_id`` returned: its intent gets the provider's ``ref``, or
        goes when the provider kept nothing. Only this run's intent (``run``): another run of
        the same slot has the same point id."""
        with self.state.kept_captures(region, instance_id) as kept:
            kept.pending = [
                replace(p, ref=ref) if _same_run(p, point_id, run) else p
                for p in kept.pending
                if ref is not None or not _same_run(p, point_id, run)
            ]

    def _keep_current(self, home: Region, instance_id: str, ref: str, point_id: str) -> None:
        """The point is committed: its capture is the one the next backup is taken since,
        and the one before it is released. When a tick settled it already (it saw the
        point committed), that stands."""
        with self.state.kept_captures(home.name, instance_id) as kept:
            if not any(p.ref == ref for p in kept.pending):
                return
            kept.pending = [p for p in kept.pending if p.ref != ref]
            if kept.current is not None and kept.current.ref != ref:
                self._to_release(kept, kept.current.ref)
            kept.current = KeptCapture(ref, point_id)
            todo = list(kept.release)
        self._release_kept(home, instance_id, todo)

    @staticmethod
    def _to_release(kept: KeptCaptures, ref: str | None) -> None:
        if ref is not None and ref not in kept.release:
            kept.release.append(ref)

    def _drop_kept(
        self, home: Region, instance_id: str, point_id: str, ref: str | None, run: str = ""
    ) -> None:
        """The backup failed: its own kept capture (or intent) goes and is released (the
        current one stays). A failure here is logged, not raised: the backup's own error is
        the one to see."""
        try:
            with self.state.kept_captures(home.name, instance_id) as kept:
                kept.pending = [p for p in kept.pending if not _same_run(p, point_id, run)]
                self._to_release(kept, ref)
        except Exception as exc:
            log.warning(
                "%s: failed backup of %s: its kept capture: %s", home.name, instance_id, exc
            )
        if ref is not None:
            self._release_kept(home, instance_id, [ref])

    def _tidy_kept(self, home: Region, instance_id: str, points: dict[str, RecoveryPoint]) -> None:
        """Settle what runs left pending (``points``: the instance's points now, by id).

        An entry whose point was committed becomes current if it is newer than the current
        one (its run, if alive, has only that step left), else it is released. Of the others:
        a run that is gone has its capture released; a run still alive is left alone; a run
        nobody here can judge (another host, another pid namespace) is left alone until its
        entry is ``kept_pending_limit`` old, then treated as gone. An intent that never got
        a ref (a run stopped while its provider made snapshots) is dropped with a warning:
        what the provider made then is not tracked (docs/jobs.md)."""
        now = time.time()
        limit = self.kept_pending_limit.total_seconds()
        with self.state.kept_captures(home.name, instance_id) as kept:
            committed: list[KeptCapture] = []
            waiting: list[KeptCapture] = []
            for entry in kept.pending:
                if not _made_by(entry, points):
                    owner = ProcessIdentity.from_token(entry.owner) if entry.owner else None
                    alive = owner.alive() if owner is not None else None
                    if alive is True:
                        waiting.append(entry)
                        continue
                    if alive is None:
                        if not entry.at:  # recorded before entries had a time: from now
                            waiting.append(replace(entry, at=now))
                            continue
                        if now - entry.at < limit:
                            waiting.append(entry)
                            continue
                if _made_by(entry, points):
                    if entry.ref is not None:
                        committed.append(entry)
                elif entry.ref is None:
                    self._warn_lost_intent(home, instance_id, entry)
                else:
                    self._to_release(kept, entry.ref)
            kept.pending = waiting
            committed.sort(key=lambda e: points[e.point_id].created_at)
            for entry in committed:
                current = kept.current
                if (
                    current is None
                    or current.point_id not in points
                    or points[current.point_id].created_at < points[entry.point_id].created_at
                ):
                    if current is not None:
                        self._to_release(kept, current.ref)
                    kept.current = KeptCapture(entry.ref, entry.point_id)
                else:
                    self._to_release(kept, entry.ref)
            todo = list(kept.release)
        self._release_kept(home, instance_id, todo)

    def _warn_lost_intent(self, home: Region, instance_id: str, entry: KeptCapture) -> None:
        started = datetime.fromtimestamp(entry.at, UTC).isoformat() if entry.at else "unknown"
        log.warning(
            "%s: a backup of %s (point %s, started %s, run %s) stopped while its provider "
            "was capturing: snapshots it made then are not tracked by regionvault; delete "
            "those the provider tagged with the instance from that time (docs/jobs.md, "
            "'Incremental block backups')",
            home.name,
            instance_id,
            entry.point_id,
            started,
            entry.owner or "unknown",
        )

    def _retire_current(
        self,
        home: Region,
        instance_id: str,
        seen: KeptCapture,
        points: dict[str, RecoveryPoint],
        instances: Callable[[], dict[str, Instance]],
    ) -> None:
        """Release the current kept capture ``seen`` (read before ``points`` was listed)
        when no backup will be taken since it: its point is gone or expired, or the
        instance is gone or opted out."""
        point = points.get(seen.point_id)
        why = None
        if point is None:
            why = f"its point {seen.point_id} is gone"
        elif point.expires_at is not None and point.expires_at <= self.clock():
            why = f"its point {seen.point_id} expired"
        else:
            try:
                why = self._not_backed_up(home, instance_id, instances)
            except Exception as exc:  # a compute that cannot list now: asked again next tick
                log.warning(
                    "%s: kept capture of %s: cannot tell whether it is still backed up: %s",
                    home.name,
                    instance_id,
                    exc,
                )
                return
        if why is None:
            return
        with self.state.kept_captures(home.name, instance_id) as kept:
            if kept.current is None or kept.current.ref != seen.ref:
                return  # a backup made another current meanwhile
            self._to_release(kept, seen.ref)
            kept.current = None
            todo = list(kept.release)
        log.info("%s: kept capture of %s released: %s", home.name, instance_id, why)
        self._release_kept(home, instance_id, todo)

    def _not_backed_up(
        self, home: Region, instance_id: str, instances: Callable[[], dict[str, Instance]]
    ) -> str | None:
        """Why ``instance_id`` gets no more backups (gone, opted out), or None."""
        inst = instances().get(instance_id)
        if inst is None:
            try:  # not listed: a listing may lag behind; asked by id to be sure
                inst = home.compute.get_instance(instance_id)
            except InstanceNotFound:
                return "the instance is gone"
        try:
            policy = resolve_policy(inst, self.site.config)
        except PolicyError:
            return None  # a bad tag is the tagger's to report; its capture waits
        return None if policy is not None else "the instance opted out of backups"

    def _release_kept(self, home: Region, instance_id: str, refs: list[str]) -> None:
        for ref in refs:
            try:
                home.compute.release_capture(ref)
                with self.state.kept_captures(home.name, instance_id) as kept:
                    kept.release = [r for r in kept.release if r != ref]
                    kept.pending = [p for p in kept.pending if p.ref != ref]
            except Exception as exc:  # kept in the list: the next backup or tick tries again
                log.warning(
                    "%s: kept capture of %s not released yet: %s", home.name, instance_id, exc
                )

    def release_kept_captures(self, region: str) -> int:
        """Settle the kept captures of ``region``'s instances (each tick's retention calls
        this): what runs killed midway left pending is released, or made current when its
        point was committed; a current capture no backup will be taken since (its point gone
        or expired, the instance gone or opted out) is released. The region's manifests are
        listed once, and only when some instance has kept captures. Returns how many refs
        remain to release (their release failed)."""
        r = self.region(region)
        seen: dict[str, KeptCaptures] = {}
        for instance_id in self.state.kept_instances(r.name):
            with self.state.kept_captures(r.name, instance_id) as kept:
                if not kept.empty():
                    seen[instance_id] = replace(kept, pending=list(kept.pending))
        if not seen:
            return 0
        try:
            repo = self.repository(r.name, create=False)
            points = {p.id: p for p in repo.points(tolerant=True)}
        except RepositoryNotFound:
            points = {}
        except RegionVaultError as exc:
            log.warning("%s: kept captures not settled: %s", r.name, exc)
            return sum(len(k.release) for k in seen.values())
        listed: dict[str, Instance] | None = None

        def instances() -> dict[str, Instance]:
            nonlocal listed
            if listed is None:  # listed once, when some current capture's point is there
                listed = {i.id: i for i in r.compute.list_instances()}
            return listed

        left = 0
        for instance_id, before in seen.items():
            try:
                self._tidy_kept(r, instance_id, points)
                if before.current is not None:
                    self._retire_current(r, instance_id, before.current, points, instances)
            except RegionVaultError as exc:
                log.warning("%s: kept captures of %s not settled: %s", r.name, instance_id, exc)
            with self.state.kept_captures(r.name, instance_id) as kept:
                left += len(kept.release)
        return left

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
        home = self.point_at_origin(point, dst.name)
        if home is not None:
            # a copy going back where it came from: the original is the answer, not a third
            return CopyResult(home, 0, 0, 0, 0, existing=True)
        try:
            result = copy_point(
                source=self.repository(src.name, create=False),
                destination=self.repository(dst.name),
                forward=self.site.transit(src.name, dst.name),
                backward=self.site.transit(dst.name, src.name),
                seal_to_destination=dst.sealer(),
                seal_to_source=src.sealer(),
                point_id=point.id,
                expires_at=self.copy_expiry(point, dst.name, retention),
                progress=progress,
            )
        except Exception as exc:
            for where, role in ((dst.name, "destination"), (src.name, "source")):
                self.record_event(
                    where, EventAction.COPY, point, exc, role=role, source=src.name,
                    destination=dst.name,
                )  # fmt: skip
            raise
        if not result.existing:
            self._record_copy(src.name, dst.name, point, result)
            self.notify(
                "regionvault_after_copy",
                f"the copy of {point.id} from {src.name} to {dst.name}",
                source_region=src.name,
                region=dst.name,
                source=point,
                copy=result.point,
                result=result,
            )
        # the copy carries its own lock, from its own commit (docs/policies.md); data first:
        # the copy is committed and recorded whatever the lock does
        self.apply_policy_lock(self.repository(dst.name), result.point)
        return result

    def _record_copy(
        self, source: str, destination: str, point: RecoveryPoint, result: CopyResult
    ) -> None:
        """A committed copy's events: the destination's (about the copy) and the
        source's (about the point that was copied)."""
        moved: dict[str, Any] = {
            "source": source,
            "destination": destination,
            "bytes_forward": result.bytes_forward,
            "bytes_backward": result.bytes_backward,
            "chunks_total": result.chunks_total,
            "chunks_sent": result.chunks_sent,
        }
        self.record_event(
            destination,
            EventAction.COPY,
            result.point,
            role="destination",
            source_point=point.id,
            **moved,
        )
        self.record_event(
            source, EventAction.COPY, point, role="source", copy_point=result.point.id, **moved
        )

    def copy_expiry(
        self, point: RecoveryPoint, destination: str, retention: timedelta | None = None
    ) -> datetime | None:
        """When a copy of ``point`` in ``destination`` expires: ``retention`` from now when
        given; else the point's instance's copy retention for ``destination`` (from the
        point's creation); else when ``point`` itself expires."""
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
            expires_at=self.copy_expiry(point, dst.name, retention),
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
        tags: Mapping[str, str] | None = None,
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

        ``tags``: the launched instance's tags, instead of the point's (a scheduled drill's
        marks: core/pipeline/drills.py).

        The restore (its launch, health and RTO included), or its failure, is recorded in
        ``region``'s event log (:meth:`record_event`).
        """
        paths = None if paths is None else list(paths)  # read twice: restore, then event
        try:
            result = self._restore(
                point_id, region=region, target=target, paths=paths, launch=launch,
                name=name, progress=progress, sync=sync, tags=tags,
            )  # fmt: skip
        except Exception as exc:
            subject = (point_id, None)
            self.record_event(region, EventAction.RESTORE, subject, exc, launch=launch)
            raise
        rto = result.seconds_to_healthy
        self.record_event(
            result.region,
            EventAction.RESTORE,
            result.point,
            launch=launch,
            launched=result.instance.id if result.instance is not None else None,
            healthy=result.healthy if launch else None,
            rto_ms=None if rto is None else round(rto * 1000),
            restore_ms=round(result.seconds_to_restore * 1000),
            paths=sorted(paths) if paths is not None else None,
            not_carried=list(result.not_carried) or None,
        )
        return result

    def _restore(
        self,
        point_id: str,
        *,
        region: str,
        target: Path | str | None,
        paths: Iterable[str] | None,
        launch: bool,
        name: str | None,
        progress: ProgressCallback | None,
        sync: bool,
        tags: Mapping[str, str] | None = None,
    ) -> RestoreResult:
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
        check_launchable(r, point)
        manifest = repo.load_manifest(point.id)
        spec = LaunchSpec(
            name=launch_name(r, point, name),
            tags=Tags(tags)
            if tags is not None
            else point.tags.without([SLOT_TAG, RUN_TAG, _locks.RULE_TAG]),
            function=point.function,
            extra={"source_point": point.id, "source_instance": point.instance_id},
            launch_facts=manifest.launch,
        )
        # a block image's disks, so that the sink makes one disk each: passed only when
        # the manifest records them (several, or one not spanning the image), so that a
        # provider written before disks= still restores the points it always could
        layout: dict[str, Any] = {"disks": manifest.disks} if manifest.odd_disks else {}
        sink = r.compute.open_restore_sink(spec, point.kind, size=manifest.image_size, **layout)
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
            discard_sink(r, sink, exc)
            raise
        not_carried = instance.not_carried + ignored_facts(r, manifest.launch, point)
        if not_carried:  # names what was left out, never a value (user data may be secret)
            log.warning(
                "instance %s launched in %s from %s lacks what was not carried over: %s",
                instance.id, r.name, point.id, "; ".join(not_carried),
            )  # fmt: skip
        rto, health_error = await_healthy(
            r,
            instance,
            started,
            timeout=self.health_timeout_of(r),
            plugin_manager=self.site.plugin_manager,
        )
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
        self.notify(
            "regionvault_after_launch",
            f"instance {instance.id} launched in {r.name} from {point.id}",
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
            not_carried=not_carried,
        )

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
        data. WORM locks and legal holds win: a protected point stays, and is reported.

        Each point forgotten (or refused by its lock), the prune and the retention run
        itself are recorded in ``region``'s event log (:meth:`record_event`)."""
        name = self.region(region).name
        try:
            report = self._retain(name)
        except Exception as exc:
            self.record_event(name, EventAction.RETENTION, None, exc)
            raise
        self.record_event(
            name,
            EventAction.RETENTION,
            None,
            forgotten=len(report.forgotten),
            protected=len(report.protected),
            # (the first 32 of each: every point has its own forget event besides)
            forgotten_points=report.forgotten,
            protected_points=report.protected,
        )
        return report

    def _retain(self, region: str) -> RetentionReport:
        r = self.region(region)
        report = RetentionReport(r.name)
        self.release_kept_captures(r.name)
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
                self.record_event(r.name, EventAction.FORGET, point, expired=True)
            except RetentionLocked as exc:
                report.protected.append(point.id)
                self.record_event(r.name, EventAction.FORGET, point, exc, expired=True)
            except ObjectNotFound:
                continue  # another runner forgot it meanwhile
        if report.forgotten:
            # what a region's own tick kept about copies of the forgotten points goes too
            try:
                CopyTracker(repo).tidy({p.id for p in repo.points()})
            except RegionVaultError as exc:
                log.warning("%s: tidying copy receipts failed: %s", r.name, exc)
            pruned = self.prune(r.name)
            report.prune = {
                "packs_deleted": pruned.packs_deleted,
                "packs_rewritten": pruned.packs_rewritten,
                "bytes_freed": pruned.bytes_freed,
                "skipped": [str(p) for p in pruned.skipped],
            }
        return report

    def retention_forecast(self, region: str) -> RetentionReport:
        """What :meth:`retain` would do in ``region`` now, doing nothing: the expired points
        it would forget, and those a WORM lock or legal hold would keep (``protected``).
        Nothing is written, recorded or pruned (``prune`` stays empty: ask
        :func:`~regionvault.core.repository.forecast_prune` after forgetting)."""
        name = self.region(region).name
        report = RetentionReport(name)
        try:
            repo = self.repository(name, create=False)
        except RepositoryNotFound:
            return report
        now = self.clock()
        for point in repo.points():
            if point.expires_at is None or point.expires_at > now:
                continue
            try:
                # a lock is judged as Repository.forget judges it: by the real time
                refusal = forget_refusal(repo, point.id)
            except ObjectNotFound:
                continue  # forgotten meanwhile
            (report.forgotten if refusal is None else report.protected).append(point.id)
        return report

    def rotate_keys(
        self, region: str, progress: Callable[[int, int], None] | None = None
    ) -> RotationReport:
        """Make a new master key of ``region``'s KeyService current and re-wrap its
        repository under it, without rewriting packs, so the old key can then be disabled
        (:meth:`Repository.rotate_keys`). Raises :class:`RepositoryNotFound` when the
        region holds no repository: there is nothing to re-wrap, and no key is rotated."""
        name = self.region(region).name
        repo = self.repository(name, create=False)
        with self.logged(name, EventAction.ROTATE_KEYS) as done:
            report = repo.rotate_keys(progress)
            done.update(
                old_key=report.old_key_id,
                new_key=report.new_key_id,
                generation=report.generation,
                runs=report.runs,
                resumed=report.resumed,
            )
        return report

    def forget(self, region: str, point_ids: Iterable[str]) -> list[str]:
        """Forget these recovery points in ``region`` (:meth:`Repository.forget`: all or
        none; :class:`RetentionLocked` when a WORM lock or legal hold keeps one), recording
        each in the event log: forgotten, or refused with why."""
        name = self.region(region).name
        ids = list(point_ids)
        try:
            forgotten = self.repository(name, create=False).forget(ids)
        except Exception as exc:
            for point_id in ids:
                self.record_event(name, EventAction.FORGET, (point_id, None), exc)
            raise
        for point_id in forgotten:
            self.record_event(name, EventAction.FORGET, (point_id, None))
        return forgotten

    def prune(self, region: str, progress: ProgressCallback | None = None) -> PruneReport:
        """Prune ``region``'s repository (:meth:`Repository.prune`; never creates one), and
        record it, or its failure, in the event log."""
        name = self.region(region).name
        with self.logged(name, EventAction.PRUNE) as done:
            report = self.repository(name, create=False).prune(progress=progress)
            done.update(
                packs_deleted=report.packs_deleted,
                packs_rewritten=report.packs_rewritten,
                bytes_freed=report.bytes_freed,
                skipped=len(report.skipped),
            )
        return report

    def verify(
        self,
        region: str,
        *,
        read_data: bool = False,
        repair: bool = False,
        progress: ProgressCallback | None = None,
    ) -> VerifyReport:
        """Verify ``region``'s repository (:meth:`Repository.verify`; never creates one),
        and record the result in the event log: ``ok`` when clean, ``failed`` with the
        number of problems (and the first) otherwise; ``audit`` reads the newest."""
        name = self.region(region).name
        try:
            report = self.repository(name, create=False).verify(
                read_data=read_data, progress=progress, repair=repair
            )
        except Exception as exc:
            self.record_event(name, EventAction.VERIFY, None, exc, read_data=read_data)
            raise
        problems = len(report.errors)
        verdict = (
            EventResult.OK if report.ok else f"{problems} problem(s), the first: {report.errors[0]}"
        )
        self.record_event(
            name,
            EventAction.VERIFY,
            None,
            verdict,
            read_data=read_data,
            repair=repair,
            problems=problems,
            warnings=len(report.warnings),
            repaired=len(report.repaired),
            points=report.points,
            packs=report.packs,
            events=report.events,
        )
        return report

    # ------------------------------------------------------------------ event log

    # ------------------------------------------------------------------ locks and holds

    def apply_policy_lock(self, repo: Repository, point: RecoveryPoint) -> ProtectReport | None:
        """Put on ``point`` the WORM lock and legal hold its policy asks
        (core/pipeline/locks.py), recording a ``lock`` event when anything changed or it
        failed. :class:`LockFailed` when they cannot be applied."""
        try:
            report = _locks.apply_policy_lock(repo, point)
        except LockFailed as exc:
            self.record_event(repo.region, EventAction.LOCK, point, exc, by="policy")
            raise
        if report is not None:
            self.record_event(
                repo.region,
                EventAction.LOCK,
                point,
                by="policy",
                until=report.retain_until.isoformat() if report.retain_until else None,
                legal_hold=report.legal_hold,
                objects=len(report.locked),
            )
        return report

    def lock_point(
        self, point_id: str, until: datetime, mode: RetentionMode, *, region: str | None = None
    ) -> tuple[RecoveryPoint, ProtectReport]:
        """WORM-lock a recovery point until ``until`` (core/pipeline/locks.py
        :func:`~regionvault.core.pipeline.locks.lock_point`: only ever extended), recorded
        in the region's event log, refused or not."""
        point = self.find_point(point_id, region)
        repo = self.repository(point.region, create=False)
        detail = {"until": until.isoformat(), "mode": mode.value}
        with self.logged(point.region, EventAction.LOCK, point, **detail) as done:
            report = _locks.lock_point(repo, point.id, until, mode)
            done["objects"] = len(report.locked)
        return point, report

    def hold_point(
        self, point_id: str, *, region: str | None = None
    ) -> tuple[RecoveryPoint, ProtectReport]:
        """Place a legal hold on a recovery point, recorded in the region's event log."""
        point = self.find_point(point_id, region)
        repo = self.repository(point.region, create=False)
        with self.logged(point.region, EventAction.HOLD, point) as done:
            report = _locks.hold_point(repo, point.id)
            done["objects"] = len(report.locked)
        return point, report

    def release_point(
        self, point_id: str, *, region: str | None = None, bypass_governance: bool = False
    ) -> tuple[RecoveryPoint, ReleaseReport]:
        """Lift a recovery point's legal hold (and with ``bypass_governance`` its governance
        lock), recorded in the region's event log, refused or not."""
        point = self.find_point(point_id, region)
        repo = self.repository(point.region, create=False)
        bypass = {"bypass_governance": bypass_governance}
        with self.logged(point.region, EventAction.RELEASE, point, **bypass) as done:
            report = _locks.release_point(repo, point.id, bypass_governance=bypass_governance)
            done.update(released=len(report.released), kept=len(report.kept))
        return point, report

    @contextlib.contextmanager
    def logged(
        self,
        region: str,
        action: str,
        subject: RecoveryPoint | Instance | tuple[str | None, str | None] | None = None,
        **detail: Any,
    ) -> Iterator[dict[str, Any]]:
        """Record the operation the block runs in ``region``'s event log
        (:meth:`record_event`): its failure, with ``detail``, then raised as it was; or its
        success, with ``detail`` and what the block put into the dict it is given."""
        done: dict[str, Any] = {}
        try:
            yield done
        except Exception as exc:
            self.record_event(region, action, subject, exc, **detail)
            raise
        self.record_event(region, action, subject, **detail, **done)

    def record_event(
        self,
        region: str,
        action: str,
        subject: RecoveryPoint | Instance | tuple[str | None, str | None] | None = None,
        result: str | BaseException = EventResult.OK,
        **detail: Any,
    ) -> Event | None:
        """Append an event to ``region``'s event log (docs/format.md section 17): who (this
        user, host and process, and the job running, if any), ``action``
        (:class:`EventAction`), the subject (a point, an instance, or ``(point id,
        instance id)``), the result and ``detail`` (small values: counts, sizes, ids).

        ``result``: ``"ok"``; an exception (a :class:`RetentionLocked` is ``refused``,
        anything else ``failed``, its message the error); or another text, the error of a
        ``failed`` result. This never fails the operation it records: an event that cannot
        be written is logged and becomes a hook problem (:meth:`take_hook_problems`), and
        ``audit`` reports the gap where it can tell. Returns the event, or None when it was
        not written (also when ``region`` holds no repository yet: nothing to log into)."""
        point_id, instance_id = _subject(subject)
        status, error = _result(result)
        try:
            repo = self.repository(region, create=False)
        except RepositoryNotFound:
            log.info("%s: no repository yet: %s event not recorded", region, action)
            return None
        except Exception as exc:
            if status == EventResult.OK:
                self._event_not_recorded(region, action, exc)
            else:  # the vault the operation failed on: its own error says so already
                log.info("%s: %s event not recorded: %s", region, action, exc)
            return None
        try:
            return repo.record_event(
                action,
                at=self.clock(),
                who=current_actor(current_job()),
                point=point_id,
                instance=instance_id,
                result=status,
                error=error,
                detail=detail,
            )
        except Exception as exc:
            self._event_not_recorded(region, action, exc)
        return None

    def _event_not_recorded(self, region: str, action: str, exc: Exception) -> None:
        log.warning("%s: %s event not recorded: %s", region, action, exc)
        self.add_hook_problems(
            [f"{action} event not recorded in {region}: {type(exc).__name__}: {exc}"]
        )

    # ------------------------------------------------------------------ jobs

    def ledger(self) -> Ledger:
        """The ledger of the site's executor kind (``[executor]``): for ``thread``, the
        files under ``<state_dir>/jobs``, the same ledger docs/jobs.md's workers use, so
        their runs and this engine's see each other's locks and records; for another kind,
        the one its runners share (``ExecutorKind.ledger``)."""
        table = self.site.config.executor
        kind = check_executor(
            table.kind, table.settings, self.site.config.source, self.site.plugin_manager
        )
        if kind is None:  # thread
            return JobLedger(self.site.config.state_dir)
        ledger: Ledger = kind.ledger(self.site)
        return ledger

    # ------------------------------------------------------------------ status

    def status(self) -> list[StatusRow]:
        """Every instance of every region with its protection state, worst first
        (core/pipeline/protection.py): each region's Compute listed once (paged), each
        vault once (:meth:`points_view`). Per instance and region: the state and why, the
        newest recovery point and the age of its data (RPO), last copy, last restore drill
        and its RTO, the RPO and RTO objectives and whether each is met, at risk or breached
        (core/pipeline/objectives.py). Rows for regions holding copies (role ``copy``), and
        for instances gone from their region whose points remain."""
        now = self.clock()
        grace = self.site.config.schedule_interval
        view = self.points_view()
        live: dict[str, dict[str, Instance] | None] = {}
        unlisted: dict[str, str] = {}
        for r in self.site.regions:
            # made outside the guard: a region whose Compute cannot even be built (its
            # provider's SDK missing, bad settings) is the site's error, not an outage
            compute = r.compute
            try:
                live[r.name] = {i.id: i for i in compute.list_instances(page_size=100)}
            except Exception as exc:  # any provider's error: the points still show
                log.warning("status: %s: instances not listed: %s", r.name, exc)
                live[r.name] = None
                unlisted[r.name] = " ".join(f"{type(exc).__name__}: {exc}".split())
        objectives = StatusObjectives(self, now, live=live)
        failures = LedgerFailures(self.ledger, now)
        twice = self._listed_twice(live)
        order = {r.name: i for i, r in enumerate(self.site.regions)}
        rows: list[StatusRow] = []
        try:
            for r in self.site.regions:
                try:
                    held = view.by_instance(r.name)
                except ObjectNotFound:
                    held = {}
                listed = live[r.name] or {}
                for instance_id in sorted(set(listed) | set(held)):
                    row = self._status_row(
                        r.name,
                        listed.get(instance_id),
                        held.get(instance_id, []),
                        now=now,
                        grace=grace,
                        view=view,
                        live=live,
                        unlisted=unlisted.get(r.name),
                        objectives=objectives,
                        failures=failures,
                    )
                    others = (
                        twice.get(instance_id, {}).get(r.name) if instance_id in listed else None
                    )
                    if others:  # the tick backs it up in neither region (pipeline/claims.py)
                        row = replace(
                            row,
                            state=str(ProtectionState.FAILING),
                            state_reason=f"also listed by {', '.join(others)}: not backed up "
                            "by either region",
                        )
                    rows.append(row)
        finally:
            objectives.close()
            failures.close()
        rows.sort(
            key=lambda row: (
                state_rank(row.state),
                order.get(row.region, len(order)),
                row.instance_name,
                row.instance_id,
            )
        )
        return rows

    def _listed_twice(
        self, live: Mapping[str, Mapping[str, Instance] | None]
    ) -> dict[str, dict[str, list[str]]]:
        """The instances two regions that may share instances list (core/pipeline/claims.py),
        for :meth:`status` to show failing as the tick refuses them."""
        from regionvault.core.pipeline.claims import compute_scopes, listed_twice

        site = self.site
        listings = {name: ids for name, ids in live.items() if ids}
        return listed_twice(listings, site.config, compute_scopes(site.config, site.registry))

    def _status_row(
        self,
        region: str,
        instance: Instance | None,
        pts: list[RecoveryPoint],
        *,
        now: datetime,
        grace: timedelta,
        view: PointsView,
        live: Mapping[str, Mapping[str, Instance] | None],
        unlisted: str | None,
        objectives: StatusObjectives,
        failures: LedgerFailures,
    ) -> StatusRow:
        """One row of :meth:`status`: ``instance`` as ``region`` lists it (None: not
        listed) and its points there (``pts``, oldest first by arrival)."""
        cfg = self.site.config
        home_pts = [p for p in pts if p.lineage is None]
        copies = [p for p in pts if p.lineage is not None]
        role = "copy" if instance is None and copies and len(copies) == len(pts) else "home"
        if instance is not None:
            judged = judge_home(
                instance, home_pts, site=cfg, now=now, grace=grace, last_failure=failures
            )
        elif role == "copy":
            judged = self._judge_copies(region, copies, now=now, grace=grace, view=view, live=live)
        elif unlisted is None:
            judged = judge_gone(region, pts)
        else:  # the region's compute did not answer: judged by the tags its points recorded
            recorded = point_instance(pts[-1])
            judged = judge_home(
                recorded, home_pts, site=cfg, now=now, grace=grace, last_failure=failures
            )
            judged = Judgement(judged.state, f"{judged.reason} (instances not listed: {unlisted})")
        if not pts:
            assert instance is not None
            return StatusRow(
                instance_id=instance.id,
                instance_name=instance.name,
                region=region,
                role=role,
                newest_point=None,
                newest_at=None,
                rpo_seconds=None,
                points=0,
                state=str(judged.state),
                state_reason=judged.reason,
            )
        repo = self.repository(region, create=False)
        # the newest data (by capture, not by arrival: a late copy of an old point)
        newest, captured = newest_captured(repo, pts) or (pts[-1], pts[-1].created_at)
        drill = self.state.last_drill(region, newest.instance_id)
        row = StatusRow(
            instance_id=newest.instance_id,
            instance_name=instance.name if instance is not None else newest.instance_name,
            region=region,
            role=role,
            newest_point=newest.id,
            newest_at=newest.created_at,
            rpo_seconds=(now - captured).total_seconds(),
            points=len(pts),
            last_copy_at=copies[-1].created_at if copies else None,
            newest_issues=newest.issues,
            last_drill_at=drill.at if drill else None,
            last_drill_rto=drill.rto_seconds if drill else None,
            last_drill_healthy=drill.healthy if drill else None,
            state=str(judged.state),
            state_reason=judged.reason,
        )
        return objectives.apply(row, newest, captured)

    def _judge_copies(
        self,
        region: str,
        copies: list[RecoveryPoint],
        *,
        now: datetime,
        grace: timedelta,
        view: PointsView,
        live: Mapping[str, Mapping[str, Instance] | None],
    ) -> Judgement:
        """:func:`judge_copies` of an instance ``region`` holds copies of: its home's
        newest backup from ``view`` (not known when the home cannot be read), its policy
        from its live tags at home, else the tags its newest copy recorded; ``gone`` when
        its home lists it no more."""
        recorded = point_instance(copies[-1])
        home_listed = live.get(recorded.region)
        found = home_listed.get(recorded.id) if home_listed is not None else None
        if home_listed is not None and found is None:
            return judge_gone(region, copies, home=recorded.region)
        instance = found if found is not None else recorded
        try:
            home_newest = view.newest_point(instance)
        except Exception as exc:  # the home region's vault: any provider's error
            log.info("status: %s: newest point not read: %s", recorded.region, exc)
            home_newest = None
        try:
            policy = resolve_policy(instance, self.site.config)
            opted_out = policy is None
        except PolicyError:
            policy, opted_out = None, False
        return judge_copies(
            region,
            copies,
            home_newest=home_newest,
            home_policy=policy,
            opted_out=opted_out,
            now=now,
            grace=grace,
        )


def _subject(
    subject: RecoveryPoint | Instance | tuple[str | None, str | None] | None,
) -> tuple[str | None, str | None]:
    """An event's ``(point id, instance id)``."""
    if isinstance(subject, RecoveryPoint):
        return subject.id, subject.instance_id
    if isinstance(subject, Instance):
        return None, subject.id
    if subject is None:
        return None, None
    return subject


def _result(result: str | BaseException) -> tuple[str, str | None]:
    """An event's ``(result, error)``: refused for a lock or hold that said no (a WORM rule
    refused it, nothing changed), failed for any other error, with the error's one line."""
    if isinstance(result, BaseException):
        text = " ".join(f"{type(result).__name__}: {result}".split())
        refused = isinstance(result, RetentionLocked | _locks.LockRefused)
        return (EventResult.REFUSED if refused else EventResult.FAILED), text
    if result in (EventResult.OK, EventResult.REFUSED):
        return result, None
    return EventResult.FAILED, result
