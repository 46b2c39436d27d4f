"""Parameter types that know the site: a region (checked against the site's regions, so a
wrong ``--region`` is a usage error naming the known ones), an instance and a recovery point,
each completing from the site in the shell (click's ``_REGIONVAULT_COMPLETE``).

The root group gives these types to every command's parameters as it loads them
(:func:`attach_site_types`), whichever module or plugin defined the command: an option or
argument whose metavar is ``REGION`` is a region, an argument named ``instance`` (or an option
whose metavar is ``INSTANCE`` or ``NAME|ID``) an instance, an argument named ``point``,
``old`` or ``new`` a recovery point. Only plain string parameters are given a type: one with
a type of its own keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click
from click.shell_completion import CompletionItem
from regionvault.core.errors import AmbiguousName, ConfigError, RegionVaultError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from regionvault.core.site import Site
    from regionvault.core.types import RecoveryPoint

__all__ = [
    "InstanceParam",
    "PointParam",
    "RegionParam",
    "attach_site_types",
    "known_regions",
    "points_of",
    "refuse_ambiguous_instance",
    "refuse_conflicts",
]

#: how many completions one <TAB> offers at most (a vault may hold thousands of points)
MAX_COMPLETIONS = 200


@contextlib.contextmanager
def _completion_site(ctx: click.Context) -> Iterator[Site | None]:
    """The site the command line names (``--site``, ``$REGIONVAULT_SITE``, ``./site.toml``),
    opened for completion and closed after; None when it cannot be read: completion then
    offers nothing rather than printing an error into the shell."""
    from regionvault.core.config import find_site_file
    from regionvault.core.site import Site

    root = ctx.find_root()
    try:
        site = Site.load(find_site_file(root.params.get("site_option")))
    except (RegionVaultError, OSError):
        yield None
        return
    try:
        yield site
    finally:
        site.close()


def _items(values: Iterator[tuple[str, str | None]], incomplete: str) -> list[CompletionItem]:
    out: list[CompletionItem] = []
    seen: set[str] = set()
    for value, help_text in values:
        if value.startswith(incomplete) and value not in seen:
            seen.add(value)
            out.append(CompletionItem(value, help=help_text))
            if len(out) >= MAX_COMPLETIONS:
                break
    return out


def known_regions(site: Site) -> str:
    """The site's region ids, for a message: ``local:east, local:west``."""
    return ", ".join(r.name for r in site.regions) or "none"


class RegionParam(click.types.StringParamType):
    """A region id or unique short name, checked against the site when the command line is
    parsed: an unknown or ambiguous one is a usage error (exit 2) naming the known regions.
    A site that cannot be read is not this parameter's error: the value passes, and the
    command reports the site's problem as it would without it."""

    name = "region"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        if not isinstance(value, str) or ctx is None or ctx.resilient_parsing:
            return value
        # the root's CliState (not imported: root imports this module)
        load_site = getattr(ctx.find_root().obj, "site", None)
        if not callable(load_site):
            return value
        try:
            site: Site = load_site()
        except RegionVaultError:
            return value  # the command says what is wrong with the site
        try:
            site.config.region(value)
        except ConfigError as exc:
            if "ambiguous" in exc.message:
                self.fail(f"{exc.message}; give the full id", param, ctx)
            self.fail(f"unknown region {value!r}; known regions: {known_regions(site)}", param, ctx)
        return value

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        with _completion_site(ctx) as site:
            if site is None:
                return []
            shorts = [r.config.id.name for r in site.regions]

            def names() -> Iterator[tuple[str, str | None]]:
                for r in site.regions:
                    yield r.name, r.config.provider
                for r in site.regions:
                    if shorts.count(r.config.id.name) == 1:
                        yield r.config.id.name, r.name

            return _items(names(), incomplete)


