"""The policy tag grammar: what an instance's tags say about its backups.

A policy tag (key ``backup`` by default, :attr:`SiteConfig.tag_key`) holds one of:

``F-R``
    back up every ``F``, keep each recovery point for ``R``. Each side is a whole number with
    an optional unit ``m`` (minutes), ``h`` (hours), ``d`` (days) or ``w`` (weeks); a bare
    number is days, so the classic ``1-7`` is "daily, keep 7 days". ``12h-2d``, ``30m-6h``,
    ``1d-4w``.
``F-``, ``-R``, ``F``
    a partial policy: the missing side comes from the site's default policy (``1-`` is daily
    with the default's retention, ``-7`` the default's frequency with 7 days, and a bare
    ``1`` or ``12h`` is a frequency, so ``1`` is ``1-``). The tag is left as written, so a
    later change of the default applies to it; :attr:`Policy.completed` says what it
    completed to. A site whose default is ``none`` has no part to give: an error naming the
    missing part.
a policy name
    a name from site.toml ``[policies]`` (``gold = "4h-30d"``); a named policy is itself an
    ``F-R`` string, checked when the site is loaded.
``none``
    opt out: the instance is never backed up.

Two optional tags refine where copies go (keys configurable, see :class:`SiteConfig`):
``backup-copy-to=west,local:south`` names the regions that receive copies (short or full
region names, or ``none`` for no copies); ``backup-copy-keep=14d`` how long those copies are
kept. Without them, copies go where the site's replication pairs say, kept for the pair's
``copy_retention``, else for the policy's own ``R``. An instance without a policy tag gets the
site's default policy.

``backup-hook=sqlite,postgres`` (key :attr:`SiteConfig.hook_tag_key`) names the hooks run
around the instance's capture, in that order: the built-in ``sqlite``, or ``[hooks.NAME]``
tables of site.toml (docs/hooks.md); ``none`` is none. An unknown name fails that
instance's backup.

Bad values raise :class:`PolicyError` with the value quoted (long values truncated) and the
reason; the tagger and scheduler report it per instance and carry on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from regionvault.core.durations import (
    MAX_DURATION,
    DurationError,
    format_duration,
    parse_tag_duration,
    quote_value,
)
from regionvault.core.errors import ConfigError, PolicyError
from regionvault.core.types import RegionId

if TYPE_CHECKING:
    from regionvault.core.types import Instance

__all__ = [
    "BUILTIN_HOOKS",
    "MIN_FREQUENCY",
    "NONE",
    "CopyTarget",
    "Policy",
    "PolicySite",
    "check_site_policies",
    "instance_hooks",
    "parse_copy_retention",
    "parse_copy_to",
    "parse_duration_part",
    "parse_hook_names",
    "parse_policy",
    "parse_spec",
    "resolve_policy",
]

#: the opt-out value of the policy tag (and of the copy-to tag: no copies)
NONE = "none"

#: hooks regionvault itself provides (the hook tag may name them; a site may not define a hook
#: of the same name)
BUILTIN_HOOKS = frozenset({"sqlite"})

#: The shortest frequency a policy may ask for. The scheduler looks every ``schedule_interval``
#: (5 minutes by default), so a shorter frequency could not be honoured anyway; and each backup
#: is a capture, a handful of KMS calls, a manifest commit and then copies over transit, which
#: for a real instance take minutes. An RPO below minutes is a job for replication, not backup.
MIN_FREQUENCY = timedelta(minutes=5)

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_REGION_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_FORMS = "F-R like 1-7 or 12h-2d, a named policy, or none"


class _Region(Protocol):
    @property
    def id(self) -> RegionId: ...


class PolicySite(Protocol):
    """What the policy grammar reads of a site. :class:`~regionvault.core.config.SiteConfig`
    is one; the grammar names this protocol rather than the class, because parsing a site
    file checks its policies with this module (config imports policy, never the reverse)."""

    @property
    def source(self) -> str: ...
    @property
    def regions(self) -> Mapping[str, _Region]: ...
    @property
    def default_policy(self) -> str: ...
    @property
    def policies(self) -> Mapping[str, str]: ...
    @property
    def tag_key(self) -> str: ...
    @property
    def copy_to_tag_key(self) -> str: ...
    @property
    def copy_retention_tag_key(self) -> str: ...
    @property
    def hook_tag_key(self) -> str: ...
    @property
    def hooks(self) -> Mapping[str, object]: ...

    def destinations_of(self, source: RegionId) -> tuple[RegionId, ...]:
        """The regions the site's replication pairs send ``source``'s copies to."""
        ...

    def copy_retention_of(self, source: RegionId, destination: RegionId) -> timedelta | None:
        """The ``copy_retention`` of the pair from ``source`` to ``destination``, if set."""
        ...


class _Invalid(Exception):
    """Why a value is wrong, before the caller adds where the value came from."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _duration(text: str, what: str) -> timedelta:
    try:
        return parse_tag_duration(text, what)
    except DurationError as exc:
        raise _Invalid(exc.reason) from None


