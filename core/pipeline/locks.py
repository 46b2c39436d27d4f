"""Locks by policy: the WORM lock and legal hold an instance's operations settings ask
(``backup-lock``, ``backup-hold``, core/operations.py), put on each recovery point at its
commit and on each copy at the copy's commit, and found again by the next tick when a crash
came between a commit and its lock.

The rule is resolved once, at the backup (the instance's tags, its named policy's
``[operations.<name>]``, the site's ``[operations]``), and recorded in the point's own tags as
``regionvault-lock`` (:data:`RULE_TAG`), which a copy carries: a point keeps the rule it was
taken under, whatever the site says later, and every region reads the same answer with its own
credentials alone (a copy's commit runs in the destination, which cannot ask the source's
compute). A point taken before the tag existed reads its own ``backup-lock`` /
``backup-hold`` tags only: a site table added later never locks it. The lock runs from the
point's commit, as its vault recorded it (the manifest object's time):
``until = committed + duration``, in the rule's mode; a point whose lock would have ended
already needs none.

Data first: a point is committed before it is locked. When the lock cannot be applied (a vault
without the capability, a bad ``backup-lock`` value, a refused call) the point stays and
:class:`LockFailed` is raised after it: the job fails, loudly, every tick, until the policy
or the vault is fixed. See docs/policies.md, "Locks and holds".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from regionvault.core.errors import (
    PolicyError,
    RegionVaultError,
    RepositoryNotFound,
    RetentionLocked,
)
from regionvault.core.operations import (
    HOLD_TAG,
    LOCK_TAG,
    Operations,
    OperationsConfig,
    resolve_operations,
)
from regionvault.core.repository import (
    EventAction,
    EventResult,
    Problem,
    ProtectReport,
    ReleaseReport,
    Repository,
)
from regionvault.core.types import Instance, ObjectInfo, RecoveryPoint, RetentionMode, Tags

__all__ = [
    "RULE_TAG",
    "HealReport",
    "LockFailed",
    "LockRefused",
    "Wanted",
    "apply_policy_lock",
    "carries",
    "describe_protection",
    "heal_locks",
    "heal_since",
    "hold_point",
    "lock_point",
    "record_heal",
    "release_point",
    "rule_tag",
    "wanted_protection",
]

log = logging.getLogger(__name__)

#: the operations settings a lock reads (a bad drill or objective tag does not stop it)
_LOCK_KEYS = frozenset({"lock", "hold"})

#: the point tag that records the lock rule a point was taken under: ``<lock>`` or
#: ``<lock>-hold``, ``<lock>`` a ``backup-lock`` value (``compliance-30d``, ``none``)
RULE_TAG = "regionvault-lock"
_HOLD_SUFFIX = "-hold"

#: how far before the last complete heal's start the next heal looks again: the skew between
#: this host's clock (the heal's start, an event's time) and the vault's (a commit's time)
HEAL_MARGIN = timedelta(hours=1)


class OperationsOf(Protocol):
    """How an engine resolves an instance's operations settings (Engine.operations)."""

    def __call__(
        self, instance: Instance, *, keys: Collection[str] | None = None
    ) -> Operations: ...


class LockFailed(RegionVaultError):
    """A policy asks a lock or hold that a committed point does not carry and could not be
    given: the point is kept, the failure is the job's."""


class LockRefused(RegionVaultError):
    """An asked lock, hold or release that the WORM rules refuse (shortening a lock, making a
    compliance lock governance, lifting a compliance lock), or that the region's vault cannot
    do: nothing was changed."""


@dataclass(frozen=True)
class Wanted:
    """What a point's policy asks of it now: a lock until ``until`` (None: no lock, or one
    already over) in ``mode``, and a legal hold; ``rule`` says it as the tag does."""

    until: datetime | None
    mode: RetentionMode
    hold: bool
    rule: str


def _instance_of(point: RecoveryPoint) -> Instance:
    return Instance(
        id=point.instance_id, name=point.instance_name, region=point.region, tags=point.tags
    )


def rule_tag(operations: OperationsOf, instance: Instance) -> str | None:
    """The :data:`RULE_TAG` value recording ``instance``'s lock rule now (set at its backup);
    None when its own ``backup-lock`` / ``backup-hold`` tag is bad (the point then reads its
    own tags, and :class:`LockFailed` says what is wrong after its commit). The site's
    tables are checked when the site loads, so only a tag can be bad."""
    try:
        ops = operations(instance, keys=_LOCK_KEYS)
    except PolicyError:
        return None
    return f"{ops.lock if ops.lock is not None else 'none'}{_HOLD_SUFFIX if ops.hold else ''}"


