"""The root group :data:`cli`, what every command shares (:class:`CliState`), the one-line
error (:class:`ExpectedError`) and the process's entry point :func:`main`.

The group defines no command of its own: it takes them from the ``regionvault.cli``
entry-point group (:mod:`regionvault.core.cli.entrypoints`), looking each one up only when
it is asked for, so ``regionvault backup`` imports the backup commands alone and
``--help`` imports only what the listing needs."""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.entrypoints import (
    CommandLoadError,
    CommandSource,
    clash_message,
    find_command_sources,
    shadowed_message,
)
from regionvault.core.cli.interrupts import EXIT_INTERRUPTED
from regionvault.core.cli.params import attach_site_types
from regionvault.core.config import find_site_file
from regionvault.core.errors import RegionVaultError

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.pipeline.metrics import Metrics
    from regionvault.core.site import Site

__all__ = [
    "EXIT_INCOMPLETE",
    "CliState",
    "ExpectedError",
    "RegionVaultGroup",
    "cli",
    "hoist_global_options",
    "main",
    "one_line",
    "pass_state",
]

#: the exit status of a command that did its work but not whole (see the package docstring)
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


class UnavailableCommand(click.Command):
    """Stands in for a command that cannot be used (its entry point does not load, or two
    entry points claim its name): listed in ``--help`` with the reason, and any use of it,
    whatever its arguments (``--help`` too), fails with that reason in one line."""

    def __init__(self, name: str, reason: str, summary: str) -> None:
        super().__init__(
            name,
            help=reason,
            short_help=f"(unavailable: {summary})",
            add_help_option=False,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )
        self.reason = reason

    def invoke(self, ctx: click.Context) -> Any:
        raise ExpectedError(self.reason)


# --------------------------------------------------------------------------- the group

#: where the root context keeps the command sources it found (one look-up per command line)
_SOURCES_KEY = "regionvault.cli.sources"
#: the command names whose ignored plugin claims were already named in this command line
_WARNED_KEY = "regionvault.cli.warned"


