"""Site configuration: one TOML file naming regions, replication pairs, policies, intervals.

Every validation error names the file, the key and what is wrong::

    site.toml: regions."local:east".root: missing (the local provider needs it)
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.durations import parse_duration
from regionvault.core.errors import ConfigError, ProviderNotFound
from regionvault.core.operations import OperationsConfig, check_operations_config
from regionvault.core.policy import BUILTIN_HOOKS, check_site_policies
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig

if TYPE_CHECKING:
    from regionvault.core.interfaces import ComputeScope
    from regionvault.core.plugins import ProviderRegistry

__all__ = [
    "CLAIMING_COMMANDS",
    "DEFAULT_HOOK_TIMEOUT",
    "SERVICES",
    "THREAD_EXECUTOR",
    "ExecutorConfig",
    "HookConfig",
    "LaunchConfig",
    "Replication",
    "SiteConfig",
    "check_region_claims",
    "compute_overlaps",
    "find_site_file",
    "load_site",
    "parse_hooks",
    "parse_site",
]

SERVICES = ("compute", "keys", "vault")


@dataclass(frozen=True)
class Replication:
    source: RegionId
    destinations: tuple[RegionId, ...]
    #: how long copies are kept; None keeps them as long as the source policy says
    copy_retention: timedelta | None = None


#: how long one hook command may run when its table sets no ``timeout``
DEFAULT_HOOK_TIMEOUT = timedelta(minutes=5)
_HOOK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_HOOK_KEYS = ("before", "after", "timeout")


@dataclass(frozen=True)
class HookConfig:
    """A named hook from site.toml (``[hooks.NAME]``): commands run around a capture.

    A command is an argv: a TOML array is run as it is, a TOML string through ``/bin/sh -c``.
    """

    name: str
    before: tuple[str, ...] | None = None
    after: tuple[str, ...] | None = None
    timeout: timedelta = DEFAULT_HOOK_TIMEOUT
    source: str = "<memory>"


#: the built-in executor kind: jobs run in the ticking process, on threads
THREAD_EXECUTOR = "thread"


@dataclass(frozen=True)
class ExecutorConfig:
    """The ``[executor]`` table: which kind of executor runs the site's jobs and that kind's
    settings (``broker``, ``concurrency``, ... for ``celery``), as written. The kind checks
    its own settings (``regionvault_executor_kinds``, core/plugins.py); ``thread`` takes
    none."""

    kind: str = THREAD_EXECUTOR
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchConfig:
    """``[launch]``: ``health_timeout`` for every region, ``[launch.regions."<region>"]``
    for one; None where unset (the region's compute then gives its default)."""

    health_timeout: timedelta | None = None
    region_health_timeouts: Mapping[str, timedelta] = field(default_factory=dict)

    def health_timeout_of(self, region: str) -> timedelta | None:
        """The configured health timeout of ``region`` (its full id), if any."""
        return self.region_health_timeouts.get(region, self.health_timeout)


@dataclass(frozen=True)
class SiteConfig:
    name: str
    regions: Mapping[str, RegionConfig]
    replication: tuple[Replication, ...] = ()
    default_policy: str = "1-7"
    policies: Mapping[str, str] = field(default_factory=dict)
    tag_key: str = "backup"
    copy_to_tag_key: str = "backup-copy-to"
    copy_retention_tag_key: str = "backup-copy-keep"
    #: the tag naming the hooks run around an instance's capture (``backup-hook=sqlite``)
    hook_tag_key: str = "backup-hook"
    overwrite_tags: bool = False
    tag_interval: timedelta = timedelta(minutes=5)
    schedule_interval: timedelta = timedelta(minutes=5)
    #: where the engine keeps its own run state (job records, drill results)
    state_dir: Path = Path(".regionvault")
    #: the named hooks of ``[hooks.NAME]`` tables (the built-in ``sqlite`` is not listed)
    hooks: Mapping[str, HookConfig] = field(default_factory=dict)
    #: ``[executor]``: what runs the jobs of ``tick`` and ``run`` (default: threads here)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    #: ``[operations]``: drills, RPO/RTO objectives, locks and holds (core/operations.py)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    #: ``[launch]``: how long a launched instance may take to become healthy
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str = "<memory>"

    def region(self, ref: str) -> RegionConfig:
        """A region by full id (``local:east``) or by its unique short name (``east``)."""
        if ref in self.regions:
            return self.regions[ref]
        matches = [r for r in self.regions.values() if r.id.name == ref]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted(self.regions)) or "none"
        if matches:
            raise ConfigError(
                f"region {ref!r} is ambiguous: {', '.join(r.name for r in matches)}",
                file=self.source,
            )
        raise ConfigError(f"unknown region {ref!r} (regions: {known})", file=self.source)

    def destinations_of(self, source: RegionId) -> tuple[RegionId, ...]:
        out: list[RegionId] = []
        for rep in self.replication:
            if rep.source == source:
                out.extend(d for d in rep.destinations if d not in out)
        return tuple(out)

    def copy_retention_of(self, source: RegionId, destination: RegionId) -> timedelta | None:
        """How long the pair from ``source`` to ``destination`` keeps copies, when it says."""
        for rep in self.replication:
            if (
                rep.source == source
                and destination in rep.destinations
                and rep.copy_retention is not None
            ):
                return rep.copy_retention
        return None