def _rule_of(point: RecoveryPoint) -> Operations:
    """The lock rule ``point`` was taken under: its :data:`RULE_TAG`, else (a point taken
    before the tag) its own ``backup-lock`` / ``backup-hold`` tags, never today's tables."""
    recorded = point.tags.get(RULE_TAG)
    instance = _instance_of(point)
    if recorded is None:
        return resolve_operations(instance, OperationsConfig(), keys=_LOCK_KEYS)
    lock, hold = (
        (recorded[: -len(_HOLD_SUFFIX)], "on")
        if recorded.endswith(_HOLD_SUFFIX)
        else (recorded, "off")
    )
    rule = Instance(
        id=point.instance_id,
        name=point.instance_name,
        region=point.region,
        tags=Tags({LOCK_TAG: lock, HOLD_TAG: hold}),
    )
    try:
        return resolve_operations(rule, OperationsConfig(), keys=_LOCK_KEYS)
    except PolicyError as exc:
        raise PolicyError(
            f"point {point.id}: tag {RULE_TAG}={recorded!r} is not a recorded lock rule "
            f"({exc.message})",
            region=point.region,
        ) from None


def wanted_protection(point: RecoveryPoint, committed: datetime, now: datetime) -> Wanted | None:
    """What ``point``'s recorded rule asks (None: nothing now). :class:`LockFailed` when its
    ``backup-lock`` / ``backup-hold`` value is bad: the point is there, its lock is not."""
    try:
        ops = _rule_of(point)
    except PolicyError as exc:
        raise LockFailed(
            f"point {point.id} of {point.instance_id} is not locked: {exc.message}",
            region=point.region,
        ) from None
    until = None
    mode = RetentionMode.COMPLIANCE
    parts = []
    if ops.lock is not None:
        mode = RetentionMode(ops.lock.mode)
        parts.append(f"lock {ops.lock}")
        end = committed + ops.lock.duration
        until = end if end > now else None
    if ops.hold:
        parts.append("hold on")
    if until is None and not ops.hold:
        return None
    return Wanted(until, mode, ops.hold, ", ".join(parts))


def carries(info: ObjectInfo, wanted: Wanted) -> bool:
    """Whether a manifest (``info``) carries what is wanted: a lock at least as long and as
    strict, and the hold."""
    if wanted.until is not None:
        if info.retain_until is None or info.retain_until < wanted.until:
            return False
        if (
            wanted.mode is RetentionMode.COMPLIANCE
            and info.retention_mode is RetentionMode.GOVERNANCE
        ):
            return False
    return info.legal_hold or not wanted.hold


def describe_protection(info: ObjectInfo, now: datetime | None = None) -> str | None:
    """``locked until ... (mode)`` and/or ``legal hold``, for a report; None when nothing
    protects the object."""
    now = now or datetime.now(UTC)
    parts = []
    if info.retain_until is not None and info.retain_until > now:
        mode = info.retention_mode.value if info.retention_mode else "compliance"
        parts.append(f"locked until {info.retain_until.isoformat(timespec='seconds')} ({mode})")
    if info.legal_hold:
        parts.append("legal hold")
    return ", ".join(parts) or None


def _protect(repo: Repository, point: RecoveryPoint, wanted: Wanted) -> ProtectReport:
    try:
        return repo.protect(point.id, until=wanted.until, mode=wanted.mode, legal_hold=wanted.hold)
    except RegionVaultError as exc:
        raise LockFailed(
            f"point {point.id} of {point.instance_id} is committed but not locked as its "
            f"policy asks ({wanted.rule}): {exc}",
            region=repo.region,
        ) from exc


def apply_policy_lock(repo: Repository, point: RecoveryPoint) -> ProtectReport | None:
    """Put on ``point`` (committed in ``repo``) the lock and hold its recorded rule asks,
    unless its manifest carries them already (one HEAD). None when nothing was to do.
    :class:`LockFailed` when they cannot be applied."""
    info = repo.point_object(point.id)
    wanted = wanted_protection(point, info.modified, datetime.now(UTC))
    if wanted is None or carries(info, wanted):
        return None
    report = _protect(repo, point, wanted)
    log.info(
        "%s: point %s locked by policy (%s): %d object(s) changed",
        repo.region,
        point.id,
        wanted.rule,
        len(report.locked),
    )
    return report