class RegionVaultGroup(click.Group):
    """The root group: its commands come from the ``regionvault.cli`` entry-point group
    (and any :meth:`add_command` of an embedder); turns expected errors into exit 1."""

    def _sources(self, ctx: click.Context) -> dict[str, list[CommandSource]]:
        # looked up once per command line, not once per process: a test (or an embedder)
        # that installs a distribution sees its commands in the next invocation
        meta = ctx.find_root().meta
        if _SOURCES_KEY not in meta:
            sources = find_command_sources()
            for name, command in self.commands.items():
                sources.setdefault(name, []).append(CommandSource.added(name, command))
            for claims in sources.values():
                if len(claims) > 1:  # a clash: the same message whatever the order of sys.path
                    claims.sort(key=lambda claim: claim.origin)
            meta[_SOURCES_KEY] = sources
        found: dict[str, list[CommandSource]] = meta[_SOURCES_KEY]
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._sources(ctx))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        claims = self._sources(ctx).get(cmd_name)
        if not claims:
            return None
        built_in = [claim for claim in claims if claim.built_in]
        if len(claims) > 1 and len(built_in) == 1:
            # a plugin claiming a built-in's name: the built-in runs (no installed package
            # can take restore away mid-incident), and the plugin's claim is named once
            warned = ctx.find_root().meta.setdefault(_WARNED_KEY, set())
            if cmd_name not in warned:
                warned.add(cmd_name)
                ignored = [claim for claim in claims if not claim.built_in]
                click.echo(f"regionvault: warning: {shadowed_message(cmd_name, ignored)}", err=True)
            claims = built_in
        if len(claims) > 1:
            # two plugins claim the name: neither wins silently
            owners = " and ".join(claim.owner for claim in claims)
            return UnavailableCommand(
                cmd_name, clash_message(cmd_name, claims), f"claimed by {owners}"
            )
        try:
            command = claims[0].load()
        except CommandLoadError as exc:
            return UnavailableCommand(cmd_name, str(exc), exc.summary)
        attach_site_types(command)
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = hoist_global_options(self, ctx, args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegionVaultError as exc:
            _command_failed(ctx, exc)
            raise ExpectedError(str(exc)) from exc
        except click.UsageError:
            raise  # the command never ran: nothing to count
        except click.ClickException as exc:
            _command_failed(ctx, exc)
            raise
        except OSError as exc:
            # the machine said no (disk full, quota, read-only, permissions) somewhere no
            # service turned it into a RegionVaultError: still one line naming the path
            _command_failed(ctx, exc)
            if exc.strerror is None:
                raise
            paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
            raise ExpectedError(": ".join([*paths, exc.strerror])) from exc
        except Exception as exc:
            _command_failed(ctx, exc)  # a bug: still a failed command in the metrics
            raise
        except KeyboardInterrupt:
            # Ctrl-C outside a command's own handling (restore, verify, status, a site's
            # load): 130 as shells expect, not click's "Aborted!" and 1; every vault is
            # made to survive a stop at any point (docs/format.md)
            click.echo("\nregionvault: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


# --------------------------------------------------------------------------- global options
# The root group's own options (--site, --metrics-dir, -q/-v, ...) are also accepted after the
# subcommand: they are moved before it, so the root group parses them as its own. Where a
# token after the subcommand means is decided with that command's own options: the value of
# one of its options (`--name --site`) is never moved, nor an option the command defines
# itself, nor anything after `--`.


def _root_options(group: click.Group) -> tuple[dict[str, bool], set[str]]:
    """The root's movable options, each name mapped to whether it takes a value, and its
    one-letter flags (``-v``), which may come combined (``-vv``). Eager options (--help,
    --version) stay where they are: after a subcommand, --help is the subcommand's."""
    takes_value: dict[str, bool] = {}
    short_flags: set[str] = set()
    for param in group.params:
        if not isinstance(param, click.Option) or param.is_eager:
            continue
        flag = param.is_flag or param.count
        for opt in (*param.opts, *param.secondary_opts):
            takes_value[opt] = not flag
            if flag and len(opt) == 2 and opt[0] == "-" and opt[1] != "-":
                short_flags.add(opt[1])
    return takes_value, short_flags


def _command_options(command: click.Command) -> tuple[set[str], set[str]]:
    """Every option name of ``command`` and its subcommands, and those that take a value."""
    names: set[str] = set()
    valued: set[str] = set()
    todo = [command]
    while todo:
        cmd = todo.pop()
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            opts = (*param.opts, *param.secondary_opts)
            names.update(opts)
            if not (param.is_flag or param.count):
                valued.update(param.opts)
        if isinstance(cmd, click.Group):
            todo.extend(cmd.commands.values())
    return names, valued


def hoist_global_options(group: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with the root's options given after the subcommand moved in front of it (in
    their order, so that one given in both places takes the later value, as click does)."""
    takes_value, short_flags = _root_options(group)
    # the subcommand: the first token that is neither a root option nor its value
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--" or not token.startswith("-") or token == "-":
            break
        name = token.split("=", 1)[0]
        i += 2 if takes_value.get(name) and "=" not in token else 1
    if i >= len(args) or args[i] == "--":
        return args
    command = group.get_command(ctx, args[i])
    if command is None:
        return args  # click says the command is unknown
    own, valued = _command_options(command)
    head, rest = args[: i + 1], args[i + 1 :]
    moved: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        token = rest[j]
        if token == "--":
            kept.extend(rest[j:])
            break
        name = token.split("=", 1)[0]
        if name in own:
            kept.append(token)
            if name in valued and "=" not in token and j + 1 < len(rest):
                kept.append(rest[j + 1])
                j += 1
        elif name in takes_value:
            moved.append(token)
            if takes_value[name] and "=" not in token and j + 1 < len(rest):
                moved.append(rest[j + 1])
                j += 1
        elif (
            len(token) > 2
            and token[0] == "-"
            and token[1] != "-"
            and set(token[1:]) <= short_flags
            and not any(f"-{c}" in own for c in token[1:])
        ):
            moved.append(token)  # combined one-letter flags: -vv
        else:
            kept.append(token)
        j += 1
    if not moved:
        return args
    return [*head[:-1], *moved, head[-1], *kept]


# --------------------------------------------------------------------------- shared state


@dataclass
class CliState:
    """What every command shares: which site file, and the site once loaded."""

    site_option: Path | None = None
    _site: Site | None = field(default=None, repr=False)
    #: ``--metrics-dir`` / ``$REGIONVAULT_METRICS_DIR``: write ``regionvault.prom`` there
    metrics_dir: Path | None = None
    #: the command being run (its name), which decides how its metrics count jobs
    command: str | None = None
    _metrics: Metrics | None = field(default=None, repr=False)
    _failed: bool = field(default=False, repr=False)

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
            self._check_claims(self._site)
            if _freeze_after_load:
                # What start-up made (modules, classes, the site just loaded) lives until the
                # process ends: keep the collector from walking it again in every later
                # collection, and in the several at exit (20 to 40 ms off a 1.2 s restore).
                gc.freeze()
        return self._site

    def _check_claims(self, site: Site) -> None:
        """Two regions whose settings say they list the same instances: refused for the
        commands that back up (:data:`~regionvault.core.config.CLAIMING_COMMANDS`), a warning
        line for the others, so that a site that loaded before zone regions still loads."""
        from regionvault.core.config import CLAIMING_COMMANDS, compute_overlaps

        overlaps = compute_overlaps(site.config, site.registry)
        if overlaps and self.command in CLAIMING_COMMANDS:
            raise overlaps[0]
        for overlap in overlaps:
            click.echo(f"regionvault: warning: {one_line(str(overlap))}", err=True)

    def engine(self, **options: Any) -> Engine:
        """An :class:`Engine` over the site (``options`` go to its constructor)."""
        from regionvault.core.pipeline import Engine

        engine = Engine(self.site(), **options)
        if self.metrics_dir is not None or self._metrics is not None:
            self._attach_metrics(engine)
        return engine

    # -- metrics (docs/metrics.md) ---------------------------------------------------------

    def metrics(self) -> Metrics:
        """This command's metrics (made on first use), attached to its engine when the
        command makes one: ``tick`` and ``run`` count the jobs of their ticks, any other
        command the steps it runs."""
        if self._metrics is None:
            from regionvault.core.pipeline.metrics import Metrics

            self._metrics = Metrics(one_shot=self.command not in ("tick", "run"))
        return self._metrics

    def _attach_metrics(self, engine: Engine) -> None:
        metrics = self.metrics()
        if metrics.attached:
            return  # the command's first engine is the one counted and read
        metrics.attach(engine)
        for warning in metrics.take_warnings():  # a plugin's metrics hook that failed
            click.echo(f"regionvault: warning: {one_line(warning)}", err=True)
        # runs before the site closes (callbacks run last first): the status is read then
        click.get_current_context().find_root().call_on_close(metrics.detach)

    def job_failed(self, kind: str, region: str) -> None:
        """A job of this command's in ``region`` failed where no hook counts it."""
        if self._metrics is not None:
            self._metrics.job_failed(kind, region)

    def write_metrics(self, *, final: bool = True) -> None:
        """``regionvault.prom`` in ``--metrics-dir`` (nothing without it): at the end of the
        command (``final``), and after each of ``run``'s ticks. A failure to write fails a
        command that succeeded; after a failed one, or between ticks, or when another
        writer held the file too long, it is a warning."""
        if self.metrics_dir is None:
            return
        from regionvault.core.pipeline.metrics import MetricsBusyError

        try:
            _, warning = self.metrics().write_textfile(self.metrics_dir)
        except (OSError, RegionVaultError) as exc:
            message = f"metrics not written to {self.metrics_dir}: {exc}"
            if self._failed or not final or isinstance(exc, MetricsBusyError):
                click.echo(f"regionvault: warning: {one_line(message)}", err=True)
                return
            raise ExpectedError(message) from exc
        if warning is not None:
            click.echo(f"regionvault: warning: {one_line(warning)}", err=True)


def _command_failed(ctx: click.Context, error: BaseException) -> None:
    """A command failed: its metrics count it (docs/metrics.md) and its textfile is still
    written."""
    state = ctx.obj
    if not isinstance(state, CliState):
        return
    state._failed = True
    if state._metrics is not None:
        state._metrics.command_failed(state.command, error)


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
@click.option(
    "--metrics-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="REGIONVAULT_METRICS_DIR",
    default=None,
    metavar="DIR",
    help="Write Prometheus metrics to DIR/regionvault.prom when the command ends (the "
    "textfile collector's format; counters carried over from the file). "
    "Default: $REGIONVAULT_METRICS_DIR.",
)
@click.version_option(package_name="regionvault", prog_name="regionvault")
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    callback=lambda ctx, param, value: _verbosity(ctx, quiet=value),
    expose_value=False,
    help="No progress and no summaries on standard error: warnings and errors only.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    callback=lambda ctx, param, value: _verbosity(ctx, verbose=value),
    expose_value=False,
    help="Show INFO logs on standard error (timestamped, ISO 8601 UTC).",
)
@click.pass_context
def cli(ctx: click.Context, site_option: Path | None, metrics_dir: Path | None) -> None:
    """regionvault: encrypted, tag-driven, cross-region backups.

    Every command reads one site file (regions, replication pairs, policies):
    --site PATH, else $REGIONVAULT_SITE, else ./site.toml. Start with `regionvault init`.

    Exit status: 0 ok, 1 error (one line on standard error), 2 usage error, 3 incomplete
    (a recovery point was committed that names entries it could not take whole).
    """
    state = ctx.obj = CliState(
        site_option=site_option, metrics_dir=metrics_dir, command=ctx.invoked_subcommand
    )
    if metrics_dir is not None:
        state.metrics()  # made now, so that even a failure before the site loads is counted
        ctx.call_on_close(state.write_metrics)  # runs last: after the site closed


# --------------------------------------------------------------------------- -q / -v

_VERBOSITY_KEY = "regionvault.cli.verbosity"


def _verbosity(ctx: click.Context, *, quiet: bool = False, verbose: bool = False) -> None:
    """``-q`` / ``-v`` as they are parsed: both at once is a usage error."""
    from regionvault.core.cli.output import set_verbosity

    chosen = ctx.find_root().meta.setdefault(_VERBOSITY_KEY, {})
    chosen["quiet"] = chosen.get("quiet", False) or quiet
    chosen["verbose"] = chosen.get("verbose", False) or verbose
    if chosen["quiet"] and chosen["verbose"]:
        raise click.UsageError("-q/--quiet and -v/--verbose cannot be used together")
    set_verbosity(quiet=chosen["quiet"], verbose=chosen["verbose"])


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