class InstanceParam(click.types.StringParamType):
    """An instance id or name; completes with the names and ids of every region's live
    instances (a plain string otherwise: the command resolves it)."""

    name = "instance"

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        with _completion_site(ctx) as site:
            if site is None:
                return []

            def names() -> Iterator[tuple[str, str | None]]:
                for r in site.regions:
                    try:
                        found = list(r.compute.list_instances())
                    except RegionVaultError:
                        continue
                    for inst in found:
                        yield inst.name, f"{inst.id} in {inst.region}"
                        yield inst.id, f"{inst.name} in {inst.region}"

            return _items(names(), incomplete)


class PointParam(click.types.StringParamType):
    """A recovery point id (or unique prefix); completes with the ids of the points in every
    region's vault that has a repository (none is created)."""

    name = "point"

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        from regionvault.core.pipeline import Engine

        with _completion_site(ctx) as site:
            if site is None:
                return []
            engine = Engine(site)

            def ids() -> Iterator[tuple[str, str | None]]:
                for r in site.regions:
                    try:
                        points = engine.points(r.name)
                    except RegionVaultError:
                        continue
                    for p in points:
                        yield p.id, f"{p.instance_name} in {p.region}"

            return _items(ids(), incomplete)


_REGION = RegionParam()
_INSTANCE = InstanceParam()
_POINT = PointParam()

#: how a parameter is recognised: its metavar, or an argument's name
_BY_METAVAR: dict[str, click.types.StringParamType] = {
    "REGION": _REGION,
    "INSTANCE": _INSTANCE,
    "NAME|ID": _INSTANCE,
    "ID|NAME": _INSTANCE,
}
_ARGUMENTS: dict[str, click.types.StringParamType] = {
    "instance": _INSTANCE,
    "point": _POINT,
    "old": _POINT,
    "new": _POINT,
}


def _site_type(param: click.Parameter) -> click.types.StringParamType | None:
    if param.metavar in _BY_METAVAR:
        return _BY_METAVAR[param.metavar]
    if isinstance(param, click.Argument) and param.name in _ARGUMENTS:
        return _ARGUMENTS[param.name]
    return None


def attach_site_types(command: click.Command) -> None:
    """Give ``command``'s (and its subcommands') plain string region, instance and point
    parameters the types above. Idempotent."""
    todo: list[click.Command] = [command]
    seen: set[int] = set()
    while todo:
        cmd = todo.pop()
        if id(cmd) in seen:
            continue
        seen.add(id(cmd))
        for param in cmd.params:
            kind = _site_type(param)
            if kind is not None and type(param.type) is click.types.StringParamType:
                param.type = kind
        if isinstance(cmd, click.Group):
            todo.extend(cmd.commands.values())


def refuse_conflicts(why: str, **given: object) -> None:
    """A usage error when more than one of ``given`` (option names, ``_`` for ``-``, mapped
    to their values) is set, saying ``why`` they exclude each other: no option is ignored
    silently."""
    chosen = ["--" + name.replace("_", "-") for name, value in given.items() if value]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} cannot be used together: {why}")


def points_of(points: Iterable[RecoveryPoint], instance: str | None) -> list[RecoveryPoint]:
    """The points of ``instance`` (its id or its name, as the points recorded them, so an
    instance since terminated or removed is still found), or all of them."""
    return [p for p in points if instance is None or instance in (p.instance_id, p.instance_name)]


def refuse_ambiguous_instance(points: Iterable[RecoveryPoint], instance: str | None) -> None:
    """:class:`AmbiguousName` when ``instance`` is no point's instance id but the name of
    several instances among ``points`` (one name in two regions: a copy keeps its source's
    instance), listing their ids, as ``backup NAME`` refuses it: never a silent merge."""
    if instance is None:
        return
    points = list(points)
    if any(p.instance_id == instance for p in points):
        return
    named: dict[str, set[str]] = {}
    for p in points:
        if p.instance_name == instance:
            named.setdefault(p.instance_id, set()).add(p.region)
    if len(named) > 1:
        listed = ", ".join(
            f"{ident} (points in {', '.join(sorted(regions))})"
            for ident, regions in sorted(named.items())
        )
        raise AmbiguousName(f"{instance!r} matches {len(named)} instances: {listed}; give the id")