@dataclass
class HealReport:
    region: str
    #: points found lacking the lock or hold their policy asks, and given it now
    locked: list[str] = field(default_factory=list)
    #: why a point could not be given it: the first such point of each instance, a line
    #: naming it (:meth:`fail`; the others of that instance are counted in it)
    failed: list[str] = field(default_factory=list)
    #: instance id -> (its line's place in ``failed``, the line, how many more points)
    _failures: dict[str, tuple[int, str, int]] = field(default_factory=dict, repr=False)

    def fail(self, point: RecoveryPoint, error: LockFailed) -> None:
        """Record why ``point`` could not be given its protection: one line per instance
        (a bad tag or a vault without WORM fails every point of it the same way)."""
        known = self._failures.get(point.instance_id)
        if known is None:
            self._failures[point.instance_id] = (len(self.failed), str(error), 0)
            self.failed.append(str(error))
            return
        at, line, more = known
        self._failures[point.instance_id] = (at, line, more + 1)
        self.failed[at] = f"{line} (and {more + 1} more point(s) of {point.instance_id})"

    #: points whose manifest was HEADed (the listing did not say their lock)
    checked: int = 0
    #: points lacking their rule's protection because a ``release`` by hand lifted it (left
    #: so: the event log records the release)
    released: list[str] = field(default_factory=list)


def heal_locks(
    repo_of: Callable[[], Repository], *, since: datetime | None = None
) -> HealReport | None:
    """Find the points of a region that lack the lock or hold their recorded rule asks (a
    process killed between a commit and its lock, a copy killed after its receipt) and apply
    it: every one of them, in any order, each independently (one that fails does not stop
    the others).

    A point is looked at only when its rule still asks something (a lock whose window has
    not ended, or a hold) and, with ``since``, when it was committed at or after ``since``
    (the service passes the start of its last complete heal, less :data:`HEAL_MARGIN`: the
    points a heal has seen need no second look; with no ``since``, a new state directory,
    every point in its window is looked at once). Cost: one listing of the manifests, and one
    HEAD per such point whose listing entry does not carry its lock (S3's listing says no
    lock: one HEAD per point committed since the last heal, and on a host's first heal, per
    point still in its window). None when the region holds no repository yet."""
    try:
        repo = repo_of()
    except RepositoryNotFound:
        return None
    report = HealReport(repo.region)
    now = datetime.now(UTC)
    objects = repo.point_objects()
    lacking: list[tuple[ObjectInfo, RecoveryPoint, Wanted]] = []
    for point in repo.points(tolerant=True):
        info = objects.get(point.id)
        if info is None or (since is not None and info.modified < since):
            continue
        try:
            wanted = wanted_protection(point, info.modified, now)
        except LockFailed as exc:
            report.fail(point, exc)
            continue
        if wanted is None or carries(info, wanted):
            continue
        report.checked += 1
        current = repo.point_object(point.id)
        if not carries(current, wanted):
            lacking.append((current, point, wanted))
    released = _released_by_hand(repo, [info.modified for info, _p, _w in lacking])
    for _info, point, wanted in lacking:
        if point.id in released:
            report.released.append(point.id)
            continue
        try:
            _protect(repo, point, wanted)
        except LockFailed as exc:
            report.fail(point, exc)
            continue
        report.locked.append(point.id)
        log.warning(
            "%s: point %s lacked the lock its policy asks (%s; a run killed after its "
            "commit): applied now",
            repo.region,
            point.id,
            wanted.rule,
        )
    return report


def _released_by_hand(repo: Repository, commits: list[datetime]) -> set[str]:
    """The points a ``release`` lifted protection from, by the region's event log (read only
    when some point lacks its rule's protection, from :data:`HEAL_MARGIN` before the oldest
    such commit on: an event's time is its host's clock, a commit's the vault's): the heal
    respects an administrator's release and never puts that back."""
    if not commits:
        return set()
    unreadable: list[Problem] = []  # an event that does not authenticate is left out
    return {
        event.point
        for event in repo.events(min(commits) - HEAL_MARGIN, problems=unreadable)
        if event.action == EventAction.RELEASE
        and event.result == EventResult.OK
        and event.point is not None
    }


def _mark_path(state_dir: Path, region: str) -> Path:
    return state_dir / "locks" / f"heal-{quote(region, safe='')}.json"