# --------------------------------------------------------------------------- parsing

_SITE_KEYS = {
    "name": str,
    "default_policy": str,
    "tag_key": str,
    "copy_to_tag_key": str,
    "copy_retention_tag_key": str,
    "hook_tag_key": str,
    "overwrite_tags": bool,
    "tag_interval": str,
    "schedule_interval": str,
    "state_dir": str,
}
_TOP_KEYS = {
    "site", "regions", "replication", "policies", "hooks", "executor", "operations", "launch",
}  # fmt: skip


def parse_executor(table: Any, file: str) -> ExecutorConfig:
    """``[executor]``: ``kind`` (a string, default ``thread``) and the kind's settings; each
    setting a TOML value (the kind checks its own: ``validate``)."""
    _expect(table, dict, file, "executor")
    kind = table.get("kind", THREAD_EXECUTOR)
    _expect(kind, str, file, "executor.kind")
    if not kind.strip():
        raise ConfigError("must not be empty", file=file, key="executor.kind")
    settings = {k: v for k, v in table.items() if k != "kind"}
    return ExecutorConfig(kind=kind, settings=settings)


def _type_name(value: object) -> str:
    """The TOML name of a value's type, with its article ("a string", "an array")."""
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "an array",
        dict: "a table",
    }.get(type(value), f"a {type(value).__name__}")


def _expect(value: Any, kind: type, file: str, key: str) -> None:
    # bool is an int subclass in Python; TOML keeps them apart, and so do we
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"must be {_type_name(kind())}, got {_type_name(value)} {value!r}",
            file=file,
            key=key,
        )


def _region_ref(text: Any, regions: Mapping[str, RegionConfig], file: str, key: str) -> RegionId:
    _expect(text, str, file, key)
    if text in regions:
        return regions[text].id
    matches = [r.id for r in regions.values() if r.id.name == text]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(regions)) or "none"
    raise ConfigError(f"unknown region {text!r} (regions: {known})", file=file, key=key)


def _duration(value: Any, file: str, key: str) -> timedelta:
    _expect(value, str, file, key)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file, key=key) from None