def _check_frequency(frequency: timedelta) -> None:
    if frequency < MIN_FREQUENCY:
        raise _Invalid(
            f"frequency {format_duration(frequency)} is shorter than the minimum "
            f"{format_duration(MIN_FREQUENCY)}"
        )


def _check_spec(frequency: timedelta, retention: timedelta) -> None:
    _check_frequency(frequency)
    if retention < frequency:
        raise _Invalid(
            f"retention {format_duration(retention)} is shorter than the frequency "
            f"{format_duration(frequency)} (each recovery point would expire before the next)"
        )
    if retention > MAX_DURATION:
        raise _Invalid(f"retention {format_duration(retention)} is longer than 100 years")


def _partial_sides(text: object) -> tuple[str, str] | None:
    """The written sides of a partial value (``F-``, ``-R``, a bare ``F``), the missing one
    empty; None when ``text`` is not partial (whole, ``-`` alone, or malformed otherwise)."""
    if not isinstance(text, str) or not text or not text.isascii():
        return None
    if any(ch.isspace() for ch in text) or _NAME.fullmatch(text):
        return None  # a name (``gold``, ``none``) is never partial
    frequency, dash, retention = text.partition("-")
    if not dash:
        return text, ""
    if "-" in retention or bool(frequency) == bool(retention):
        return None
    return frequency, retention


def _spec(text: str) -> tuple[timedelta, timedelta]:
    if not isinstance(text, str):
        raise _Invalid(f"must be a string, got {type(text).__name__}")
    if not text:
        raise _Invalid(f"is empty (expected {_FORMS})")
    if any(ch.isspace() for ch in text):
        raise _Invalid("contains whitespace")
    if not text.isascii():
        raise _Invalid("has non-ASCII characters (write digits as 0-9)")
    if "-" not in text:
        raise _Invalid(f"has no '-' between frequency and retention (expected {_FORMS})")
    parts = text.split("-")
    if len(parts) != 2:
        raise _Invalid(
            f"has {len(parts) - 1} '-' (expected exactly one, between frequency and retention)"
        )
    frequency = _duration(parts[0], "frequency")
    retention = _duration(parts[1], "retention")
    _check_spec(frequency, retention)
    return frequency, retention


def parse_duration_part(text: str, *, what: str = "duration") -> timedelta:
    """One side of ``F-R`` (``30m``, ``12h``, ``7``, ``4w``) as a timedelta; a bare number is
    days. :class:`PolicyError` when malformed, zero or longer than 100 years."""
    try:
        if not isinstance(text, str):
            raise _Invalid(f"must be a string, got {type(text).__name__}")
        if any(ch.isspace() for ch in text):
            raise _Invalid(f"{what} {quote_value(text)} contains whitespace")
        return _duration(text, what)
    except _Invalid as exc:
        raise PolicyError(exc.reason) from None