def heal_since(state_dir: Path, region: str) -> datetime | None:
    """Where the next heal of ``region`` starts looking: the start of the last complete
    heal recorded in ``state_dir``, less :data:`HEAL_MARGIN`; None when there is none (or
    the record is unreadable: then every point is looked at once)."""
    try:
        data = json.loads(_mark_path(state_dir, region).read_text())
        started = datetime.fromisoformat(str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if started.tzinfo is None:
        return None
    return started - HEAL_MARGIN


def record_heal(state_dir: Path, region: str, started: datetime) -> None:
    """Record that a heal of ``region`` that started at ``started`` found every point it
    looked at carrying its rule's lock (written atomically; a record that cannot be written
    is logged, and the next heal looks further back)."""
    path = _mark_path(state_dir, region)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"started": started.isoformat()}))
        tmp.replace(path)
    except OSError as exc:  # the next heal looks further back: it costs requests, not locks
        log.warning("%s: the heal's record could not be written (%s): %s", region, path, exc)


# --------------------------------------------------------------------------- by hand


def _when(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


def _need(repo: Repository, capability: str, what: str) -> None:
    if not getattr(repo.vault.capabilities, capability):
        raise LockRefused(
            f"the vault of {repo.region} (provider {repo.vault.provider}) cannot {what}: it "
            f"does not offer {capability}",
            region=repo.region,
        )


def lock_point(
    repo: Repository, point_id: str, until: datetime, mode: RetentionMode
) -> ProtectReport:
    """Lock a point (every object it uses, its manifest last) until ``until`` in ``mode``.
    A lock is only ever extended: :class:`LockRefused` for an ``until`` before the lock the
    point carries, or a governance lock asked of a compliance-locked point (and for a date
    past, or a vault without ``worm_lock``). Objects the point shares with points locked
    longer keep their longer lock."""
    _need(repo, "worm_lock", "lock objects (WORM)")
    now = datetime.now(UTC)
    if until.tzinfo is None:
        raise LockRefused(f"lock until {until.isoformat()}: the time has no time zone")
    if until <= now:
        raise LockRefused(f"lock until {_when(until)}: that time has passed", region=repo.region)
    info = repo.point_object(point_id)
    held = info.retain_until if info.retain_until and info.retain_until > now else None
    if held is not None:
        compliance = info.retention_mode is not RetentionMode.GOVERNANCE
        if until < held:
            how = (
                "a compliance lock can never be shortened"
                if compliance
                else "a lock is only extended here (release --bypass-governance lifts a "
                "governance lock)"
            )
            raise LockRefused(
                f"point {point_id} is locked until {_when(held)} "
                f"({'compliance' if compliance else 'governance'}); {_when(until)} would "
                f"shorten it: {how}",
                region=repo.region,
            )
        if compliance and mode is RetentionMode.GOVERNANCE:
            raise LockRefused(
                f"point {point_id} is under a compliance lock until {_when(held)}: it cannot "
                "become governance (lock it --mode compliance to extend it)",
                region=repo.region,
            )
    return repo.protect(point_id, until=until, mode=mode)


def hold_point(repo: Repository, point_id: str) -> ProtectReport:
    """Place a legal hold on a point (every object it uses, its manifest last)."""
    _need(repo, "legal_hold", "place legal holds")
    return repo.protect(point_id, legal_hold=True)


def release_point(
    repo: Repository, point_id: str, *, bypass_governance: bool = False
) -> ReleaseReport:
    """Lift a point's legal hold and, with ``bypass_governance`` (the administrator's act),
    its governance lock. :class:`LockRefused` names the date of a compliance lock, which
    nobody lifts (asked to, or when there is no hold to lift), and says when there is
    nothing to release."""
    now = datetime.now(UTC)
    info = repo.point_object(point_id)
    locked = info.retain_until is not None and info.retain_until > now
    compliance = locked and info.retention_mode is not RetentionMode.GOVERNANCE
    if compliance and (bypass_governance or not info.legal_hold):
        assert info.retain_until is not None
        raise LockRefused(
            f"point {point_id} is under a compliance lock until {_when(info.retain_until)}: "
            "nobody can release it before then",
            region=repo.region,
        )
    if not info.legal_hold and not (locked and bypass_governance):
        what = (
            f"a governance lock until {_when(info.retain_until)} (--bypass-governance lifts "
            "it: the administrator's act)"
            if locked and info.retain_until is not None
            else "no lock and no legal hold"
        )
        raise LockRefused(
            f"point {point_id} has no legal hold to release; it has {what}", region=repo.region
        )
    try:
        return repo.release(point_id, legal_hold=True, bypass_governance=bypass_governance)
    except RetentionLocked as exc:
        raise LockRefused(f"point {point_id}: {exc.reason}", region=repo.region) from None
