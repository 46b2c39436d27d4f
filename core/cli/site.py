"""The site's commands: ``init`` (a starter site.toml), ``regions``, ``instances`` (and
``instances add``, ``terminate``, ``remove``) and ``status`` (per instance and region:
newest point, RPO, last copy and drill)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option, tags_callback
from regionvault.core.cli.output import (
    echo_err,
    format_tags,
    human_age,
    human_duration,
    instance_json,
    print_json,
    print_table,
    short_ids,
    short_regions,
)
from regionvault.core.cli.root import CliState, one_line, pass_state
from regionvault.core.config import SERVICES
from regionvault.core.errors import ConfigError
from regionvault.core.types import Capabilities, Tags

if TYPE_CHECKING:
    from regionvault.core.pipeline import StatusRow
    from regionvault.core.site import Region, Site
    from regionvault.core.types import Instance

__all__ = ["init", "instances", "regions", "site_template", "status"]


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


@click.command()
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
    """The region's capabilities, each taken from the provider of the service it belongs to,
    as that region's settings configure it."""
    caps = {
        svc: site.registry.get(region.config.services[svc].provider).region_capabilities(
            region.config.for_service(svc)
        )
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
        launch_kinds=compute.launch_kinds,
        register_instance=compute.register_instance,
        key_rotation=keys.key_rotation,
    )


def _capabilities_json(caps: Capabilities) -> dict[str, Any]:
    data = asdict(caps)
    data["capture_kinds"] = sorted(str(k) for k in caps.capture_kinds)
    data["launch_kinds"] = sorted(str(k) for k in caps.launchable_kinds())
    return data


def _capabilities_summary(caps: Capabilities) -> str:
    words = [
        name for name, value in asdict(caps).items() if value is True and name != "capture_kinds"
    ]
    if caps.capture_kinds:
        words.append("capture=" + "+".join(sorted(str(k) for k in caps.capture_kinds)))
    return " ".join(words) or "-"


@click.command()
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


