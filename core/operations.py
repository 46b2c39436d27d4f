"""The operations grammar: drills, objectives and locks, by tag, by named policy, by site.

Five optional tags refine how an instance's backups are operated (keys fixed, every value
fits GCP's label rules: lowercase letters, digits, ``_`` and ``-``):

``backup-drill=7d``
    restore the newest copy in each destination region at this interval, launch it, check its
    health, record the RTO, terminate it (``none``: no drills).
``backup-rpo=26h`` / ``backup-rto=15m``
    the recovery point and recovery time objectives: ``status`` and the audit report say
    whether each is met, at risk or breached (``none``: no objective). A duration as in a
    policy tag, and seconds (``90s``) besides.
``backup-lock=compliance-30d`` / ``governance-30d``
    every recovery point of the instance (and each copy) is WORM-locked for that long from its
    commit (``none``: no lock).
``backup-hold=on``
    every recovery point of the instance is placed under legal hold (``off``: none).

An instance without one of these tags takes the value from site.toml: the table
``[operations.<name>]`` when its policy tag names the named policy ``<name>``, else the table
``[operations]`` (keys ``drill``, ``rpo``, ``rto``, ``lock``, ``hold``), else nothing. Bad values
raise :class:`~regionvault.core.errors.PolicyError` naming the instance, the tag and what is
wrong; bad site values are a :class:`~regionvault.core.errors.ConfigError` when the site loads.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from regionvault.core.durations import (
    MAX_DURATION,
    DurationError,
    format_duration,
    parse_tag_duration,
    quote_value,
)
from regionvault.core.errors import ConfigError, PolicyError

if TYPE_CHECKING:
    from regionvault.core.types import Instance

__all__ = [
    "DRILL_TAG",
    "HOLD_TAG",
    "LOCK_TAG",
    "OPERATION_KEYS",
    "RPO_TAG",
    "RTO_TAG",
    "LockRule",
    "Operations",
    "OperationsConfig",
    "check_operations_config",
    "parse_objective",
    "resolve_operations",
]

DRILL_TAG = "backup-drill"
RPO_TAG = "backup-rpo"
RTO_TAG = "backup-rto"
LOCK_TAG = "backup-lock"
HOLD_TAG = "backup-hold"

#: site.toml ``[operations]`` key -> the tag that overrides it per instance
OPERATION_KEYS: Mapping[str, str] = {
    "drill": DRILL_TAG,
    "rpo": RPO_TAG,
    "rto": RTO_TAG,
    "lock": LOCK_TAG,
    "hold": HOLD_TAG,
}

LockMode = Literal["governance", "compliance"]
Source = Literal["tag", "policy", "site"]

_SECONDS = re.compile(r"([0-9]+)s")
_LOCK = re.compile(r"(governance|compliance)-(.*)", re.DOTALL)
_MIN_DRILL = timedelta(hours=1)


class _Invalid(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LockRule:
    """WORM retention applied to each recovery point at its commit: ``mode`` as S3 Object
    Lock says it (governance: an administrator may lift it; compliance: nobody may), for
    ``duration`` from the commit."""

    mode: LockMode
    duration: timedelta

    def __str__(self) -> str:
        return f"{self.mode}-{format_duration(self.duration)}"


@dataclass(frozen=True)
class OperationsConfig:
    """site.toml ``[operations]``: defaults (``drill``, ``rpo``, ``rto``, ``lock``, ``hold``,
    as tag values) and, per named policy, the same keys in ``[operations.<name>]``."""

    defaults: Mapping[str, str] = field(default_factory=dict)
    by_policy: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Operations:
    """An instance's effective operations settings; each ``None`` / False when nothing asks.
    ``sources`` says where each setting that is set came from: ``tag``, ``policy`` (the named
    policy's ``[operations.<name>]``) or ``site`` (``[operations]``)."""

    drill: timedelta | None = None
    rpo: timedelta | None = None
    rto: timedelta | None = None
    lock: LockRule | None = None
    hold: bool = False
    sources: Mapping[str, Source] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        def secs(value: timedelta | None) -> float | None:
            return None if value is None else value.total_seconds()

        return {
            "drill_seconds": secs(self.drill),
            "rpo_seconds": secs(self.rpo),
            "rto_seconds": secs(self.rto),
            "lock": None
            if self.lock is None
            else {"mode": self.lock.mode, "seconds": self.lock.duration.total_seconds()},
            "hold": self.hold,
            "sources": dict(self.sources),
        }


def _duration(text: str, what: str) -> timedelta:
    try:
        return parse_tag_duration(text, what)
    except DurationError as exc:
        raise _Invalid(str(exc)) from None


def _objective(text: str, what: str) -> timedelta:
    seconds = _SECONDS.fullmatch(text)
    if seconds is not None:
        digits = seconds.group(1).lstrip("0")
        if not digits:
            raise _Invalid(f"{what} {quote_value(text)} is zero")
        if len(digits) > 13 or int(digits) > MAX_DURATION.total_seconds():
            raise _Invalid(f"{what} {quote_value(text)} is longer than 100 years")
        return timedelta(seconds=int(digits))
    try:
        return parse_tag_duration(text, what)
    except DurationError as exc:
        # the objectives take seconds too: say so in the policy grammar's messages
        reason = str(exc).replace(
            "seconds are too short for a policy; use m, h, d or w", "write seconds as s, like 90s"
        )
        raise _Invalid(reason.replace("m, h, d or w", "s, m, h, d or w")) from None


def _none(value: str) -> bool:
    if value == "none":
        return True
    if value.lower() == "none":
        raise _Invalid("must write 'none' in lower case")
    return False


def _check_text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}")
    if not value:
        raise _Invalid("is empty")
    if any(ch.isspace() for ch in value):
        raise _Invalid("contains whitespace")
    return value


