"""The ``regionvault`` command.

Layout for later commands: this module holds the root group :data:`cli`, the shared state
(:class:`CliState`, :data:`pass_state`), output helpers (:func:`json_option`,
:func:`print_table`, :func:`print_json`) and :func:`resolve_instance`. A command lives in its
own module, imports :data:`cli` and decorates itself onto it::

    # core/cli_backup.py
    from regionvault.core.cli import cli, pass_state

    @cli.command()
    @click.argument("instance")
    @pass_state
    def backup(state: CliState, instance: str) -> None: ...

and its module name is added to :data:`COMMAND_MODULES`, which the root group imports the
first time it is asked for its commands (so ``--help`` and ``CliRunner`` see them too).

Exit codes: 0 ok; 1 for an expected error (any :class:`RegionVaultError`, printed as one line
``regionvault: error: ...`` on standard error, without a traceback; nothing is committed); 2
for a usage error; 3 (:data:`EXIT_INCOMPLETE`) when the command did its work but not whole: a
recovery point was committed that names entries the capture could not take whole (unreadable,
vanished, or changed while it was read), each named on standard error as
``regionvault: warning: <path>: <message>`` (the first few, then ``... and N more``), and
recorded in the point (``backup``; ``tick`` and ``run`` when one of their backups was, and no
step failed).
"""

from __future__ import annotations

import gc
import importlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from regionvault.core.config import SERVICES, find_site_file
from regionvault.core.errors import (
    ConfigError,
    RegionVaultError,
)
from regionvault.core.types import Capabilities, Instance, Tags

if TYPE_CHECKING:
    from regionvault.core.site import Region, Site

__all__ = [
    "COMMAND_MODULES",
    "EXIT_INCOMPLETE",
    "CliState",
    "ExpectedError",
    "cli",
    "instance_json",
    "json_option",
    "main",
    "parse_tag_options",
    "pass_state",
    "print_json",
    "print_table",
    "resolve_instance",
    "site_template",
]

#: modules that add commands to :data:`cli`, imported on first use of the group
COMMAND_MODULES: tuple[str, ...] = (
    "regionvault.core.cli.commands",
    "regionvault.plugins.samplenf.demo",
)

F = TypeVar("F", bound=Callable[..., Any])

#: the exit status of a command that did its work but not whole (see the module docstring)
EXIT_INCOMPLETE = 3


# --------------------------------------------------------------------------- errors


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so an error is one line on the terminal."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