@click.group(invoke_without_command=True)
@click.option("--region", "-r", metavar="REGION", help="Only this region (id or short name).")
@json_option
@pass_state
@click.pass_context
def instances(ctx: click.Context, state: CliState, region: str | None, as_json: bool) -> None:
    """List instances; add, terminate or remove one.

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
    callback=tags_callback,
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
    _warn_if_malformed(site, instance)
    click.echo(instance.id)


def _warn_if_malformed(site: Site, instance: Instance) -> None:
    """The warning ``instances add`` gives for tags the tagger reports as malformed (the
    instance is added all the same: its tags are fixed with the provider's own tools, and
    until then it is not backed up)."""
    from regionvault.core.errors import PolicyError
    from regionvault.core.policy import resolve_policy

    try:
        resolve_policy(instance, site.config)
    except PolicyError as exc:
        echo_err(
            f"regionvault: warning: {one_line(exc.message)}; it is not backed up until "
            "its tags are fixed"
        )


@instances.command("terminate")
@click.argument("instance", metavar="ID|NAME")
@click.option(
    "--region", "-r", metavar="REGION", help="The instance's region (if the name is not unique)."
)
@pass_state
def instances_terminate(state: CliState, instance: str, region: str | None) -> None:
    """Stop an instance for good (by id, or name).

    The provider stops it and removes what it owns: for the local provider, the process a
    `restore --launch` started and the data restored for it (a directory `instances add`
    adopted is never touched). It is no longer listed; its recovery points stay. Prints the
    instance's id on standard output.
    """
    site = state.site()
    found = site.find_instance(instance, region=region)
    site.region(found.region).compute.terminate(found.id)
    echo_err(f"terminated {found.name} ({found.id}) in {found.region}")
    click.echo(found.id)


@instances.command("remove")
@click.argument("instance", metavar="ID|NAME")
@click.option(
    "--region", "-r", metavar="REGION", help="The instance's region (if the name is not unique)."
)
@pass_state
def instances_remove(state: CliState, instance: str, region: str | None) -> None:
    """Forget an instance `instances add` adopted (by id, or name).

    Its registration goes; its data directory and its recovery points stay. An instance a
    restore launched is refused until terminated (terminate stops it and removes its
    restored data), and then remove forgets its record. Providers that do not register
    instances (the clouds: their instances are the cloud's) refuse it; use terminate.
    Prints the instance's id on standard output.
    """
    site = state.site()
    found = site.find_instance(instance, region=region)
    compute = site.region(found.region).compute
    if not _region_capabilities(site, site.region(found.region)).register_instance:
        raise click.UsageError(
            f"{found.region} does not register instances, so there is no registration to "
            f"remove: use `instances terminate {found.id}`"
        )
    compute.unregister_instance(found.id)
    echo_err(f"forgot {found.name} ({found.id}) in {found.region}; its recovery points stay")
    click.echo(found.id)


# --------------------------------------------------------------------------- status


@click.command()
@click.option(
    "--jobs",
    "jobs",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Instead: the N newest finished jobs from the site's job ledger (what ran where, "
    "which runner), read from the store every runner shares (on a terminal, instance names "
    "come from the regions that can be listed).",
)
@json_option
@click.option(
    "--wide",
    is_flag=True,
    help="On a terminal, every column with whole ids and region names (default: the columns "
    "that fit 80 columns).",
)
@pass_state
def status(state: CliState, jobs: int | None, as_json: bool, wide: bool) -> None:
    """Every instance of every region with its protection state, worst first: failing (its
    last backup job failed), malformed (a policy or operations tag that does not parse),
    late, due, not_backed_up, gone (no longer an instance; its points remain), opted_out,
    protected; with why, the newest recovery point and its age (RPO), last copy, last
    restore drill and its RTO, and whether the RPO and RTO objectives are met, at risk or
    breached. Regions holding copies have rows of their own (role copy). A region with no
    instances and no recovery points is shown once, with 0 points. With --jobs N, the newest
    jobs of the site's job ledger instead (the shared one of its [executor], so any machine
    of the site answers alike).

    On a terminal the table keeps to the columns that fit 80 (instance name, region, state,
    newest point, RPO, last copy's age, drill RTO, objectives) and says why under it for the
    rows that are failing, malformed or late; --wide shows every column, whole. Without a
    terminal (tab-separated, for scripts) every column, whole.

    Exits 3 when an objective is breached, else 1 when a row is failing, malformed or late,
    else 0 (after printing everything)."""
    if jobs is not None:
        _job_history(state, jobs, as_json, wide=wide)
        return
    regions = state.site().regions
    rows = state.engine().status()
    held = {r.region for r in rows}
    # the engine's order (worst first), then the regions that hold nothing
    entries: list[tuple[str, StatusRow | None]] = [(r.region, r) for r in rows]
    entries.extend((r.name, None) for r in regions if r.name not in held)
    if as_json:
        print_json([_empty_status(name) if r is None else r.to_dict() for name, r in entries])
        _status_exit(rows)
        return

    tty = sys.stdout.isatty()
    if tty and not wide:
        _narrow_status(entries)
        _status_exit(rows)
        return
    newest = short_ids((r.newest_point for r in rows if r.newest_point), wide=True)
    short = short_regions((name for name, _ in entries), wide=True)
    when = "%Y-%m-%d %H:%M"
    print_table(
        [
            "instance",
            "region",
            "role",
            "points",
            "state",
            "newest",
            "RPO",
            "last copy",
            "last drill RTO",
            "newest issues",
            "why",
            "RPO obj",
            "RTO obj",
        ],
        [
            ["-", short[name], "-", "0", "-", "-", "-", "-", "-", "-", "no instances", "-", "-"]
            if r is None
            else [
                f"{r.instance_name} ({r.instance_id})",
                short[r.region],
                r.role,
                str(r.points),
                _STATE_CELLS.get(r.state or "", r.state or "-"),
                newest[r.newest_point] if r.newest_point else "-",
                human_age(r.rpo_seconds),
                r.last_copy_at.strftime(when) if r.last_copy_at else "-",
                "-"
                if r.last_drill_at is None
                else (f"{r.last_drill_rto:.2f}s" if r.last_drill_rto is not None else "unhealthy"),
                f"{r.newest_issues:,} (incomplete)" if r.newest_issues else "-",
                r.state_reason or "-",
                _objective(r.rpo_objective_seconds, r.rpo_state),
                _objective(r.rto_objective_seconds, r.rto_state),
            ]
            for name, r in entries
        ],
        tty=tty,
        keep=["region", "state", "newest", "last copy"],
    )
    _status_exit(rows)


#: a narrow status table's objective words (``at risk`` without its space: one word)
_NARROW_OBJECTIVES = {"met": "met", "at_risk": "risk", "breached": "BREACHED"}


def _narrow_status(entries: list[tuple[str, StatusRow | None]]) -> None:
    """``status`` on a terminal without --wide: the columns that fit 80, each value on one
    line (names, short ids and regions as ``points`` shows them, ages in the one duration
    scheme, the objectives as ``RPO/RTO`` words), then why, one note per row that is
    failing, malformed or late (prose, wrapped at the terminal's width)."""
    from datetime import UTC, datetime

    from rich.console import Console

    rows = [r for _, r in entries if r is not None]
    newest = short_ids(r.newest_point for r in rows if r.newest_point)
    short = short_regions(name for name, _ in entries)
    now = datetime.now(UTC)

    def objectives(r: StatusRow) -> str:
        if r.rpo_state is None and r.rto_state is None:
            return "-"
        words = (_NARROW_OBJECTIVES.get(s, s) if s else "-" for s in (r.rpo_state, r.rto_state))
        return "/".join(words)

    headers = ["instance", "region", "state", "newest", "RPO", "copied", "drill", "RPO/RTO"]
    print_table(
        headers,
        [
            [
                "-",
                short[name],
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
            ]
            if r is None
            else [
                r.instance_name,
                short[r.region],
                _STATE_CELLS.get(r.state or "", r.state or "-"),
                newest[r.newest_point] if r.newest_point else "-",
                human_age(r.rpo_seconds),
                "-"
                if r.last_copy_at is None
                else human_age((now - r.last_copy_at).total_seconds()) + " ago",
                "-"
                if r.last_drill_at is None
                else (f"{r.last_drill_rto:.2f}s" if r.last_drill_rto is not None else "unhealthy"),
                objectives(r),
            ]
            for name, r in entries
        ],
        tty=True,
        # only a name too long for the terminal wraps; every other value stays whole
        keep=headers[1:],
    )
    console = Console(file=sys.stdout)
    for r in rows:
        if r.state in _STATE_CELLS and r.state_reason:
            console.print(
                f"{r.instance_name} ({short[r.region]}): {r.state_reason}",
                markup=False,
                highlight=False,
                overflow="fold",
            )


#: the states that are not protection, shouted in the table
_STATE_CELLS = {"failing": "FAILING", "malformed": "MALFORMED", "late": "LATE"}

#: ``status`` exits so when a row is failing, malformed or late (docs/commands.md)
EXIT_NOT_PROTECTED = 1


#: ``status`` exits so when an objective is breached: not 1 (an error) nor 2 (click's usage
#: error: a typo must not read as a breach); docs/commands.md
EXIT_BREACHED = 3

_STATE_WORDS = {"met": "met", "at_risk": "at risk", "breached": "BREACHED"}


def _objective(seconds: float | None, state: str | None) -> str:
    """A status table's objective cell: ``<state> (<objective>)``, ``-`` with none."""
    if seconds is None or state is None:
        return "-"
    return f"{_STATE_WORDS.get(state, state)} ({human_age(seconds)})"


def _status_exit(rows: list[StatusRow]) -> None:
    """Exit 3 when a row breaches an objective, else 1 when a row is failing, malformed or
    late, each with one line on standard error per cause; else return (0)."""
    breached = [r for r in rows if r.breached]
    unprotected = [r for r in rows if r.state in _STATE_CELLS]
    if unprotected:
        counts: dict[str, int] = {}
        for r in unprotected:
            counts[str(r.state)] = counts.get(str(r.state), 0) + 1
        listed = ", ".join(f"{n} {s}" for s, n in counts.items())
        echo_err(f"regionvault: not protected: {listed}")
    if breached:
        echo_err(
            f"regionvault: {len(breached)} instance-region row(s) breach an RPO or RTO objective"
        )
        raise click.exceptions.Exit(EXIT_BREACHED)
    if unprotected:
        raise click.exceptions.Exit(EXIT_NOT_PROTECTED)


def _job_history(state: CliState, limit: int, as_json: bool, *, wide: bool = False) -> None:
    """status --jobs: the ledger's newest finished records, newest first: each job's key,
    kind, region, outcome, when, attempts and its runner (``host:pid``: where it ran). On a
    terminal without ``wide``: when, outcome, kind, region (short), how long and the job
    (:func:`_short_job`)."""
    ledger: Any = state.engine().ledger()
    finished = getattr(ledger, "finished", None)
    if finished is None:
        raise ConfigError(
            f"the job ledger {ledger!r} keeps no history to list", key="executor.kind"
        )
    try:
        outcomes = finished(limit=limit)
    finally:
        close = getattr(ledger, "close", None)
        if close is not None:
            close()
    if as_json:
        print_json([o.to_dict() for o in outcomes])
        return

    def took(o: Any) -> str:
        if o.started_at is None or o.finished_at is None:
            return "-"
        return human_duration((o.finished_at - o.started_at).total_seconds())

    if sys.stdout.isatty() and not wide:
        jobs_of = _short_jobs(state, outcomes)
        regions_of = short_regions(o.region for o in outcomes if o.region)
        print_table(
            ["finished", "outcome", "kind", "region", "took", "slot", "job"],
            [
                [
                    o.finished_at.strftime("%m-%d %H:%M") if o.finished_at else "-",
                    o.outcome,
                    o.kind,
                    regions_of[o.region] if o.region else "-",
                    took(o),
                    jobs_of[o.key][1],
                    jobs_of[o.key][0],
                ]
                for o in outcomes
            ],
            tty=True,
            # only a name too long for the terminal wraps
            keep=["finished", "outcome", "kind", "region", "took", "slot"],
        )
        return
    print_table(
        ["finished", "outcome", "kind", "region", "took", "runner", "attempts", "key"],
        [
            [
                o.finished_at.strftime("%Y-%m-%d %H:%M:%S") if o.finished_at else "-",
                o.outcome,
                o.kind,
                o.region or "-",
                took(o),
                o.runner or "-",
                str(o.attempts),
                o.key,
            ]
            for o in outcomes
        ],
    )


def _short_jobs(state: CliState, outcomes: list[Any]) -> dict[str, tuple[str, str]]:
    """Each job key as a terminal shows it, as ``jobs``' job and slot columns: its parts
    after the kind and the region, an instance id as the instance's name, a point id as its
    short id, a region by its short name; its slot as ``12-07 23:00`` (``-``: none). Names
    come from the instances the site's regions list now; an instance no region lists
    (terminated; or its region cannot be opened here) keeps its id."""
    from datetime import datetime

    from regionvault.core.errors import RegionVaultError
    from regionvault.core.pipeline.jobs import split_key

    parts = {o.key: split_key(o.key)[2:] for o in outcomes}
    words = {w for ws in parts.values() for w in ws}
    site = state.site()
    regions = short_regions(r.name for r in site.regions)
    names: dict[str, str] = {}
    wanted = {o.region for o in outcomes if o.region and o.region in regions}
    for region in sorted(wanted):
        try:
            names.update((i.id, i.name) for i in site.region(region).compute.list_instances())
        except (RegionVaultError, OSError):
            continue  # the ids stand
    points = short_ids(w for w in words if len(w) == 32 and all(c in "0123456789abcdef" for c in w))

    def slot(word: str) -> str | None:
        if not word.endswith("Z"):
            return None
        try:
            return datetime.fromisoformat(word).strftime("%m-%d %H:%M")
        except ValueError:
            return None

    def shown(words: list[str]) -> tuple[str, str]:
        slots = [slot(w) for w in words]
        what = [names.get(w) or points.get(w) or regions.get(w) or w for w in words]
        return (
            " ".join(w for w, s in zip(what, slots, strict=True) if s is None) or "-",
            next((s for s in slots if s is not None), "-"),
        )

    return {key: shown(ws) for key, ws in parts.items()}


@click.command("jobs")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many of the newest finished jobs.",
)
@json_option
@click.option("--wide", is_flag=True, help="On a terminal, every column and each job's whole key.")
@pass_state
def jobs(state: CliState, limit: int, as_json: bool, wide: bool) -> None:
    """The job history: the newest finished jobs of the site's job ledger (the shared one of
    its [executor], so any machine of the site sees every region's), newest first: when each
    finished, its outcome, kind, region, how long it took, where it ran, its attempts and its
    key. On a terminal, the job by its instance's name, short ids and slot instead of its
    key, and no runner nor attempts, unless --wide. The same as ``status --jobs N``."""
    _job_history(state, limit, as_json, wide=wide)


def _empty_status(region: str) -> dict[str, Any]:
    """status --json's row for a region that holds no recovery points: the keys of
    ``StatusRow.to_dict()``, ``points`` 0, the instance and everything else null."""
    return {
        "instance_id": None,
        "instance_name": None,
        "region": region,
        "role": None,
        "newest_point": None,
        "newest_at": None,
        "rpo_seconds": None,
        "points": 0,
        "newest_issues": None,
        "last_copy_at": None,
        "last_drill_at": None,
        "last_drill_rto": None,
        "last_drill_healthy": None,
        "drill_interval_seconds": None,
        "rpo_objective_seconds": None,
        "rpo_state": None,
        "rto_objective_seconds": None,
        "rto_state": None,
        "last_backup_failed": None,
        "state": None,
        "state_reason": "no instances and no recovery points",
    }