def _parse(key: str, raw: object) -> timedelta | LockRule | bool | None:
    value = _check_text(raw)
    if key == "hold":
        if value in {"on", "off"}:
            return value == "on"
        raise _Invalid(f"{quote_value(value)} is not on or off")
    if _none(value):
        return None
    if key == "drill":
        interval = _duration(value, "drill interval")
        if interval < _MIN_DRILL:
            raise _Invalid(
                f"drill interval {quote_value(value)} is shorter than "
                f"{format_duration(_MIN_DRILL)} (each drill launches an instance)"
            )
        return interval
    if key in {"rpo", "rto"}:
        return _objective(value, f"{key.upper()} objective")
    match = _LOCK.fullmatch(value)
    if match is None:
        raise _Invalid(
            f"{quote_value(value)} is not a lock (governance-DURATION or compliance-DURATION, "
            "like compliance-30d, or none)"
        )
    mode: LockMode = "governance" if match.group(1) == "governance" else "compliance"
    return LockRule(mode, _duration(match.group(2), "lock duration"))


def parse_objective(value: str, *, what: str = "objective") -> timedelta | None:
    """An RPO or RTO value (``26h``, ``90s``) as a duration, ``None`` for ``none``."""
    try:
        text = _check_text(value)
        return None if _none(text) else _objective(text, what)
    except _Invalid as exc:
        raise PolicyError(
            exc.reason
            if exc.reason.startswith(what)
            else f"{what} {quote_value(value)} {exc.reason}"
        ) from None


def check_operations_config(
    config: OperationsConfig, policies: Mapping[str, str], source: str
) -> None:
    """Every value of ``[operations]`` and ``[operations.<name>]`` parses, and every
    ``<name>`` is a named policy; :class:`ConfigError` names the key."""
    tables: list[tuple[str, Mapping[str, str]]] = [("operations", config.defaults)]
    for name, table in config.by_policy.items():
        if name not in policies:
            known = ", ".join(sorted(policies)) or "none defined"
            raise ConfigError(
                f"{name!r} is not a named policy ([policies]: {known}); [operations.<name>] "
                "tables refine named policies",
                file=source,
                key=f"operations.{name}",
            )
        tables.append((f"operations.{name}", table))
    for prefix, table in tables:
        for key, value in table.items():
            if key not in OPERATION_KEYS:
                raise ConfigError(
                    f"unknown key (expected one of: {', '.join(OPERATION_KEYS)})",
                    file=source,
                    key=f"{prefix}.{key}",
                )
            try:
                _parse(key, value)
            except _Invalid as exc:
                raise ConfigError(exc.reason, file=source, key=f"{prefix}.{key}") from None


def resolve_operations(
    instance: Instance,
    config: OperationsConfig,
    *,
    policy_name: str | None = None,
    keys: Collection[str] | None = None,
) -> Operations:
    """The effective operations settings of ``instance``: its tags, else the table of its
    named policy ``policy_name`` (:attr:`Policy.name <regionvault.core.policy.Policy.name>`),
    else the site's ``[operations]``. :class:`PolicyError` names the instance, the tag and what
    is wrong. With ``keys`` (``{"lock", "hold"}``), only those settings are read (the others
    stay unset), so that a bad drill tag does not stop a lock."""
    where = f"instance {instance.id}" + (
        f" ({instance.name})" if instance.name and instance.name != instance.id else ""
    )
    named = config.by_policy.get(policy_name, {}) if policy_name else {}
    values: dict[str, object] = {}
    sources: dict[str, Source] = {}
    for key, tag in OPERATION_KEYS.items():
        if keys is not None and key not in keys:
            continue
        source: Source
        if tag in instance.tags:
            raw, source = instance.tags[tag], "tag"
        elif key in named:
            raw, source = named[key], "policy"
        elif key in config.defaults:
            raw, source = config.defaults[key], "site"
        else:
            continue
        try:
            parsed = _parse(key, raw)
        except _Invalid as exc:
            origin = (
                f"tag {tag}={quote_value(raw)}"
                if source == "tag"
                else f"site.toml operations{'.' + str(policy_name) if source == 'policy' else ''}"
                f".{key}"
            )
            raise PolicyError(f"{where}: {origin}: {exc.reason}", region=instance.region) from None
        values[key] = parsed
        if parsed is not None and parsed is not False:
            sources[key] = source
    drill, rpo, rto, lock = (values.get(k) for k in ("drill", "rpo", "rto", "lock"))
    return Operations(
        drill=drill if isinstance(drill, timedelta) else None,
        rpo=rpo if isinstance(rpo, timedelta) else None,
        rto=rto if isinstance(rto, timedelta) else None,
        lock=lock if isinstance(lock, LockRule) else None,
        hold=values.get("hold") is True,
        sources=sources,
    )