def parse_spec(text: str) -> tuple[timedelta, timedelta]:
    """``F-R`` as ``(frequency, retention)``; :class:`PolicyError` naming what is wrong."""
    try:
        return _spec(text)
    except _Invalid as exc:
        raise PolicyError(f"policy {quote_value(text)}{_join(exc.reason)}") from None


def _join(reason: str) -> str:
    # "policy '' is empty", but "policy '1-x': retention 'x' is not a duration"
    first = reason.split(" ", 1)[0]
    return f" {reason}" if first in {"is", "has", "contains", "must", "names"} else f": {reason}"


@dataclass(frozen=True)
class CopyTarget:
    """A region that receives copies of an instance's recovery points, and how long it keeps
    them."""

    region: RegionId
    retention: timedelta

    def __str__(self) -> str:
        return f"{self.region} (keep {format_duration(self.retention)})"


@dataclass(frozen=True)
class Policy:
    """An instance's effective backup policy.

    ``source`` is the value as written (``"1-7"``, ``"gold"``); ``name`` is the named policy it
    came from, if any; ``copies`` the regions that receive copies, each with its retention.
    """

    frequency: timedelta
    retention: timedelta
    source: str = ""
    name: str | None = None
    copies: tuple[CopyTarget, ...] = ()
    #: True when the instance had no policy tag and the site's default applied
    from_default: bool = False
    #: the whole ``F-R`` value a partial tag was completed to with the missing side of the
    #: site's default policy (``"1-7"`` for ``"1-"`` under the default ``1-7``); None when
    #: the value was whole
    completed: str | None = None

    def __post_init__(self) -> None:
        try:
            _check_spec(self.frequency, self.retention)
        except _Invalid as exc:
            raise PolicyError(f"policy {quote_value(self.source)}{_join(exc.reason)}") from None
        seen: set[RegionId] = set()
        for target in self.copies:
            if target.region in seen:
                raise PolicyError(f"policy {quote_value(self.source)}: {target.region} twice")
            seen.add(target.region)

    @property
    def spec(self) -> str:
        """The canonical ``F-R`` form (``1d-1w``), whatever form it was written in."""
        return f"{format_duration(self.frequency)}-{format_duration(self.retention)}"

    @property
    def completed_part(self) -> str | None:
        """``"frequency"`` or ``"retention"``: the side a partial tag took from the site's
        default policy; None when the value was whole."""
        if self.completed is None:
            return None
        return "frequency" if self.source.startswith("-") else "retention"

    @property
    def copy_to(self) -> tuple[RegionId, ...]:
        return tuple(t.region for t in self.copies)

    def copy_retention(self, region: RegionId | str) -> timedelta:
        """How long the copy in ``region`` is kept; :class:`PolicyError` if ``region`` gets no
        copies under this policy."""
        for target in self.copies:
            if target.region == region or str(target.region) == region:
                return target.retention
        raise PolicyError(f"policy {quote_value(self.source)} sends no copies to {region}")

    def __str__(self) -> str:
        label = self.source if self.source == self.spec else f"{self.source} ({self.spec})"
        if self.copies:
            label += "; copies: " + ", ".join(str(t) for t in self.copies)
        return label


def _named(value: str, policies: Mapping[str, str]) -> Policy:
    if value not in policies:
        known = ", ".join(sorted(policies)) or "none defined"
        raise _Invalid(
            f"is not a known policy name (site.toml [policies]: {known}); expected {_FORMS}"
        )
    spec = policies[value]
    try:
        frequency, retention = _spec(spec)
    except _Invalid as exc:
        raise _Invalid(
            f"names policy {value!r} whose value {quote_value(spec)} in site.toml is invalid: "
            f"{exc.reason}"
        ) from None
    return Policy(frequency, retention, source=value, name=value)