def _hook_command(value: Any, file: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError("must not be empty", file=file, key=key)
        return ("/bin/sh", "-c", value)
    if isinstance(value, list):
        if not value:
            raise ConfigError("must not be an empty array", file=file, key=key)
        for i, arg in enumerate(value):
            if not isinstance(arg, str):
                raise ConfigError(
                    f"must be an array of strings, got {_type_name(arg)} {arg!r} at [{i}]",
                    file=file,
                    key=key,
                )
        if not value[0]:
            raise ConfigError("the program (first element) must not be empty", file=file, key=key)
        return tuple(value)
    raise ConfigError(
        f"must be a string (run by /bin/sh) or an array (an argv), got {_type_name(value)}",
        file=file,
        key=key,
    )


def parse_hooks(table: Any, file: str) -> dict[str, HookConfig]:
    """The ``[hooks.NAME]`` tables of a site file; :class:`ConfigError` names the key."""
    _expect(table, dict, file, "hooks")
    hooks: dict[str, HookConfig] = {}
    for name, body in table.items():
        key = f"hooks.{name}"
        if not _HOOK_NAME.fullmatch(name):
            raise ConfigError(
                "a hook name starts with a letter and has only letters, digits, '_', '.' and "
                "'-' (at most 63 characters)",
                file=file,
                key=key,
            )
        if name in BUILTIN_HOOKS or name.lower() == "none":
            raise ConfigError(
                f"{name!r} is {'a built-in hook' if name in BUILTIN_HOOKS else 'reserved'}; "
                "give yours another name",
                file=file,
                key=key,
            )
        _expect(body, dict, file, key)
        for k in body:
            if k not in _HOOK_KEYS:
                raise ConfigError(
                    f"unknown key (expected {', '.join(_HOOK_KEYS)})", file=file, key=f"{key}.{k}"
                )
        if "before" not in body and "after" not in body:
            raise ConfigError("needs a before or an after command (or both)", file=file, key=key)
        timeout = DEFAULT_HOOK_TIMEOUT
        if "timeout" in body:
            _expect(body["timeout"], str, file, f"{key}.timeout")
            try:
                timeout = parse_duration(body["timeout"], bare_unit="s")
            except ValueError as exc:
                raise ConfigError(str(exc), file=file, key=f"{key}.timeout") from None
        hooks[name] = HookConfig(
            name=name,
            before=_hook_command(body["before"], file, f"{key}.before")
            if "before" in body
            else None,
            after=_hook_command(body["after"], file, f"{key}.after") if "after" in body else None,
            timeout=timeout,
            source=file,
        )
    return hooks


def parse_site(
    data: Mapping[str, Any],
    *,
    source: str = "<memory>",
    base_dir: Path | None = None,
    registry: ProviderRegistry | None = None,
) -> SiteConfig:
    """Validate parsed TOML into a :class:`SiteConfig`. With a ``registry``, each region's
    provider must be registered and its settings are checked against the provider."""
    base = base_dir if base_dir is not None else Path.cwd()
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"unknown key (expected one of: {', '.join(sorted(_TOP_KEYS))})",
                file=source,
                key=key,
            )

    site_table = data.get("site", {})
    _expect(site_table, dict, source, "site")
    site_values: dict[str, Any] = {}
    for key, value in site_table.items():
        kind = _SITE_KEYS.get(key)
        if kind is None:
            raise ConfigError(
                f"unknown key (expected one of: {', '.join(sorted(_SITE_KEYS))})",
                file=source,
                key=f"site.{key}",
            )
        _expect(value, kind, source, f"site.{key}")
        site_values[key] = value

    policies_table = data.get("policies", {})
    _expect(policies_table, dict, source, "policies")
    policies: dict[str, str] = {}
    for name, value in policies_table.items():
        _expect(value, str, source, f"policies.{name}")
        policies[name] = value

    hooks = parse_hooks(data.get("hooks", {}), source)
    operations = parse_operations(data.get("operations", {}), source)
    executor = parse_executor(data.get("executor", {}), source)

    regions_table = data.get("regions", {})
    _expect(regions_table, dict, source, "regions")
    if not regions_table:
        raise ConfigError("no regions defined", file=source, key="regions")
    regions: dict[str, RegionConfig] = {}
    for rid_text, table in regions_table.items():
        rkey = f'regions."{rid_text}"'
        try:
            rid = RegionId.parse(rid_text)
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, key=rkey) from None
        _expect(table, dict, source, rkey)
        settings = {k: v for k, v in table.items() if k not in SERVICES}
        services: dict[str, ServiceConfig] = {}
        for svc in SERVICES:
            override = table.get(svc)
            if override is None:
                services[svc] = ServiceConfig(rid.provider, settings)
                continue
            _expect(override, dict, source, f"{rkey}.{svc}")
            provider = override.get("provider", rid.provider)
            _expect(provider, str, source, f"{rkey}.{svc}.provider")
            svc_settings = {k: v for k, v in override.items() if k != "provider"}
            if provider == rid.provider:
                svc_settings = {**settings, **svc_settings}
            services[svc] = ServiceConfig(provider, svc_settings)
        overridden = frozenset(svc for svc in SERVICES if svc in table)
        if settings and all(services[svc].provider != rid.provider for svc in SERVICES):
            raise ConfigError(
                f"every service is overridden with another provider, so these settings "
                f"are unused: {', '.join(sorted(settings))}",
                file=source,
                key=rkey,
            )
        regions[str(rid)] = RegionConfig(
            id=rid,
            settings=settings,
            services=services,
            base_dir=base,
            source=source,
            overridden=overridden,
        )

    short_names: dict[str, int] = {}
    for rid_text in regions:
        short = RegionId.parse(rid_text).name
        short_names[short] = short_names.get(short, 0) + 1

    replication_list = data.get("replication", [])
    _expect(replication_list, list, source, "replication")
    replication: list[Replication] = []
    for i, item in enumerate(replication_list):
        key = f"replication[{i}]"
        _expect(item, dict, source, key)
        for k in item:
            if k not in {"from", "to", "copy_retention"}:
                raise ConfigError(
                    "unknown key (expected from, to, copy_retention)",
                    file=source,
                    key=f"{key}.{k}",
                )
        if "from" not in item:
            raise ConfigError("missing (the source region)", file=source, key=f"{key}.from")
        src = _region_ref(item["from"], regions, source, f"{key}.from")
        to = item.get("to")
        if isinstance(to, str):
            to = [to]
        if not isinstance(to, list) or not to:
            raise ConfigError(
                "must name one region or a non-empty array of regions", file=source, key=f"{key}.to"
            )
        dests = tuple(_region_ref(t, regions, source, f"{key}.to") for t in to)
        if src in dests:
            raise ConfigError(
                f"a region cannot replicate to itself ({src})", file=source, key=f"{key}.to"
            )
        keep = item.get("copy_retention")
        replication.append(
            Replication(
                source=src,
                destinations=dests,
                copy_retention=None
                if keep is None
                else _duration(keep, source, f"{key}.copy_retention"),
            )
        )

    kwargs: dict[str, Any] = {}
    for key in ("tag_interval", "schedule_interval"):
        if key in site_values:
            kwargs[key] = _duration(site_values.pop(key), source, f"site.{key}")
    if "state_dir" in site_values:
        state = Path(site_values.pop("state_dir")).expanduser()
        kwargs["state_dir"] = state if state.is_absolute() else base / state
    else:
        kwargs["state_dir"] = base / ".regionvault"
    for key in (
        "tag_key",
        "copy_to_tag_key",
        "copy_retention_tag_key",
        "hook_tag_key",
        "default_policy",
    ):
        if key in site_values and not site_values[key].strip():
            raise ConfigError("must not be empty", file=source, key=f"site.{key}")
    site = SiteConfig(
        name=site_values.pop("name", "regionvault"),
        regions=regions,
        replication=tuple(replication),
        policies=policies,
        hooks=hooks,
        executor=executor,
        operations=operations,
        launch=parse_launch(data.get("launch", {}), regions, source),
        source=source,
        **site_values,
        **kwargs,
    )
    check_site_policies(site)
    check_operations_config(site.operations, site.policies, source)
    if registry is not None:
        validate_providers(site, registry)
    return site


