"""The audit report: per instance and region, the controls an auditor asks for, each passed,
failed or not applicable, with the evidence it looked at (point ids, times, key ids, object
names, events). docs/audit.md says what each control checks and why; the event log it reads
is docs/format.md section 17.

The audit only reads: it never creates a repository, never writes a vault (it records no
event of its own), and a region it cannot read fails the controls that needed it, naming
why, instead of stopping the report."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.durations import DurationError, parse_duration
from regionvault.core.errors import (
    KeyAccessDenied,
    PolicyError,
    RegionVaultError,
    RepositoryNotFound,
)
from regionvault.core.operations import LockRule
from regionvault.core.pipeline.state import DrillRecord
from regionvault.core.policy import Policy, resolve_policy
from regionvault.core.repository import Event, EventAction, EventResult, Problem, Repository
from regionvault.core.repository._events import EventLog
from regionvault.core.types import Instance, RecoveryPoint

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine

__all__ = [
    "CONTROLS",
    "FAILED",
    "NOT_APPLICABLE",
    "PACK_SAMPLE",
    "PASSED",
    "VERIFY_MAX_AGE",
    "AuditReport",
    "Control",
    "InstanceAudit",
    "RegionEvents",
    "audit",
    "parse_since",
    "region_events",
]

log = logging.getLogger(__name__)

PASSED = "passed"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"

#: the controls, in the order a report lists them
CONTROLS = (
    "policy",
    "backed_up",
    "retained",
    "copied",
    "copy_encrypted",
    "locked",
    "drilled",
    "verified",
)


#: a verify older than this fails ``verified`` (docs/audit.md)
VERIFY_MAX_AGE = timedelta(days=7)
#: how many of the destination's packs (the most recently written, one per run) have their
#: run keys offered to the other regions' KeyServices by ``copy_encrypted``
PACK_SAMPLE = 8

#: a text that reads as a duration, right or wrong (``0``, ``99999999d``, ``-5d``)
_DURATION_LIKE = re.compile(r"-?\d+(\.\d+)?[a-z]*")


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a duration back from ``now`` (``7d``, ``12h``) or an ISO 8601 time (one
    without an offset is UTC), not after ``now``. ValueError says what is wrong."""
    try:
        return now - parse_duration(text)
    except DurationError as exc:
        if _DURATION_LIKE.fullmatch(text.strip()):
            raise ValueError(f"--since: {exc}") from None
    except OverflowError:
        raise ValueError(f"--since {text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a duration (30m, 12h, 7d, 4w) nor an ISO 8601 time "
            "(2026-12-01 or 2026-12-01T08:00:00+00:00)"
        ) from None
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if moment > now:
        raise ValueError(f"--since {text!r} is in the future (now is {now.isoformat()})")
    return moment


@dataclass
class Control:
    """One control of one instance in one region."""

    control: str
    region: str
    status: str
    #: one line: why it passed, failed or does not apply
    why: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "region": self.region,
            "status": self.status,
            "why": self.why,
            "evidence": self.evidence,
        }


@dataclass
class InstanceAudit:
    instance_id: str
    instance_name: str
    home: str
    policy: str | None
    controls: list[Control] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "instance_name": self.instance_name,
            "home": self.home,
            "policy": self.policy,
            "controls": [c.to_dict() for c in self.controls],
        }


@dataclass
class AuditReport:
    at: datetime
    since: datetime | None
    instances: list[InstanceAudit] = field(default_factory=list)
    #: what the audit could not read (a region's vault, an event object): each is also in
    #: the evidence of the controls it touched
    problems: list[str] = field(default_factory=list)
    #: per region, what it read of the event log: from which time and sequence number, the
    #: events the log lists and the event objects fetched
    event_reads: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> list[tuple[InstanceAudit, Control]]:
        return [(i, c) for i in self.instances for c in i.controls if c.status == FAILED]

    @property
    def ok(self) -> bool:
        """Every control passed or does not apply, and nothing the audit needed was
        unreadable (the command's exit status 0)."""
        return not self.failed and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "since": None if self.since is None else self.since.isoformat(),
            "ok": self.ok,
            "failed": len(self.failed),
            "instances": [i.to_dict() for i in self.instances],
            "problems": list(self.problems),
            "event_reads": dict(self.event_reads),
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _secs(delta: timedelta) -> int:
    return round(delta.total_seconds())