def _completed(
    value: str, sides: tuple[str, str], policies: Mapping[str, str], default: str | None
) -> Policy:
    """The policy of a partial value, its missing side taken from the site's ``default``."""
    written_frequency, written_retention = sides
    # the written side is checked first: its own error says more than a missing default
    if written_frequency:
        # the default plays no part in a frequency below the minimum: said as for a whole value
        _check_frequency(_duration(written_frequency, "frequency"))
    else:
        _duration(written_retention, "retention")
    missing = "retention" if written_frequency else "frequency"
    if default is None:
        raise _Invalid(
            f"{missing} is missing (a partial value takes it from the site's default_policy, "
            "and there is none here)"
        )
    if default == NONE:
        raise _Invalid(
            f"{missing} is missing, and the site's default_policy is {NONE!r}: there is no "
            f"default {missing} to complete it with (write both sides, like 1-7)"
        )
    if _NAME.fullmatch(default) and default not in policies:
        raise _Invalid(
            f"{missing} is missing, and the site's default_policy {quote_value(default)} "
            "names no policy of [policies]"
        )
    default_spec = policies.get(default, default)
    try:
        _spec(default_spec)
    except _Invalid as exc:
        raise _Invalid(
            f"{missing} is missing, and the site's default_policy {quote_value(default)} is "
            f"invalid: {exc.reason}"
        ) from None
    default_frequency, default_retention = default_spec.split("-")
    whole_frequency = written_frequency or default_frequency
    whole_retention = written_retention or default_retention
    whole = f"{whole_frequency}-{whole_retention}"
    frequency = _duration(whole_frequency, "frequency")
    retention = _duration(whole_retention, "retention")
    try:
        _check_spec(frequency, retention)
    except _Invalid as exc:
        raise _Invalid(
            f"completes to {whole} with the {missing} of default_policy "
            f"{quote_value(default)}, and then {exc.reason}"
        ) from None
    return Policy(frequency, retention, source=value, completed=whole)


def _policy(value: str, policies: Mapping[str, str], default: str | None = None) -> Policy | None:
    if value == NONE:
        return None
    if isinstance(value, str) and value.lower() == NONE:
        raise _Invalid(f"write {NONE!r} in lower case to opt out")
    if isinstance(value, str) and _NAME.fullmatch(value):
        return _named(value, policies)
    sides = _partial_sides(value)
    if sides is not None:
        return _completed(value, sides, policies, default)
    frequency, retention = _spec(value)
    return Policy(frequency, retention, source=value)


def parse_policy(
    value: str, *, policies: Mapping[str, str] | None = None, default: str | None = None
) -> Policy | None:
    """A policy tag value as a :class:`Policy` without copies, ``None`` for ``none``.

    ``policies`` are the site's named policies; ``default`` the site's default policy, which
    completes a partial value (``1-``, ``-7``, ``1``; without it, a partial value is an
    error). :class:`PolicyError` quotes the value and says what is wrong.
    """
    try:
        return _policy(value, policies or {}, default)
    except _Invalid as exc:
        raise PolicyError(f"policy {quote_value(value)}{_join(exc.reason)}") from None


def _region(ref: str, site: PolicySite) -> RegionId | str:
    """The region ``ref`` names, or why it names none."""
    if ref in site.regions:
        return site.regions[ref].id
    matches = [r.id for r in site.regions.values() if r.id.name == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        return f"{quote_value(ref)} is ambiguous ({', '.join(str(m) for m in sorted(matches))})"
    return f"{quote_value(ref)} is not a region of this site"


def _copy_to(value: str, home: RegionId, site: PolicySite) -> tuple[RegionId, ...]:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}")
    if value == NONE:
        return ()
    if not value.strip():
        raise _Invalid(f"is empty (name regions, or write {NONE!r} for no copies)")
    out: list[RegionId] = []
    problems: list[str] = []
    for i, raw in enumerate(value.split(",")):
        ref = raw.strip()
        if not ref:
            problems.append(f"item {i + 1} is empty")
            continue
        if not _REGION_REF.fullmatch(ref):
            problems.append(f"{quote_value(ref)} is not a region name")
            continue
        found = _region(ref, site)
        if isinstance(found, str):
            problems.append(found)
        elif found == home:
            problems.append(f"{found} is the instance's own region")
        elif found not in out:
            out.append(found)
    if problems:
        known = ", ".join(sorted(site.regions)) or "none"
        raise _Invalid("; ".join(problems) + f" (regions: {known})")
    return tuple(out)