def _health_timeout(value: Any, source: str, key: str) -> timedelta:
    _expect(value, str, source, key)
    try:
        timeout = parse_duration(value, bare_unit="s")
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key=key) from None
    return timeout


def parse_launch(table: Any, regions: Mapping[str, RegionConfig], source: str) -> LaunchConfig:
    """``[launch]``: ``health_timeout`` (a duration, ``"15m"``), and per region
    ``[launch.regions."<region>"] health_timeout``."""
    _expect(table, dict, source, "launch")
    for key in table:
        if key not in ("health_timeout", "regions"):
            raise ConfigError(
                "unknown key (expected health_timeout, regions)", file=source, key=f"launch.{key}"
            )
    default = (
        _health_timeout(table["health_timeout"], source, "launch.health_timeout")
        if "health_timeout" in table
        else None
    )
    by_region: dict[str, timedelta] = {}
    regions_table = table.get("regions", {})
    _expect(regions_table, dict, source, "launch.regions")
    for ref, body in regions_table.items():
        key = f'launch.regions."{ref}"'
        rid = _region_ref(ref, regions, source, key)
        _expect(body, dict, source, key)
        for k in body:
            if k != "health_timeout":
                raise ConfigError(
                    "unknown key (expected health_timeout)", file=source, key=f"{key}.{k}"
                )
        if "health_timeout" in body:
            by_region[str(rid)] = _health_timeout(
                body["health_timeout"], source, f"{key}.health_timeout"
            )
    return LaunchConfig(health_timeout=default, region_health_timeouts=by_region)


def parse_operations(table: object, source: str) -> OperationsConfig:
    """``[operations]``: string values are the site's defaults, tables the refinements of
    named policies (``[operations.gold]``); the values are checked by
    :func:`~regionvault.core.operations.check_operations_config`."""
    _expect(table, dict, source, "operations")
    assert isinstance(table, dict)
    defaults: dict[str, str] = {}
    by_policy: dict[str, dict[str, str]] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            sub: dict[str, str] = {}
            for sub_key, sub_value in value.items():
                _expect(sub_value, str, source, f"operations.{key}.{sub_key}")
                sub[sub_key] = sub_value
            by_policy[key] = sub
        else:
            _expect(value, str, source, f"operations.{key}")
            defaults[key] = value
    return OperationsConfig(defaults=defaults, by_policy=by_policy)