@dataclass
class RegionEvents:
    """One region's event log as the audit read it."""

    region: str
    events: list[Event]
    #: event objects that did not authenticate or parse (each named)
    problems: list[Problem]
    #: why the log could not be read at all (no repository, no access), or None
    unreadable: str | None = None
    #: the region holds no repository yet (``unreadable`` says so): nothing to read, which
    #: is not a failure
    missing: bool = False
    #: the events the log lists, the event objects fetched, the first sequence number read
    listed: int = 0
    fetched: int = 0
    first_seq: int | None = None

    def reads(self, since: datetime | None) -> dict[str, Any]:
        return {
            "since": _iso(since),
            "from_seq": self.first_seq,
            "events_in_log": self.listed,
            "events_fetched": self.fetched,
        }


def region_events(engine: Engine, region: str, since: datetime | None = None) -> RegionEvents:
    """``region``'s events from the first at or after ``since`` (all by default), in
    sequence order, with what could not be read (a damaged event, a gap, a broken chain);
    never creates a repository."""
    name = engine.region(region).name
    try:
        repo = engine.repository(name, create=False)
    except RepositoryNotFound:
        why = "no repository yet (nothing backed up or copied there)"
        return RegionEvents(name, [], [], why, missing=True)
    except RegionVaultError as exc:
        return RegionEvents(name, [], [], str(exc))
    try:
        log: EventLog = repo.event_log(since)
    except RegionVaultError as exc:
        return RegionEvents(name, [], [], str(exc))
    return RegionEvents(
        name,
        log.events,
        log.problems,
        listed=log.listed,
        fetched=log.fetched,
        first_seq=log.first_seq,
    )


class _Region:
    """What the audit read of one region, once."""

    def __init__(self, auditor: _Auditor, name: str) -> None:
        engine = auditor.engine
        self.auditor = auditor
        self.name = name
        self._log: RegionEvents | None = None
        self.repo: Repository | None = None
        self.points: list[RecoveryPoint] = []
        self.unreadable: str | None = None
        try:
            self.repo = engine.repository(name, create=False)
            self.points = self.repo.points(tolerant=True)
        except RepositoryNotFound:
            self.unreadable = None  # nothing here yet: simply no points
        except RegionVaultError as exc:
            self.unreadable = f"{name} cannot be read: {exc}"
            self.repo = None

    @property
    def log(self) -> RegionEvents:
        """The region's event log from the auditor's ``log_from``: read once, when a
        control first needs it (after run() worked out the window)."""
        if self._log is None:
            a = self.auditor
            log_ = self._log = region_events(a.engine, self.name, a.log_from)
            a.report.event_reads[self.name] = log_.reads(a.log_from)
            if log_.unreadable and self.repo is not None and not self.unreadable:
                a.report.problems.append(f"{self.name}: event log: {log_.unreadable}")
            a.report.problems.extend(f"{self.name}: event log: {p}" for p in log_.problems)
        return self._log

    def of(self, instance_id: str, *, copies: bool) -> list[RecoveryPoint]:
        """The instance's points here, oldest first: home points, or copies."""
        return [
            p
            for p in self.points
            if p.instance_id == instance_id and (p.lineage is not None) == copies
        ]