def parse_copy_to(value: str, *, home: RegionId | str, site: PolicySite) -> tuple[RegionId, ...]:
    """A copy-to tag value (``west,local:south``) as region ids, validated against ``site``:
    every unknown, ambiguous or home region is reported at once. ``none`` means no copies."""
    home_id = RegionId.parse(home) if isinstance(home, str) else home
    try:
        return _copy_to(value, home_id, site)
    except _Invalid as exc:
        raise PolicyError(f"copy-to {quote_value(value)}{_join(exc.reason)}") from None


def _copy_keep(value: str, frequency: timedelta | None) -> timedelta:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}")
    if any(ch.isspace() for ch in value):
        raise _Invalid("contains whitespace")
    keep = _duration(value, "retention")
    if frequency is not None and keep < frequency:
        raise _Invalid(
            f"is shorter than the frequency {format_duration(frequency)} (each copy would "
            "expire before the next arrives)"
        )
    return keep


def parse_copy_retention(value: str, *, frequency: timedelta | None = None) -> timedelta:
    """A copy-keep tag value (``14d``): a duration at least ``frequency`` long (a copy that
    expires before the next one arrives leaves the other region without a copy)."""
    try:
        return _copy_keep(value, frequency)
    except _Invalid as exc:
        raise PolicyError(f"copy-keep {quote_value(value)}{_join(exc.reason)}") from None


def resolve_policy(instance: Instance, site: PolicySite) -> Policy | None:
    """The effective policy of ``instance`` under ``site``, ``None`` if it opted out.

    Missing parts come from the site: no policy tag means ``site.default_policy``, and a
    partial one (``1-``, ``-7``, ``1``) takes its missing side from it; no copy-to
    tag means the destinations of the site's replication pairs from the instance's region; no
    copy-keep tag means the pair's ``copy_retention``, else the policy's own retention.
    :class:`PolicyError` names the instance, the tag and what is wrong.
    """
    tags = instance.tags
    where = f"instance {instance.id}" + (
        f" ({instance.name})" if instance.name and instance.name != instance.id else ""
    )
    key = site.tag_key
    value = tags.get(key)
    from_default = value is None
    if value is None:
        value = site.default_policy
    try:
        # the default itself must be whole (the site check says so); a tag may be partial
        base = _policy(value, site.policies, None if from_default else site.default_policy)
    except _Invalid as exc:
        if from_default:
            raise PolicyError(
                f"{where}: site default_policy {quote_value(value)}{_join(exc.reason)}",
                region=instance.region,
            ) from None
        raise PolicyError(
            f"{where}: tag {key}={quote_value(value)}{_join(exc.reason)}", region=instance.region
        ) from None
    if base is None:
        return None
    try:
        home = RegionId.parse(instance.region)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}", region=instance.region) from None

    to_key, keep_key = site.copy_to_tag_key, site.copy_retention_tag_key
    try:
        if to_key in tags:
            copy_to = _copy_to(tags[to_key], home, site)
        else:
            copy_to = site.destinations_of(home)
    except _Invalid as exc:
        raise PolicyError(
            f"{where}: tag {to_key}={quote_value(tags[to_key])}{_join(exc.reason)}",
            region=instance.region,
        ) from None
    keep: timedelta | None = None
    if keep_key in tags:
        try:
            keep = _copy_keep(tags[keep_key], base.frequency)
        except _Invalid as exc:
            raise PolicyError(
                f"{where}: tag {keep_key}={quote_value(tags[keep_key])}{_join(exc.reason)}",
                region=instance.region,
            ) from None
    copies = tuple(
        CopyTarget(dest, keep or site.copy_retention_of(home, dest) or base.retention)
        for dest in copy_to
    )
    return Policy(
        base.frequency,
        base.retention,
        source=base.source,
        name=base.name,
        copies=copies,
        from_default=from_default,
        completed=base.completed,
    )


