"""Protection states: where each instance of each region stands, as ``status`` shows it
(docs/commands.md, "status"), worst first.

An instance listed by its home region's Compute is judged by its live tags and the
recovery points its home region holds (the same points view and the same rule a tick's
scheduler uses); a region holding only copies of an instance judges whether the home's
newest backup has reached it; an instance no longer listed anywhere but whose points remain
is ``gone``. The clock, the ledger's last failure and the points are given: this module does
no I/O of its own.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from regionvault.core.config import SiteConfig
from regionvault.core.durations import format_duration
from regionvault.core.errors import PolicyError, RegionVaultError
from regionvault.core.operations import resolve_operations
from regionvault.core.pipeline.jobs import SLOT_TAG, backup_job, parse_slot, slot_of
from regionvault.core.policy import Policy, resolve_policy
from regionvault.core.types import Instance, RecoveryPoint

__all__ = [
    "NOT_PROTECTED",
    "Judgement",
    "LastFailure",
    "LedgerFailures",
    "ProtectionState",
    "judge_copies",
    "judge_gone",
    "judge_home",
    "last_backup_error",
    "newest_slot_of",
    "state_rank",
]


log = logging.getLogger(__name__)


class ProtectionState(enum.StrEnum):
    """An instance's protection state in a region; declared worst first."""

    #: its last backup job failed (the reason is the job's error)
    FAILING = "failing"
    #: a policy or operations tag that does not parse (the reason says what is wrong)
    MALFORMED = "malformed"
    #: due, and not backed up within its frequency plus a tick's grace
    LATE = "late"
    #: due now, within the grace
    DUE = "due"
    #: never backed up, not failing yet: the next tick backs it up
    NOT_BACKED_UP = "not_backed_up"
    #: no longer listed by its home region, but recovery points of it remain
    GONE = "gone"
    #: its policy is ``none``
    OPTED_OUT = "opted_out"
    PROTECTED = "protected"


#: the states that make ``status`` exit 1 (docs/commands.md)
NOT_PROTECTED = frozenset(
    {ProtectionState.FAILING, ProtectionState.MALFORMED, ProtectionState.LATE}
)

_RANK = {state: i for i, state in enumerate(ProtectionState)}


def state_rank(state: str | None) -> int:
    """Sort key putting the worst state first (an unknown or missing one last)."""
    if state is None:
        return len(_RANK)
    try:
        return _RANK[ProtectionState(state)]
    except ValueError:
        return len(_RANK)


@dataclass(frozen=True)
class Judgement:
    state: ProtectionState
    reason: str


#: the error of the instance's last backup job when it failed (its ledger's record), None
#: when it did not fail or none is on record
LastFailure = Callable[[Instance, Policy], "str | None"]


def last_backup_error(
    ledger: object, instance: Instance, frequency: timedelta, now: datetime
) -> str | None:
    """The error of ``instance``'s newest backup job on record in ``ledger`` when it
    failed: the job of the current schedule slot, else of the slot before (as the RPO
    objective reads it: core/pipeline/objectives.py); None when that job is done, or no
    failure is on record (a ledger that keeps no failures: never one)."""
    record = getattr(ledger, "record", None)
    last_failure = getattr(ledger, "last_failure", None)
    slot = slot_of(now, frequency)
    for s in (slot, slot - frequency):
        key = backup_job(instance.region, instance.id, s).key
        if record is not None and record(key) is not None:
            return None
        failure = last_failure(key) if last_failure is not None else None
        if failure is not None:
            return " ".join(str(failure.error or "failed").split())
    return None


class LedgerFailures:
    """:func:`last_backup_error` for one ``status`` call, as a :data:`LastFailure`: the
    site's job ledger (``open_ledger()``: ``Engine.ledger``) opened once, when first asked;
    one that cannot be read shows no failures (logged)."""

    def __init__(self, open_ledger: Callable[[], Any], now: datetime) -> None:
        self._open = open_ledger
        self._now = now
        self._ledger: Any = None
        self._broken = False

    def __call__(self, instance: Instance, policy: Policy) -> str | None:
        if self._broken:
            return None
        try:
            if self._ledger is None:
                self._ledger = self._open()
            return last_backup_error(self._ledger, instance, policy.frequency, self._now)
        except Exception as exc:  # any executor kind's ledger: status still answers
            log.warning(
                "status: the job ledger cannot be read (%s: %s): backup failures not shown",
                type(exc).__name__,
                exc,
            )
            self._broken = True
            return None

    def close(self) -> None:
        close = getattr(self._ledger, "close", None)
        if close is not None:
            close()