class ExpectedError(click.ClickException):
    """A :class:`RegionVaultError` on its way out: one line, exit code 1, no traceback."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"regionvault: error: {one_line(self.format_message())}", err=True)


# --------------------------------------------------------------------------- the group


class RegionVaultGroup(click.Group):
    """The root group: loads command modules lazily, turns expected errors into exit 1."""

    _modules_loaded = False

    def _load_command_modules(self) -> None:
        if not self._modules_loaded:
            self._modules_loaded = True
            for name in COMMAND_MODULES:
                importlib.import_module(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_command_modules()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_command_modules()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegionVaultError as exc:
            raise ExpectedError(str(exc)) from exc
        except OSError as exc:
            # the machine said no (disk full, quota, read-only, permissions) somewhere no
            # service turned it into a RegionVaultError: still one line naming the path
            if exc.strerror is None:
                raise
            paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
            raise ExpectedError(": ".join([*paths, exc.strerror])) from exc


@dataclass
class CliState:
    """What every command shares: which site file, and the site once loaded."""

    site_option: Path | None = None
    _site: Site | None = field(default=None, repr=False)

    @property
    def site_path(self) -> Path:
        """``--site``, then ``$REGIONVAULT_SITE``, then ``./site.toml``."""
        return find_site_file(self.site_option)

    def site(self) -> Site:
        """The loaded site (read and validated on first use, closed when the command ends)."""
        if self._site is None:
            from regionvault.core.site import Site

            self._site = Site.load(self.site_path)
            click.get_current_context().find_root().call_on_close(self._site.close)
            if _freeze_after_load:
                # What start-up made (modules, classes, the site just loaded) lives until the
                # process ends: keep the collector from walking it again in every later
                # collection, and in the several at exit (20 to 40 ms off a 1.2 s restore).
                gc.freeze()
        return self._site


pass_state = click.make_pass_decorator(CliState, ensure=True)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=RegionVaultGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--site",
    "site_option",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="Site file to use. Default: $REGIONVAULT_SITE, then ./site.toml.",
)
@click.version_option(package_name="regionvault", prog_name="regionvault")
@click.pass_context
def cli(ctx: click.Context, site_option: Path | None) -> None:
    """regionvault: encrypted, tag-driven, cross-region backups.

    Every command reads one site file (regions, replication pairs, policies):
    --site PATH, else $REGIONVAULT_SITE, else ./site.toml. Start with `regionvault init`.

    Exit status: 0 ok, 1 error (one line on standard error), 2 usage error, 3 incomplete
    (a recovery point was committed that names entries it could not take whole).
    """
    ctx.obj = CliState(site_option=site_option)


# --------------------------------------------------------------------------- output


def json_option(func: F) -> F:
    """The ``--json`` flag of listing and reporting commands (passed as ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _plain_cell(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    title: str | None = None,
    tty: bool | None = None,
) -> None:
    """A rich table on a terminal; otherwise one line per row, cells separated by tabs,
    without a header line (tabs and line breaks inside a cell are escaped as ``\\t``,
    ``\\n``), for ``cut`` and ``awk``."""
    rows = [list(r) for r in rows]
    if tty is None:
        tty = sys.stdout.isatty()
    if not tty:
        for row in rows:
            click.echo("\t".join(_plain_cell(c) for c in row))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not rows:
        click.echo("(none)")
        return
    table = Table(*headers, title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout).print(table)


def format_tags(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags.items())


def instance_json(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "name": instance.name,
        "region": instance.region,
        "state": instance.state,
        "tags": dict(instance.tags),
        "function": instance.function,
        "capture_kinds": sorted(str(k) for k in instance.capture_kinds),
    }


# --------------------------------------------------------------------------- helpers


def parse_tag_options(values: Iterable[str], *, param_hint: str = "--tag") -> dict[str, str]:
    """``["k=v", ...]`` as a dict; :class:`click.BadParameter` naming a malformed value."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip() or key != key.strip():
            raise click.BadParameter(
                f"{value!r} is not KEY=VALUE (a non-empty key without surrounding spaces)",
                param_hint=param_hint,
            )
        if key in out:
            raise click.BadParameter(f"tag key {key!r} given twice", param_hint=param_hint)
        out[key] = val
    return out


def _tag_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Tags:
    return Tags(parse_tag_options(value))


def resolve_instance(site: Site, ref: str, region: str | None = None) -> Instance:
    """The instance ``ref`` names (an id or a unique name); see :meth:`Site.find_instance`."""
    return site.find_instance(ref, region=region)


# --------------------------------------------------------------------------- init

_SITE_TEMPLATE = """\
# regionvault site configuration, written by `regionvault init`.
# Every key is described in docs/configuration.md. Relative paths are resolved against
# the directory that holds this file.

[site]
# A name for this site, shown in reports.
name = "{name}"
# The policy tag given to instances that have none: "F-R" backs up every F and keeps each
# recovery point for R. Bare numbers are days, so "1-7" is daily, kept 7 days; the units
# m, h, d and w are allowed ("12h-2d"), or a name from [policies]. On an instance, the tag
# value "none" opts it out.
default_policy = "1-7"
# The tag key holding an instance's policy.
tag_key = "backup"
# The tag key naming the regions an instance's recovery points are copied to
# (overrides the replication pairs below for that instance).
copy_to_tag_key = "backup-copy-to"
# The tag key saying how long copies are kept.
copy_retention_tag_key = "backup-copy-keep"
# The tag key naming the hooks run around an instance's capture: "sqlite" (built in), or
# [hooks.NAME] tables below, comma-separated.
hook_tag_key = "backup-hook"
# true: the tagger replaces explicit policy tags with the default; false: never.
overwrite_tags = false
# How often the tagger and the scheduler run: a number with a unit s, m, h, d or w
# (a bare number is days).
tag_interval = "5m"
schedule_interval = "5m"
# Where regionvault keeps its own run state (job records, drill results).
state_dir = ".regionvault"

# Named policies an instance's policy tag may use instead of "F-R":
# [policies]
# gold = "12h-30d"

# Commands run around the capture of the instances whose hook tag names them; a string is
# run by /bin/sh, an array is an argv (docs/hooks.md). The built-in "sqlite" needs none.
# [hooks.quiesce]
# before = "my-nf freeze"
# after = "my-nf thaw"
# timeout = "5m"

# Regions are named "provider:name". A local region keeps its instances, keys and vault
# under its root directory.
[regions."local:east"]
root = "regions/east"

[regions."local:west"]
root = "regions/west"

# One service of a region can come from another provider (see docs/configuration.md):
# [regions."local:west".vault]
# provider = "local"
# root = "/mnt/other-disk/west-vault"

# Replication pairs: every recovery point made in "from" is copied to each region in "to",
# re-encrypted there under that region's own keys.
[[replication]]
from = "local:east"
to = ["local:west"]
# How long copies are kept (default: as long as the source policy keeps the original).
# copy_retention = "30d"
"""


def site_template(name: str = "regionvault") -> str:
    """The starter site.toml that ``regionvault init`` writes."""
    return _SITE_TEMPLATE.format(name=name.replace("\\", "\\\\").replace('"', '\\"'))


@cli.command()
@click.argument(
    "path",
    required=False,
    type=click.Path(path_type=Path),
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@pass_state
def init(state: CliState, path: Path | None, force: bool) -> None:
    """Write a starter site.toml with two local regions.

    The regions are local:east and local:west, with a replication pair east -> west. PATH
    defaults to --site, then $REGIONVAULT_SITE, then ./site.toml; a directory gets a
    site.toml inside it. The regions' roots are regions/east and regions/west next to the
    file. An existing file is left alone unless --force is given.
    """
    target = path if path is not None else state.site_path
    if target.is_dir():
        target = target / "site.toml"
    text = site_template()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w" if force else "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise ConfigError(
            "already exists (pass --force to overwrite it)", file=str(target)
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=str(target)) from None
    click.echo(f"wrote {target} with regions local:east and local:west (east -> west)")
    hint = "" if target == Path("site.toml") else f"--site {target} "
    click.echo(f"next: regionvault {hint}regions", err=True)


# --------------------------------------------------------------------------- regions


def _region_capabilities(site: Site, region: Region) -> Capabilities:
    """The region's capabilities, each taken from the provider of the service it belongs to."""
    caps = {
        svc: site.registry.cls(region.config.services[svc].provider).capabilities
        for svc in SERVICES
    }
    vault, compute, keys = caps["vault"], caps["compute"], caps["keys"]
    return Capabilities(
        worm_lock=vault.worm_lock,
        legal_hold=vault.legal_hold,
        server_side_copy=vault.server_side_copy,
        conditional_put=vault.conditional_put,
        ranged_get=vault.ranged_get,
        capture_kinds=compute.capture_kinds,
        launch=compute.launch,
        register_instance=compute.register_instance,
        key_rotation=keys.key_rotation,
    )


def _capabilities_json(caps: Capabilities) -> dict[str, Any]:
    data = asdict(caps)
    data["capture_kinds"] = sorted(str(k) for k in caps.capture_kinds)
    return data


def _capabilities_summary(caps: Capabilities) -> str:
    words = [
        name for name, value in asdict(caps).items() if value is True and name != "capture_kinds"
    ]
    if caps.capture_kinds:
        words.append("capture=" + "+".join(sorted(str(k) for k in caps.capture_kinds)))
    return " ".join(words) or "-"


@cli.command()
@json_option
@pass_state
def regions(state: CliState, as_json: bool) -> None:
    """List regions with their providers and capabilities.

    For each region: the provider of each service (compute, keys, vault), the capabilities
    that are on, and the regions its recovery points are copied to.

    Columns without a terminal (tab-separated): id, compute, keys, vault, capabilities,
    copies-to.
    """
    site = state.site()
    listed = [(region, _region_capabilities(site, region)) for region in site.regions]
    if as_json:
        print_json(
            [
                {
                    "id": region.name,
                    "provider": region.config.provider,
                    "services": {s: region.config.services[s].provider for s in SERVICES},
                    "capabilities": _capabilities_json(caps),
                    "copies_to": [str(d) for d in site.config.destinations_of(region.config.id)],
                }
                for region, caps in listed
            ]
        )
        return
    print_table(
        ["REGION", "COMPUTE", "KEYS", "VAULT", "CAPABILITIES", "COPIES TO"],
        (
            [
                region.name,
                *(region.config.services[s].provider for s in SERVICES),
                _capabilities_summary(caps),
                ",".join(str(d) for d in site.config.destinations_of(region.config.id)) or "-",
            ]
            for region, caps in listed
        ),
    )


# --------------------------------------------------------------------------- instances


@cli.group(invoke_without_command=True)
@click.option("--region", "-r", metavar="REGION", help="Only this region (id or short name).")
@json_option
@pass_state
@click.pass_context
def instances(ctx: click.Context, state: CliState, region: str | None, as_json: bool) -> None:
    """List instances, or add one with `instances add`.

    Lists the instances of every region, or of one with --region.

    Columns without a terminal (tab-separated): id, name, region, state, tags (k=v,...).
    """
    if ctx.invoked_subcommand is not None:
        if region is not None or as_json:
            raise click.UsageError(
                f"--region and --json before {ctx.invoked_subcommand!r} belong to the listing;"
                f" give them after {ctx.invoked_subcommand!r}"
            )
        return
    site = state.site()
    chosen = [site.region(region)] if region else site.regions
    found = [inst for r in chosen for inst in r.compute.list_instances()]
    if as_json:
        print_json([instance_json(i) for i in found])
        return
    print_table(
        ["ID", "NAME", "REGION", "STATE", "TAGS"],
        ([i.id, i.name, i.region, i.state, format_tags(i.tags)] for i in found),
    )


@instances.command("add")
@click.option(
    "--region", "-r", required=True, metavar="REGION", help="Region to add it to (id or name)."
)
@click.option("--name", "-n", required=True, help="The instance's name.")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="PATH",
    help="Existing directory holding the instance's data.",
)
@click.option(
    "--command", "command", metavar="CMD", help="Command line the instance runs (its function)."
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_tag_callback,
    help="A tag for the instance; repeat for several.",
)
@pass_state
def instances_add(
    state: CliState,
    region: str,
    name: str,
    data: Path,
    command: str | None,
    tags: Tags,
) -> None:
    """Adopt an existing data directory as an instance.

    Prints the new instance's id alone on the last line of standard output.
    """
    if not name.strip():
        raise click.BadParameter("must not be empty", param_hint="--name")
    site = state.site()
    target = site.region(region)
    instance = target.compute.register_instance(
        name, data.resolve(), function=command, tags=dict(tags)
    )
    click.echo(f"added instance {instance.name!r} to {instance.region}", err=True)
    click.echo(instance.id)


# --------------------------------------------------------------------------- entry point


#: set by :func:`main`, the process's own entry point: the site's first load then freezes
#: the objects made so far (:func:`gc.freeze`). Not for a command run inside another
#: program (``CliRunner``, embedding), whose objects are not the command's to freeze.
_freeze_after_load = False


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); always exits."""
    global _freeze_after_load
    _freeze_after_load = True
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="regionvault")
    finally:
        _freeze_after_load = False