class _Auditor:
    def __init__(self, engine: Engine, since: datetime | None, only: str | None) -> None:
        self.engine = engine
        self.now = engine.clock()
        self.since = since
        self.only = None if only is None else engine.region(only).name
        self.tick = engine.site.config.schedule_interval
        self.copy_lag = self.tick + engine.copy_grace
        self._regions: dict[str, _Region] = {}
        self._refusals: dict[str, Control] = {}
        #: regions whose Compute could not list its instances (their points are not taken
        #: for a terminated instance's)
        self._unlisted: set[str] = set()
        self.report = AuditReport(self.now, since)
        #: where every region's event log is read from (run() works it out): ``since``, or
        #: the window the controls need
        self.log_from: datetime | None = since

    def region(self, name: str) -> _Region:
        found = self._regions.get(name)
        if found is None:
            found = self._regions[name] = _Region(self, name)
            if found.unreadable:
                self.report.problems.append(found.unreadable)
        return found

    # ----------------------------------------------------------------- instances

    def instances(self) -> Iterable[Instance]:
        for r in self.engine.site.regions:
            try:
                listed = list(r.compute.list_instances())
            except RegionVaultError as exc:
                # one region's compute down must not hide the others' controls
                self.report.problems.append(f"{r.name}: instances cannot be listed: {exc}")
                self._unlisted.add(r.name)
                continue
            yield from listed

    def window(self, instances: list[Instance]) -> datetime:
        """How far back the controls need the event log: the longest retention (with a
        frequency and a tick: the first backup ``retained`` looks for), drill interval (with
        a tick) and :data:`VERIFY_MAX_AGE`, over the instances audited."""
        need = VERIFY_MAX_AGE
        for inst in instances:
            try:
                policy = resolve_policy(inst, self.engine.site.config)
            except PolicyError:
                continue
            if policy is None:
                continue
            slack = policy.frequency + self.tick
            need = max(need, policy.retention + slack)
            for dst in policy.copy_to:
                try:
                    dst_name = self.engine.region(str(dst)).name
                    need = max(need, policy.copy_retention(dst_name) + slack)
                except RegionVaultError:
                    continue
            try:
                interval = self.engine.operations(inst).drill
            except PolicyError:
                continue
            if interval is not None:
                need = max(need, interval + self.tick)
        return self.now - need

    def gone(self, live: list[Instance]) -> list[Instance]:
        """Instances no compute lists any more (terminated) whose points remain: from the
        newest point of each (its name, tags and home region); with --region, that region's
        points only."""
        known = {i.id for i in live}
        newest: dict[str, RecoveryPoint] = {}
        for r in self.engine.site.regions:
            if self.only is not None and r.name != self.only:
                continue
            for p in self.region(r.name).points:
                if p.instance_id not in known:
                    seen = newest.get(p.instance_id)
                    if (
                        seen is None
                        or (seen.lineage is not None and p.lineage is None)
                        or (
                            (seen.lineage is None) == (p.lineage is None)
                            and p.created_at > seen.created_at
                        )
                    ):
                        newest[p.instance_id] = p
        found = []
        for p in newest.values():
            home = p.region if p.lineage is None else p.lineage.source_region
            try:
                home = self.engine.region(home).name
            except RegionVaultError:
                continue  # a copy from a region this site no longer names
            if home in self._unlisted:
                continue  # its instances are unknown, not gone (a problem already)
            found.append(Instance(p.instance_id, p.instance_name, home, p.tags, state="terminated"))
        return found

    def run(self) -> AuditReport:
        live = list(self.instances())
        listed = sorted([*live, *self.gone(live)], key=lambda i: (i.region, i.name, i.id))
        if self.since is None:
            self.log_from = self.window(listed)
        for inst in listed:
            found = self.instance(inst)
            if found is not None:
                found.controls = sorted(
                    (c for c in found.controls if self.only is None or c.region == self.only),
                    key=lambda c: (CONTROLS.index(c.control), c.region != found.home, c.region),
                )
                if found.controls:
                    self.report.instances.append(found)
        return self.report

    def instance(self, inst: Instance) -> InstanceAudit | None:
        home = self.engine.region(inst.region).name
        try:
            policy = resolve_policy(inst, self.engine.site.config)
        except PolicyError as exc:
            bad = InstanceAudit(inst.id, inst.name, home, None)
            bad.controls.append(
                Control("policy", home, FAILED, str(exc), {"tags": dict(inst.tags)})
            )
            return bad
        if policy is None:
            return None  # opted out (backup=none): nothing is promised, nothing to audit
        destinations = [self.engine.region(str(t)).name for t in policy.copy_to]
        if inst.state == "terminated":
            return self.terminated(inst, home, destinations, policy)
        found = InstanceAudit(inst.id, inst.name, home, policy.spec)
        # with --region, the controls about other regions are not worked out at all (their
        # vaults are not read)
        mine = home if self.only is None or self.only == home else None
        theirs = [d for d in destinations if self.only is None or self.only == d]
        add = found.controls.append
        if mine:
            add(self.backed_up(inst, home, policy))
            add(self.retained(inst, home, policy.retention, policy, copies=False))
            if not destinations:
                why = f"policy {policy.spec} names no destination region"
                add(Control("copied", home, NOT_APPLICABLE, why, {"policy": policy.spec}))
        for dst in theirs:
            add(self.retained(inst, dst, policy.copy_retention(dst), policy, copies=True))
            add(self.copied(inst, home, dst, policy))
            add(self.copy_encrypted(inst, home, dst))
        try:
            ops = self.engine.operations(inst)
        except PolicyError as exc:
            if mine:
                add(Control("locked", home, FAILED, str(exc), {}))
                add(Control("drilled", home, FAILED, str(exc), {}))
        else:
            for where in [*([home] if mine else []), *theirs]:
                add(self.locked(inst, where, ops.lock, ops.hold, where != home))
            # its region is the last drill's: worked out first, kept by run() if wanted
            add(self.drilled(inst, [home, *destinations], ops.drill, ops.rto))
        for where in [*([home] if mine else []), *theirs]:
            add(self.verified(where))
        return found

    def terminated(
        self, inst: Instance, home: str, destinations: list[str], policy: Policy
    ) -> InstanceAudit | None:
        """A terminated instance is audited while points of it remain (home or copies):
        they must still be kept, locked and verified; nothing new is due of it."""
        where = [r for r in [home, *destinations] if self.only is None or self.only == r]
        kept = {r: self.region(r).of(inst.id, copies=r != home) for r in where}
        if not any(kept.values()):
            return None
        found = InstanceAudit(inst.id, inst.name, home, policy.spec)
        add = found.controls.append
        why = f"{inst.name} is terminated: no new point is due"
        try:
            ops = self.engine.operations(inst)
        except PolicyError:
            ops = None
        for r in where:
            if not kept[r]:
                continue
            is_copy = r != home
            add(Control("copied" if is_copy else "backed_up", r, NOT_APPLICABLE, why, {}))
            retention = policy.copy_retention(r) if is_copy else policy.retention
            add(self.retained(inst, r, retention, policy, copies=is_copy))
            if is_copy:
                add(self.copy_encrypted(inst, home, r))
            if ops is not None:
                add(self.locked(inst, r, ops.lock, ops.hold, is_copy))
            add(self.verified(r))
        return found

    # ----------------------------------------------------------------- controls

    def _unlogged(self, region: _Region, points: list[RecoveryPoint], *, copies: bool) -> list[str]:
        """The points (taken since the log read begins, and after its first event) that no
        ok backup (or copy into the region) event names: a crash between the commit and its
        event, or an event deleted (docs/audit.md)."""
        events = region.log.events
        if not events:
            return []
        action = EventAction.COPY if copies else EventAction.BACKUP
        logged = {e.point for e in events if e.action == action and e.result == EventResult.OK}
        start = max(events[0].at, self.log_from) if self.log_from else events[0].at
        return [p.id for p in points if p.created_at >= start and p.id not in logged]

    def backed_up(self, inst: Instance, home: str, policy: Policy) -> Control:
        region = self.region(home)
        limit = policy.frequency + self.tick
        evidence: dict[str, Any] = {
            "frequency_seconds": _secs(policy.frequency),
            "limit_seconds": _secs(limit),
        }
        if region.unreadable:
            return Control("backed_up", home, FAILED, region.unreadable, evidence)
        points = region.of(inst.id, copies=False)
        if not points:
            return Control(
                "backed_up", home, FAILED, f"no recovery point of {inst.name} in {home}", evidence
            )
        newest = points[-1]
        age = self.now - newest.created_at
        window = self.now - policy.retention
        if self.since is not None and self.since > window:
            window = self.since
        in_window = [p for p in points if p.created_at >= window]
        longest: dict[str, Any] | None = None
        for before, after in itertools.pairwise(in_window):
            gap = after.created_at - before.created_at
            if longest is None or gap.total_seconds() > longest["seconds"]:
                longest = {
                    "from_point": before.id,
                    "to_point": after.id,
                    "seconds": _secs(gap),
                }
        evidence.update(
            newest_point=newest.id,
            newest_at=_iso(newest.created_at),
            age_seconds=_secs(age),
            window_from=_iso(window),
            points_in_window=[p.id for p in in_window],
            longest_gap=longest,
            unlogged=self._unlogged(region, points, copies=False),
        )
        if age > limit:
            return Control(
                "backed_up",
                home,
                FAILED,
                f"newest point {newest.id} is {_secs(age)}s old, beyond its frequency and "
                f"schedule interval ({_secs(limit)}s)",
                evidence,
            )
        if longest is not None and longest["seconds"] > _secs(limit):
            return Control(
                "backed_up",
                home,
                FAILED,
                f"{longest['seconds']}s between points {longest['from_point']} and "
                f"{longest['to_point']}, beyond {_secs(limit)}s",
                evidence,
            )
        return Control(
            "backed_up", home, PASSED, f"newest point {newest.id} is {_secs(age)}s old", evidence
        )

    def _held(self, region: _Region, point: RecoveryPoint) -> str | None:
        """Why a point's manifest may not be deleted yet (a WORM lock, a legal hold)."""
        if region.repo is None:
            return None
        try:
            info = region.repo.vault.head(f"points/{point.id}")
        except RegionVaultError:
            return None
        if info.legal_hold:
            return "legal hold"
        if info.retain_until is not None and info.retain_until > self.now:
            return f"WORM lock until {info.retain_until.isoformat()}"
        return None

    def _first(self, region: _Region, inst: Instance, *, copies: bool) -> Event | None:
        """The instance's first backup (or copy into this region) in the region's log."""
        for event in region.log.events:
            if event.instance != inst.id or event.result != EventResult.OK:
                continue
            if not copies and event.action == EventAction.BACKUP:
                return event
            if (
                copies
                and event.action == EventAction.COPY
                and (event.detail.get("role") == "destination")
            ):
                return event
        return None

    def retained(
        self, inst: Instance, where: str, retention: timedelta, policy: Policy, *, copies: bool
    ) -> Control:
        region = self.region(where)
        evidence: dict[str, Any] = {"retention_seconds": _secs(retention)}
        if region.unreadable:
            return Control("retained", where, FAILED, region.unreadable, evidence)
        points = region.of(inst.id, copies=copies)
        if not points:
            why = f"no {'copy' if copies else 'recovery point'} of {inst.name} in {where}"
            status = NOT_APPLICABLE if copies else FAILED
            return Control(
                "retained", where, status, why + (" (see copied)" if copies else ""), evidence
            )
        overdue: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        for p in points:
            if p.expires_at is None or self.now <= p.expires_at + self.tick:
                continue
            held = self._held(region, p)
            (kept if held else overdue).append(
                {"point": p.id, "expires_at": _iso(p.expires_at), "kept_by": held}
            )
        oldest = points[0]
        first = self._first(region, inst, copies=copies)
        first_at = first.at if first is not None else oldest.created_at
        reach = max(self.now - retention, first_at)
        slack = policy.frequency + self.tick
        evidence.update(
            points=len(points),
            oldest_point=oldest.id,
            oldest_at=_iso(oldest.created_at),
            first_event=None if first is None else first.name,
            first_at=_iso(first_at),
            expected_back_to=_iso(reach),
            overdue=overdue,
            kept_by_lock=kept,
        )
        if first is None:
            evidence["note"] = (
                "the event log (as read) holds no backup or copy of it: the points themselves "
                "stand in (the oldest point is taken as the first), so a deletion of points "
                "older than the oldest left cannot be seen"
            )
        if overdue:
            return Control(
                "retained",
                where,
                FAILED,
                f"{len(overdue)} point(s) kept past their expiry by more than a tick, with no "
                f"lock or hold (first: {overdue[0]['point']})",
                evidence,
            )
        if oldest.created_at > reach + slack:
            return Control(
                "retained",
                where,
                FAILED,
                f"oldest point {oldest.id} is from {oldest.created_at.isoformat()}: points "
                f"should reach back to {reach.isoformat()}",
                evidence,
            )
        return Control(
            "retained",
            where,
            PASSED,
            f"{len(points)} point(s), back to {oldest.created_at.isoformat()}; none overdue",
            evidence,
        )

    def copied(self, inst: Instance, home: str, dst: str, policy: Policy) -> Control:
        region = self.region(dst)
        limit = policy.frequency + self.copy_lag
        evidence: dict[str, Any] = {"source": home, "limit_seconds": _secs(limit)}
        if region.unreadable:
            return Control("copied", dst, FAILED, region.unreadable, evidence)
        copies = [c for c in region.of(inst.id, copies=True)]
        if not copies:
            return Control("copied", dst, FAILED, f"no copy of {inst.name} in {dst}", evidence)
        newest = copies[-1]
        age = self.now - newest.created_at
        lineage = newest.lineage
        evidence.update(
            newest_copy=newest.id,
            copied_at=_iso(newest.created_at),
            age_seconds=_secs(age),
            source_point=None if lineage is None else lineage.source_recovery_point,
            source_region=None if lineage is None else lineage.source_region,
            unlogged=self._unlogged(region, copies, copies=True),
        )
        if age > limit:
            return Control(
                "copied",
                dst,
                FAILED,
                f"newest copy {newest.id} is {_secs(age)}s old, beyond the frequency and copy "
                f"lag ({_secs(limit)}s)",
                evidence,
            )
        return Control(
            "copied", dst, PASSED, f"newest copy {newest.id} is {_secs(age)}s old", evidence
        )

    def copy_encrypted(self, inst: Instance, home: str, dst: str) -> Control:
        region = self.region(dst)
        if region.unreadable:
            return Control("copy_encrypted", dst, FAILED, region.unreadable, {"source": home})
        copies = region.of(inst.id, copies=True)
        if not copies or region.repo is None:
            return Control(
                "copy_encrypted",
                dst,
                NOT_APPLICABLE,
                f"no copy of {inst.name} in {dst} to check (see copied)",
                {"source": home},
            )
        if dst not in self._refusals:
            self._refusals[dst] = self._refused(dst, region.repo)
        done = self._refusals[dst]
        evidence = {"source": home, **done.evidence, "copy": copies[-1].id}
        return Control("copy_encrypted", dst, done.status, done.why, evidence)

    def _opens_own(self, name: str) -> str | None:
        """The positive control of ``name``'s KeyService: it must open what it wrapped (its
        repository's config key; with no repository there, a data key it wraps for the
        audit, which writes nothing). None when it does; else why not."""
        keys = self.engine.region(name).keys
        repo = self.region(name).repo
        try:
            if repo is not None:
                keys.unwrap(*repo.wrapped_config_key())
            else:
                context = {"vault": name, "kind": "audit-control", "name": "positive control"}
                keys.unwrap(keys.generate_data_key(context).wrapped, context)
        except RegionVaultError as exc:
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return None

    def _refused(self, dst: str, repo: Repository) -> Control:
        """Whether every other region's KeyService refuses ``dst``'s keys: its config's data
        key (which the repository's secrets hang from) and the run data keys of up to
        :data:`PACK_SAMPLE` of its packs, the most recently written (one per run), which
        its KeyService wraps directly (docs/format.md section 2). It proves only what both
        positive controls allow: ``dst``'s KeyService must open them, and each other
        region's must open its own; a refusal is :class:`KeyAccessDenied` alone."""
        dst_keys = self.engine.region(dst).keys
        evidence: dict[str, Any] = {"destination_key_id": dst_keys.key_id}

        def failed(why: str) -> Control:
            return Control("copy_encrypted", dst, FAILED, why, evidence)

        try:
            blobs: list[tuple[str, bytes, dict[str, str]]] = [
                (f"{dst}: config", *repo.wrapped_config_key()),
                *((f"{dst}: {name}", w, c) for name, w, c in repo.wrapped_pack_keys(PACK_SAMPLE)),
            ]
        except RegionVaultError as exc:
            return failed(f"cannot read {dst}'s keys to offer: {exc}")
        evidence["objects"] = [b[0] for b in blobs]
        for what, wrapped, context in blobs:
            try:
                dst_keys.unwrap(wrapped, context)
            except RegionVaultError as exc:
                return failed(
                    f"cannot prove: {dst}'s own KeyService does not open {what} "
                    f"({type(exc).__name__}: {exc})"
                )
        tried: list[dict[str, Any]] = []
        evidence["regions_tried"] = tried
        for other in self.engine.site.regions:
            if other.name == dst:
                continue
            entry: dict[str, Any] = {"region": other.name, "key_id": other.keys.key_id}
            tried.append(entry)
            not_own = self._opens_own(other.name)
            if not_own is not None:
                entry["positive_control"] = not_own
                return failed(
                    f"cannot prove: {other.name}'s KeyService does not open its own key "
                    f"either ({not_own}), so its refusal shows nothing"
                )
            refused = 0
            for what, wrapped, context in blobs:
                try:
                    other.keys.unwrap(wrapped, context)
                except KeyAccessDenied:
                    refused += 1
                    continue
                except RegionVaultError as exc:
                    entry["error"] = f"{what}: {type(exc).__name__}: {exc}"
                    return failed(
                        f"could not tell: {other.name}'s KeyService neither opened nor refused "
                        f"{what}: {type(exc).__name__}: {exc}"
                    )
                entry["opened"] = what
                return failed(
                    f"{other.name}'s KeyService opened {what}: the copy is not under {dst}'s "
                    "own key"
                )
            entry["refused"] = refused
        return Control(
            "copy_encrypted",
            dst,
            PASSED,
            f"{len(tried)} other region(s)' KeyServices each opened their own key and refused "
            f"{dst}'s config key and {len(blobs) - 1} pack run key(s) (KeyAccessDenied)",
            evidence,
        )

    def locked(
        self, inst: Instance, where: str, lock: LockRule | None, hold: bool, is_copy: bool
    ) -> Control:
        if lock is None and not hold:
            return Control(
                "locked", where, NOT_APPLICABLE, "the policy asks no WORM lock or legal hold", {}
            )
        asked = {
            "lock": None if lock is None else str(lock),
            "hold": hold,
        }
        region = self.region(where)
        if region.unreadable:
            return Control("locked", where, FAILED, region.unreadable, asked)
        if region.repo is None:
            why = f"no repository in {where} yet"
            return Control("locked", where, NOT_APPLICABLE if is_copy else FAILED, why, asked)
        points = region.of(inst.id, copies=is_copy)
        if not points:
            return Control(
                "locked",
                where,
                NOT_APPLICABLE if is_copy else FAILED,
                f"no {'copy' if is_copy else 'recovery point'} of {inst.name} in {where}",
                asked,
            )
        newest = points[-1]
        # the newest, and every older point its lock should still hold
        due = [
            p
            for p in points[:-1]
            if lock is not None and p.created_at + lock.duration - self.tick > self.now
        ]
        checked = [newest, *reversed(due)]
        evidence: dict[str, Any] = {**asked, "points_checked": len(checked)}
        for i, point in enumerate(checked):
            name = f"points/{point.id}"
            try:
                info = region.repo.vault.head(name)
            except RegionVaultError as exc:
                return Control("locked", where, FAILED, f"{name}: {exc}", evidence)
            if i == 0:
                evidence.update(
                    object=name,
                    taken_at=_iso(point.created_at),
                    retain_until=_iso(info.retain_until),
                    mode=None if info.retention_mode is None else str(info.retention_mode),
                    legal_hold=info.legal_hold,
                )
            wrong: list[str] = []
            if lock is not None:
                needed = point.created_at + lock.duration - self.tick
                if i == 0:
                    evidence["needed_until"] = _iso(needed)
                if info.retain_until is None or info.retain_until < needed:
                    until = _iso(info.retain_until) or "absent"
                    wrong.append(f"retain-until {until}, needs {needed.isoformat()}")
                elif info.retention_mode is None or str(info.retention_mode) != lock.mode:
                    wrong.append(f"lock mode {info.retention_mode}, needs {lock.mode}")
            if hold and i == 0 and not info.legal_hold:
                wrong.append("no legal hold")
            if wrong:
                evidence["failed_object"] = name
                return Control("locked", where, FAILED, f"{name}: " + "; ".join(wrong), evidence)
        older = f" (and {len(checked) - 1} older point(s) its lock still covers)" if due else ""
        why = f"points/{newest.id} is locked as its policy asks{older}"
        return Control("locked", where, PASSED, why, evidence)

    def _logged_drills(self, inst: Instance, regions: list[str]) -> list[DrillRecord]:
        """The instance's drills as the regions' event logs hold them: ``drill`` events,
        and ``restore`` events that launched (a drill by hand)."""
        found: list[DrillRecord] = []
        for name in regions:
            for e in self.region(name).log.events:
                if e.instance != inst.id or e.point is None:
                    continue
                launched = e.detail.get("launched")
                rto_ms = e.detail.get("rto_ms")
                rto = rto_ms / 1000 if isinstance(rto_ms, int) else None
                if e.action == EventAction.DRILL:
                    if e.detail.get("phase") == "start":
                        continue  # a drill begun (its end, or its absence, says how it went)
                    healthy = e.result == EventResult.OK
                elif e.action == EventAction.RESTORE and e.detail.get("launch") is True:
                    healthy = e.result == EventResult.OK and e.detail.get("healthy") is True
                else:
                    continue
                found.append(
                    DrillRecord(
                        region=name,
                        instance_id=inst.id,
                        point_id=e.point,
                        launched_id=str(launched or ""),
                        at=e.at,
                        healthy=healthy,
                        rto_seconds=rto,
                    )
                )
        return found

    def drilled(
        self,
        inst: Instance,
        regions: list[str],
        interval: timedelta | None,
        rto: timedelta | None,
    ) -> Control:
        home = regions[0]
        if interval is None:
            return Control("drilled", home, NOT_APPLICABLE, "no drill interval asked", {})
        evidence: dict[str, Any] = {
            "interval_seconds": _secs(interval),
            "rto_objective_seconds": None if rto is None else _secs(rto),
        }
        # the event log first (it survives the host); this host's state store as a fallback
        records = self._logged_drills(inst, regions)
        evidence["source"] = "event log"
        if not records:
            records = [
                d
                for d in (self.engine.state.last_drill(r, inst.id) for r in regions)
                if d is not None
            ]
            evidence["source"] = "state store (no drill in the event logs read)"
        if not records:
            return Control("drilled", home, FAILED, f"no drill of {inst.name} recorded", evidence)
        last = max(records, key=lambda d: d.at)
        evidence.update(
            drill_region=last.region,
            point=last.point_id,
            launched=last.launched_id,
            at=_iso(last.at),
            healthy=last.healthy,
            rto_seconds=last.rto_seconds,
        )
        where = last.region
        age = self.now - last.at
        if age > interval + self.tick:
            return Control(
                "drilled",
                where,
                FAILED,
                f"last drill was {_secs(age)}s ago, beyond its interval",
                evidence,
            )
        if not last.healthy or last.rto_seconds is None:
            return Control(
                "drilled", where, FAILED, "the last drill never became healthy", evidence
            )
        if rto is not None and last.rto_seconds > rto.total_seconds():
            return Control(
                "drilled",
                where,
                FAILED,
                f"last drill took {last.rto_seconds:.1f}s, beyond its RTO objective {_secs(rto)}s",
                evidence,
            )
        return Control(
            "drilled",
            where,
            PASSED,
            f"last drill {_secs(age)}s ago, healthy in {last.rto_seconds:.1f}s",
            evidence,
        )

    def verified(self, where: str) -> Control:
        region = self.region(where)
        log_ = region.log
        evidence: dict[str, Any] = {
            "unreadable_events": [str(p) for p in log_.problems],
        }
        if region.unreadable:
            return Control("verified", where, FAILED, region.unreadable, evidence)
        if region.repo is None:
            why = f"no repository in {where} yet: nothing stored there to verify"
            return Control("verified", where, NOT_APPLICABLE, why, evidence)
        if log_.unreadable:
            return Control("verified", where, FAILED, f"event log: {log_.unreadable}", evidence)
        verifies = [e for e in log_.events if e.action == EventAction.VERIFY]
        if not verifies:
            return Control(
                "verified",
                where,
                FAILED,
                f"no verify of {where} in its event log (read from "
                f"{_iso(self.log_from) or 'its start'})",
                evidence,
            )
        last = verifies[-1]  # the last in the log's order (seq), whatever the clocks said
        evidence.update(
            event=last.name,
            at=_iso(last.at),
            result=last.result,
            problems=last.detail.get("problems"),
            read_data=last.detail.get("read_data"),
            who=last.who.get("user"),
        )
        if log_.problems:
            return Control(
                "verified",
                where,
                FAILED,
                f"{len(log_.problems)} event object(s) of {where} do not authenticate "
                f"(first: {log_.problems[0].object})",
                evidence,
            )
        if last.result != EventResult.OK:
            why = f"last verify ({last.at.isoformat()}): {last.error}"
            return Control("verified", where, FAILED, why, evidence)
        age = self.now - last.at
        evidence["max_age_seconds"] = _secs(VERIFY_MAX_AGE)
        data = "with" if last.detail.get("read_data") else "without"
        if age > VERIFY_MAX_AGE:
            why = (
                f"last verify ({last.at.isoformat()}) is {_secs(age)}s old, beyond "
                f"{_secs(VERIFY_MAX_AGE)}s"
            )
            return Control("verified", where, FAILED, why, evidence)
        why = f"last verify ({last.at.isoformat()}, {data} --read-data) was clean"
        return Control("verified", where, PASSED, why, evidence)


def audit(
    engine: Engine, *, since: datetime | None = None, region: str | None = None
) -> AuditReport:
    """The audit report of every instance with a backup policy in the site's regions
    (terminated ones and those opted out with ``none`` left out), each control per region;
    with ``region``, only the controls about that region. Reads only."""
    return _Auditor(engine, since, region).run()