def newest_slot_of(point: RecoveryPoint) -> datetime:
    """The schedule slot ``point`` was made for (its creation time when it records none),
    as the scheduler counts an instance's next backup from it."""
    slot = point.tags.get(SLOT_TAG)
    if slot:
        try:
            return parse_slot(slot)
        except RegionVaultError:
            pass
    return point.created_at


def _ago(seconds: float) -> str:
    """A duration in its two largest units (``45s``, ``5m1s``, ``2h``, ``3d4h``)."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count and len(parts) < 2:
            parts.append(f"{count}{unit}")
        elif parts:
            break
    return "".join(parts) or "0s"


def judge_home(
    instance: Instance,
    points: list[RecoveryPoint],
    *,
    site: SiteConfig,
    now: datetime,
    grace: timedelta,
    last_failure: LastFailure,
) -> Judgement:
    """The state of ``instance`` (live, as its home region lists it) from its backups there
    (``points``: home points, oldest first by arrival). ``grace``: a tick's (the site's
    ``schedule_interval``)."""
    try:
        policy = resolve_policy(instance, site)
    except PolicyError as exc:
        return Judgement(ProtectionState.MALFORMED, _unnamed(exc.message, instance))
    if policy is None:
        return Judgement(ProtectionState.OPTED_OUT, f"{site.tag_key}=none")
    try:
        resolve_operations(instance, site.operations, policy_name=policy.name)
    except PolicyError as exc:
        return Judgement(ProtectionState.MALFORMED, _unnamed(exc.message, instance))
    error = last_failure(instance, policy)
    if error is not None:
        return Judgement(ProtectionState.FAILING, f"last backup failed: {error}")
    every = format_duration(policy.frequency)
    if not points:
        return Judgement(
            ProtectionState.NOT_BACKED_UP, f"never backed up (every {every}): the next tick does"
        )
    due_at = newest_slot_of(points[-1]) + policy.frequency
    if now < due_at:
        return Judgement(
            ProtectionState.PROTECTED,
            f"every {every}: next backup due in {_ago((due_at - now).total_seconds())}",
        )
    overdue = (now - due_at).total_seconds()
    if now > due_at + grace:
        return Judgement(
            ProtectionState.LATE,
            f"every {every}: backup overdue by {_ago(overdue)} (grace {format_duration(grace)})",
        )
    return Judgement(ProtectionState.DUE, f"every {every}: due {_ago(overdue)} ago")


def _unnamed(message: str, instance: Instance) -> str:
    """A policy error's message without the ``instance <id> (<name>): `` it starts with:
    the row names the instance already."""
    for prefix in (f"instance {instance.id} ({instance.name}): ", f"instance {instance.id}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def judge_gone(region: str, points: list[RecoveryPoint], *, home: str | None = None) -> Judgement:
    """An instance its home region (``home``, default ``region``) no longer lists, of which
    ``points`` remain in ``region``."""
    if home is None or home == region:
        return Judgement(
            ProtectionState.GONE,
            f"no longer an instance in {region}; {len(points)} point(s) kept until retention",
        )
    return Judgement(
        ProtectionState.GONE,
        f"no longer an instance in {home}; {len(points)} copy(ies) kept here until retention",
    )


def judge_copies(
    region: str,
    copies: list[RecoveryPoint],
    *,
    home_newest: RecoveryPoint | None,
    home_policy: Policy | None,
    opted_out: bool,
    now: datetime,
    grace: timedelta,
) -> Judgement:
    """The state of an instance in a region holding only copies of it (``copies``, oldest
    first): ``late`` when its home's newest backup (``home_newest``; None: not known) is
    not here and was made more than ``grace`` ago while its policy (``home_policy``, None:
    not known) copies here; else ``protected`` (or ``opted_out`` at home)."""
    source = copies[-1].lineage.source_region if copies[-1].lineage else "?"
    if opted_out:
        return Judgement(ProtectionState.OPTED_OUT, f"opted out in {source}; copies kept")
    copied = {p.lineage.source_recovery_point for p in copies if p.lineage is not None}
    copies_here = home_policy is None or any(
        str(target) == region for target in home_policy.copy_to
    )
    if home_newest is not None and home_newest.id not in copied and copies_here:
        waited = (now - home_newest.created_at).total_seconds()
        if waited > grace.total_seconds():
            return Judgement(
                ProtectionState.LATE,
                f"newest backup {home_newest.id[:12]} in {source} not copied here after "
                f"{_ago(waited)}",
            )
    if not copies_here:
        return Judgement(
            ProtectionState.PROTECTED, f"copies of {source} kept; its policy copies here no more"
        )
    return Judgement(ProtectionState.PROTECTED, f"copies of {source}, up to date")