def _hook_names(value: str, site: PolicySite) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}")
    if value.strip().lower() == NONE:
        return ()
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if not name:
            raise _Invalid("has an empty hook name (names are comma-separated)")
        if name not in BUILTIN_HOOKS and name not in site.hooks:
            known = ", ".join(sorted(BUILTIN_HOOKS | set(site.hooks)))
            raise _Invalid(
                f"names unknown hook {quote_value(name)} (known: {known}; define it as "
                f"[hooks.{name}] in {site.source})"
            )
        if name in names:
            raise _Invalid(f"names hook {quote_value(name)} twice")
        names.append(name)
    return tuple(names)


def parse_hook_names(value: str, *, site: PolicySite) -> tuple[str, ...]:
    """The hook names of a ``backup-hook`` tag value (``sqlite,postgres``), each built in or
    defined in ``site``; ``none`` is none. :class:`PolicyError` naming what is wrong."""
    try:
        return _hook_names(value, site)
    except _Invalid as exc:
        raise PolicyError(f"hooks {quote_value(value)}{_join(exc.reason)}") from None


def instance_hooks(instance: Instance, site: PolicySite) -> tuple[str, ...]:
    """The hooks the instance's hook tag names, in order; none without the tag.
    :class:`PolicyError` names the instance, the tag, its value and what is wrong."""
    value = instance.tags.get(site.hook_tag_key)
    if value is None:
        return ()
    try:
        return _hook_names(value, site)
    except _Invalid as exc:
        where = f"instance {instance.id}" + (
            f" ({instance.name})" if instance.name and instance.name != instance.id else ""
        )
        raise PolicyError(
            f"{where}: tag {site.hook_tag_key}={quote_value(value)}{_join(exc.reason)}",
            region=instance.region,
        ) from None


def check_site_policies(site: PolicySite) -> None:
    """Check a site's named policies, default policy and policy tag keys.

    Named policies must be named like ``gold`` (a letter, then letters, digits, ``_ . -``; not
    ``none``) and be ``F-R`` strings; the default policy must parse. :class:`ConfigError` names
    the file and the key. :func:`parse_site` calls this.
    """
    for name, value in site.policies.items():
        key = f"policies.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                "a policy name starts with a letter and has only letters, digits, '_', '.' "
                "and '-' (at most 63 characters)",
                file=site.source,
                key=key,
            )
        if name.lower() == NONE:
            raise ConfigError(f"{NONE!r} is reserved (it opts out)", file=site.source, key=key)
        try:
            _spec(value)
        except _Invalid as exc:
            raise ConfigError(
                f"{quote_value(value)}{_join(exc.reason)} (a named policy is an F-R string "
                "like 4h-30d)",
                file=site.source,
                key=key,
            ) from None
    if _partial_sides(site.default_policy) is not None:
        raise ConfigError(
            f"{quote_value(site.default_policy)} is partial: the default gives partial tags "
            "their missing side, so it must be whole (F-R like 1-7, a name, or none)",
            file=site.source,
            key="site.default_policy",
        )
    try:
        _policy(site.default_policy, site.policies)
    except _Invalid as exc:
        raise ConfigError(
            f"{quote_value(site.default_policy)}{_join(exc.reason)}",
            file=site.source,
            key="site.default_policy",
        ) from None
    keys = {
        "tag_key": site.tag_key,
        "copy_to_tag_key": site.copy_to_tag_key,
        "copy_retention_tag_key": site.copy_retention_tag_key,
        "hook_tag_key": site.hook_tag_key,
    }
    seen: dict[str, str] = {}
    for setting, tag in keys.items():
        if tag in seen:
            raise ConfigError(
                f"tag key {tag!r} is also {seen[tag]}; the policy tags need distinct keys",
                file=site.source,
                key=f"site.{setting}",
            )
        seen[tag] = f"site.{setting}"