def validate_providers(site: SiteConfig, registry: ProviderRegistry) -> None:
    """Each service's provider is registered and its settings are the ones it knows."""
    for region in site.regions.values():
        for svc, cfg in region.services.items():
            key_prefix = region.key() if cfg.provider == region.provider else region.key(svc)
            if cfg.provider not in registry:
                known = ", ".join(registry.names()) or "none"
                raise ProviderNotFound(
                    f"unknown provider {cfg.provider!r} (registered: {known}; "
                    "is its plugin installed?)",
                    file=site.source,
                    key=key_prefix if cfg.provider == region.provider else f"{key_prefix}.provider",
                    region=region.name,
                )
            cls = registry.cls(cfg.provider)
            allowed = cls.required_settings | cls.optional_settings
            for req in sorted(cls.required_settings):
                if req not in cfg.settings:
                    raise ConfigError(
                        f"missing (the {cfg.provider} provider needs it for {svc})",
                        file=site.source,
                        key=f"{key_prefix}.{req}",
                        region=region.name,
                    )
            for have in cfg.settings:
                if have not in allowed:
                    raise ConfigError(
                        f"unknown setting for the {cfg.provider} provider "
                        f"(known: {', '.join(sorted(allowed)) or 'none'})",
                        file=site.source,
                        key=f"{key_prefix}.{have}",
                        region=region.name,
                    )
            registry.get(cfg.provider).validate(region.for_service(svc))
    check_region_claims(site, registry, compute=False)


#: the commands that back up or label instances: a site whose regions' settings say they list
#: the same instances is refused for these (:func:`check_region_claims`), and loads with a
#: warning line for every other command (status, points, restore, ...)
CLAIMING_COMMANDS = frozenset({"tick", "run", "backup", "tag"})


def compute_overlaps(site: SiteConfig, registry: ProviderRegistry) -> list[ConfigError]:
    """One error per pair of regions of ``site`` whose :class:`ComputeScope` overlap (two
    regions on one cloud region, one of them whole or both on one zone: each would back up
    each instance there), naming both on one line, in site order."""
    scopes: list[tuple[RegionConfig, ComputeScope]] = []
    found: list[ConfigError] = []
    for region in site.regions.values():
        view = region.for_service("compute")
        scope = registry.get(region.services["compute"].provider).compute_scope(view)
        if scope is None:
            continue
        for other, claimed in scopes:
            if scope.overlaps(claimed):
                advice = (
                    "give each region its own availability zone"
                    if scope.zone and claimed.zone
                    else "give each region its own availability zone, cloud region or "
                    "credentials, or merge them"
                )
                found.append(
                    ConfigError(
                        f'regions "{other.name}" and "{region.name}" both list the instances '
                        f"of {scope if scope.zone else claimed}: each instance would be "
                        f"backed up twice ({advice})",
                        file=site.source,
                        key=region.key(),
                        region=region.name,
                    )
                )
        scopes.append((region, scope))
    return found


def check_region_claims(
    site: SiteConfig, registry: ProviderRegistry, *, compute: bool = True
) -> None:
    """No two regions of ``site`` claim one thing: one repository, inbox or key
    (:meth:`Provider.exclusive_spaces`), and with ``compute`` the instances of one zone
    (:func:`compute_overlaps`). :class:`ConfigError` names both regions, on one line.

    Loading a site checks the spaces alone (a site that loaded before zone regions existed
    still loads); the commands of :data:`CLAIMING_COMMANDS` check the instances too."""
    if compute:
        overlaps = compute_overlaps(site, registry)
        if overlaps:
            raise overlaps[0]
    spaces: list[tuple[RegionConfig, str, str]] = []
    for region in site.regions.values():
        for svc in ("vault", "keys"):
            provider = registry.get(region.services[svc].provider)
            for label, space in provider.exclusive_spaces(region.for_service(svc), svc).items():
                for other, other_label, held in spaces:
                    if other is not region and (space.startswith(held) or held.startswith(space)):
                        raise ConfigError(
                            f'regions "{other.name}" and "{region.name}" share one '
                            f"{label if label == other_label else f'{other_label}/{label}'} "
                            f"({min(space, held, key=len).rstrip('#')}): every region needs "
                            "its own repository, inbox and key",
                            file=site.source,
                            key=region.key(),
                            region=region.name,
                        )
                spaces.append((region, label, space))


def find_site_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--site``, then ``$REGIONVAULT_SITE``, then ``./site.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("REGIONVAULT_SITE")
    if env:
        return Path(env)
    return Path("site.toml")


def load_site(
    path: str | os.PathLike[str] | None = None, *, registry: ProviderRegistry | None = None
) -> SiteConfig:
    """Read and validate a site file (see :func:`find_site_file` for which one)."""
    file = find_site_file(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "site file not found (give --site, set REGIONVAULT_SITE, or run `regionvault init`)",
            file=str(file),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=str(file)) from None
    return parse_site(data, source=str(file), base_dir=file.resolve().parent, registry=registry)
