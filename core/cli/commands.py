"""CLI commands of the data plane and the pipeline: backup, restore, points, verify, prune,
rebuild-index, copy, tag, tick, run, status (``demo`` lives in plugins/samplenf/demo.py)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli import (
    EXIT_INCOMPLETE,
    CliState,
    ExpectedError,
    cli,
    json_option,
    pass_state,
    print_json,
    print_table,
)
from regionvault.core.config import parse_duration
from regionvault.core.errors import RepositoryNotFound

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine, StatusRow, TickReport
    from regionvault.core.repository import Progress, Repository
    from regionvault.core.site import Region
    from regionvault.core.types import CaptureIssue, RecoveryPoint

__all__: list[str] = []


def _engine(state: CliState, **options: Any) -> Engine:
    from regionvault.core.pipeline import Engine

    return Engine(state.site(), **options)


def _region_tick_options(state: CliState, region: str | None, copy_grace: str | None) -> Any:
    """The region (its full name) and the Engine options of ``--region`` / ``--copy-grace``."""
    options: dict[str, Any] = {}
    if copy_grace is not None:
        if region is None:
            raise click.UsageError("--copy-grace needs --region")
        try:
            options["copy_grace"] = parse_duration(copy_grace, bare_unit="s")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--copy-grace") from None
    name = state.site().region(region).name if region is not None else None
    return name, options


_REGION_TICK = click.option(
    "--region",
    "-r",
    metavar="REGION",
    help="This region's own tick, with its credentials alone (one service per region).",
)
_COPY_GRACE = click.option(
    "--copy-grace",
    metavar="DURATION",
    help="With --region: offer a point again when no receipt came this long after (1h).",
)


#: how verify, prune and status show a region whose vault holds no repository yet
NO_REPOSITORY = "no repository yet (nothing backed up or copied there)"


def _err(text: str) -> None:
    click.echo(text, err=True)


#: issues named on standard error by ``backup`` and ``tick``; the rest are counted
SHOWN_ISSUES = 5


def shown_path(path: str) -> str:
    """A captured path as one printable line: bytes that are not UTF-8 as ``\\xNN``, line
    breaks and tabs escaped."""
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _entries(count: int) -> str:
    return f"{count:,} entry" if count == 1 else f"{count:,} entries"


def issue_line(issue: CaptureIssue) -> str:
    """``<path>: <message>``; a hook's issue, about the whole capture, is its message."""
    return f"{shown_path(issue.path)}: {issue.message}" if issue.path else issue.message


def warn_issues(issues: Sequence[CaptureIssue], total: int) -> None:
    """Name the first few entries a point did not take whole on standard error, one line
    each (``regionvault: warning: <path>: <message>``), then count the rest."""
    for issue in issues[:SHOWN_ISSUES]:
        _err(f"regionvault: warning: {issue_line(issue)}")
    more = total - min(len(issues), SHOWN_ISSUES)
    if more > 0:
        _err(f"regionvault: warning: ... and {more} more")


def _existing_repositories(
    engine: Engine, regions: list[Region], *, explicit: bool, doing: str
) -> tuple[list[tuple[str, Repository]], list[str]]:
    """``([(region, repository)], [regions without one])`` for a command that only works
    on what exists (verify, prune): it never creates a repository. With ``explicit`` (one
    region asked for by name), a region without a repository is an error; otherwise it is
    skipped, and an error only when no region has one, so there is nothing to ``doing``."""
    found: list[tuple[str, Repository]] = []
    missing: list[str] = []
    for r in regions:
        try:
            found.append((r.name, engine.repository(r.name, create=False)))
        except RepositoryNotFound as exc:
            if explicit:
                raise ExpectedError(f"{exc}, so there is nothing to {doing}") from None
            missing.append(r.name)
    if not found:
        raise ExpectedError(
            f"no region holds a repository yet ({', '.join(missing)}): nothing to {doing}"
        )
    return found, missing


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress bar on a terminal (standard error); nothing when not on one."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(p: Any) -> None:
            bar.update(task, completed=p.bytes_done, total=p.bytes_total)

        yield update


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _point_row(p: RecoveryPoint, now: datetime) -> list[str]:
    return [
        p.id,
        p.region,
        p.instance_name,
        p.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        human_age(max(0.0, (now - p.created_at).total_seconds())),
        p.expires_at.strftime("%Y-%m-%d %H:%M") if p.expires_at else "never",
        f"{p.size:,}",
        f"{p.lineage.source_region}/{p.lineage.source_recovery_point[:8]}" if p.lineage else "",
        f"{p.issues:,}" if p.issues else "-",
    ]


def point_json(p: RecoveryPoint) -> dict[str, Any]:
    return {
        "id": p.id,
        "region": p.region,
        "instance_id": p.instance_id,
        "instance_name": p.instance_name,
        "kind": p.kind.value,
        "created_at": p.created_at.isoformat(),
        "expires_at": p.expires_at.isoformat() if p.expires_at else None,
        "size": p.size,
        "policy": p.policy,
        "function": p.function,
        "tags": dict(p.tags),
        # entries the point names as not taken whole (0: complete)
        "issues": p.issues,
        "incomplete": p.issues > 0,
        "lineage": None
        if p.lineage is None
        else {
            "source_region": p.lineage.source_region,
            "source_recovery_point": p.lineage.source_recovery_point,
        },
    }


# --------------------------------------------------------------------------- data plane


@cli.command()
@click.argument("instance")
@click.option(
    "--region", "-r", metavar="REGION", help="The instance's region (if the name is not unique)."
)
@pass_state
def backup(state: CliState, instance: str, region: str | None) -> None:
    """Back up INSTANCE (id or unique name) into its home region's vault now.

    Prints the new recovery point's id alone on the last line of standard output. Exits 3
    (incomplete) when the point names entries it could not take whole (each is named on
    standard error: the first few, then a count); the point is committed all the same."""
    engine = _engine(state)
    inst = state.site().find_instance(instance, region=region)
    with progress_bar(f"backup {inst.name}") as progress:
        point = engine.backup(inst, progress=progress)
    done = f"backed up {inst.name} ({inst.id}) in {point.region}: {point.size:,} bytes"
    if not point.issues:
        _err(done)
        click.echo(point.id)
        return
    _err(f"{done}; incomplete: {_entries(point.issues)} not taken whole")
    warn_issues(engine.point_issues(point), point.issues)
    click.echo(point.id)
    raise click.exceptions.Exit(EXIT_INCOMPLETE)


@cli.command()
@click.argument("point")
@click.option(
    "--region", "-r", required=True, metavar="REGION", help="Region whose vault holds POINT."
)
@click.option(
    "--target",
    "-t",
    type=click.Path(path_type=Path),
    help="Restore into this directory (or image file).",
)
@click.option("--launch", is_flag=True, help="Launch a new instance from the restored data.")
@click.option("--name", help="Name of the launched instance.")
@click.option(
    "--path", "paths", multiple=True, metavar="PATH", help="Restore only this path (repeat)."
)
@click.option(
    "--sync",
    "sync",
    is_flag=True,
    help="Wait for the restored files to reach the disk before exiting (restic and borg do "
    "not): a power loss soon after cannot leave them empty or partial. Slower.",
)
@json_option
@pass_state
def restore(
    state: CliState,
    point: str,
    region: str,
    target: Path | None,
    launch: bool,
    name: str | None,
    paths: tuple[str, ...],
    sync: bool,
    as_json: bool,
) -> None:
    """Restore recovery point POINT with REGION's keys alone, into --target or, with
    --launch, into a new instance performing the same function (health-checked, RTO
    recorded). With --sync, the restored files are on disk before it exits."""
    if not launch and target is None:
        raise click.UsageError("give --target PATH, or --launch")
    from regionvault.core.repository import RESTORE_MARKER

    # a target holding a restore's marker is left to the engine: the same restore, run
    # again after a kill, finishes; any other is refused there, naming the one it holds
    if (
        target is not None
        and target.is_dir()
        and any(target.iterdir())
        and not (target / RESTORE_MARKER).is_file()
    ):
        raise ExpectedError(f"target {target} is not empty: restore into a new or empty directory")
    if target is not None and target.exists() and not target.is_dir():
        raise ExpectedError(
            f"target {target} is an existing file: restore into a new path or an empty directory"
        )
    engine = _engine(state)
    try:
        with progress_bar(f"restore {point[:8]}") as progress:
            result = engine.restore(
                point,
                region=region,
                target=target,
                launch=launch,
                name=name,
                paths=list(paths) or None,
                progress=progress,
                sync=sync,
            )
    except OSError as exc:
        where = exc.filename if exc.filename is not None else target
        raise ExpectedError(f"restore into {where}: {exc.strerror or exc}") from None
    out: dict[str, Any] = {
        "point": result.point.id,
        "region": result.region,
        "target": str(result.target) if result.target else None,
        "seconds_to_restore": round(result.seconds_to_restore, 3),
    }
    if result.instance is not None:
        out.update(
            instance=result.instance.id,
            name=result.instance.name,
            healthy=result.healthy,
            rto_seconds=None
            if result.seconds_to_healthy is None
            else round(result.seconds_to_healthy, 3),
            health_error=result.health_error,
        )
    out["notes"] = list(result.notes)
    for note in result.notes:
        # the data is whole: what this machine could not apply is a warning, not a failure
        _err(f"regionvault: warning: {note}")
    if result.point.issues:
        # restored as it was taken: say that the point itself is not whole
        _err(
            f"regionvault: warning: point {result.point.id} is incomplete: "
            f"{_entries(result.point.issues)} not taken whole when it was backed up"
        )
        warn_issues(engine.point_issues(result.point), result.point.issues)
    if as_json:
        print_json(out)
    elif result.instance is None:
        click.echo(f"restored {result.point.id} into {result.target}")
    else:
        rto = f"healthy after {result.seconds_to_healthy:.2f}s" if result.healthy else "NOT healthy"
        click.echo(
            f"launched {result.instance.name} ({result.instance.id}) in {result.region}: {rto}"
        )
        click.echo(result.instance.id)
    if result.instance is not None and not result.healthy:
        # the engine never removes an instance that exists: say which one is left
        why = f" ({result.health_error})" if result.health_error else ""
        raise ExpectedError(
            f"instance {result.instance.id} did not become healthy{why}; it is left in "
            f"{result.region} for inspection: terminate it when done"
        )


@cli.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@click.option("--instance", "-i", metavar="INSTANCE", help="Only this instance's points (id).")
@json_option
@pass_state
def points(state: CliState, region: str | None, instance: str | None, as_json: bool) -> None:
    """List recovery points, oldest first (a region with no repository yet has none)."""
    engine = _engine(state)
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    found: list[RecoveryPoint] = []
    for r in regions:
        try:
            repo = engine.repository(r.name, create=False)
        except RepositoryNotFound:
            continue  # nothing backed up or copied here yet; and listing creates nothing
        found.extend(repo.points(instance))
    if as_json:
        print_json([point_json(p) for p in found])
        return
    now = datetime.now(UTC)
    print_table(
        [
            "id",
            "region",
            "instance",
            "created (UTC)",
            "age",
            "expires",
            "bytes",
            "copy of",
            "issues",
        ],
        [_point_row(p, now) for p in found],
    )


@cli.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@click.option("--read-data", is_flag=True, help="Also read and authenticate every stored byte.")
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild a damaged or lost index, remove damaged link objects and copy records and "
    "what killed runs left (temporaries in vaults and inboxes); then check again.",
)
@json_option
@pass_state
def verify(
    state: CliState, region: str | None, read_data: bool, repair: bool, as_json: bool
) -> None:
    """Check each region's vault: structure, or with --read-data every byte.

    A region with no repository yet is skipped (and said so); exit 1 when the region asked
    for, or every region, has none: there is nothing to verify."""
    engine = _engine(state)
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    repos, missing = _existing_repositories(
        engine, regions, explicit=region is not None, doing="verify"
    )
    reports = []
    swept: dict[str, list[str]] = {}
    for name, repo in repos:
        with progress_bar(f"verify {name}") as progress:
            report = repo.verify(read_data=read_data, progress=progress, repair=repair)
        reports.append((name, report))
        if repair:
            swept[name] = engine.sweep_inboxes(name)
    if as_json:
        rows = [
            {
                "region": name,
                "repository": True,
                "ok": rep.ok,
                "read_data": rep.read_data,
                "points": rep.points,
                "packs": rep.packs,
                "blobs": rep.blobs,
                "bytes_read": rep.bytes_read,
                "errors": [str(e) for e in rep.errors],
                "warnings": [str(w) for w in rep.warnings],
                "repaired": [str(r) for r in rep.repaired] + swept.get(name, []),
            }
            for name, rep in reports
        ]
        rows.extend(_no_repository(name, read_data=read_data) for name in missing)
        print_json(_in_site_order(rows, regions))
    else:
        for name, rep in reports:
            verdict = "ok" if rep.ok else f"{len(rep.errors)} error(s)"
            click.echo(
                f"{name}: {verdict}: {rep.points} points, {rep.packs} packs, {rep.blobs} blobs"
                + (f", {rep.bytes_read:,} bytes read" if read_data else "")
            )
            for e in rep.errors:
                click.echo(f"  error: {e}")
            for w in rep.warnings:
                click.echo(f"  note: {w}")
            for r in rep.repaired:
                click.echo(f"  repaired: {r}")
            for line in swept.get(name, []):
                click.echo(f"  repaired: {line}")
        for name in missing:
            click.echo(f"{name}: {NO_REPOSITORY}")
    bad = [name for name, rep in reports if not rep.ok]
    if bad:
        raise ExpectedError(f"verify found errors in {', '.join(bad)}")


def _in_site_order(rows: list[dict[str, Any]], regions: list[Region]) -> list[dict[str, Any]]:
    order = {r.name: i for i, r in enumerate(regions)}
    return sorted(rows, key=lambda row: order[row["region"]])


def _no_repository(name: str, *, read_data: bool) -> dict[str, Any]:
    """verify --json's entry for a region with no repository: nothing checked, nothing
    wrong."""
    return {
        "region": name,
        "repository": False,
        "ok": True,
        "read_data": read_data,
        "points": 0,
        "packs": 0,
        "blobs": 0,
        "bytes_read": 0,
        "errors": [],
        "warnings": [],
        "repaired": [],
    }


@cli.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@json_option
@pass_state
def prune(state: CliState, region: str | None, as_json: bool) -> None:
    """Collect data no recovery point references (never what a WORM lock or legal hold
    protects).

    A region with no repository yet is skipped (and said so); exit 1 when the region asked
    for, or every region, has none: there is nothing to prune."""
    engine = _engine(state)
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    repos, missing = _existing_repositories(
        engine, regions, explicit=region is not None, doing="prune"
    )
    out: list[dict[str, Any]] = []
    for name, repo in repos:
        with progress_bar(f"prune {name}") as progress:
            rep = repo.prune(progress=progress)
        inbox = engine.sweep_inboxes(name)
        out.append(
            {
                "region": name,
                "repository": True,
                "packs_deleted": rep.packs_deleted,
                "packs_rewritten": rep.packs_rewritten,
                "bytes_freed": rep.bytes_freed,
                "temporaries_removed": rep.temporaries_removed + len(inbox),
                "skipped": [str(s) for s in rep.skipped],
            }
        )
    empty = {
        "packs_deleted": 0,
        "packs_rewritten": 0,
        "bytes_freed": 0,
        "temporaries_removed": 0,
        "skipped": [],
    }
    out.extend({"region": name, "repository": False, **empty} for name in missing)
    out = _in_site_order(out, regions)
    if as_json:
        print_json(out)
        return
    for row in out:
        if not row["repository"]:
            click.echo(f"{row['region']}: {NO_REPOSITORY}")
            continue
        click.echo(
            f"{row['region']}: deleted {row['packs_deleted']} packs, rewrote "
            f"{row['packs_rewritten']}, freed {row['bytes_freed']:,} bytes"
            + (
                f", removed {row['temporaries_removed']} temporaries of killed runs"
                if row["temporaries_removed"]
                else ""
            )
            + (f", {len(row['skipped'])} protected objects kept" if row["skipped"] else "")
        )


@cli.command("rebuild-index")
@click.option("--region", "-r", metavar="REGION", required=True, help="The region to mend.")
@pass_state
def rebuild_index(state: CliState, region: str) -> None:
    """Rebuild REGION's index from its packs' own authenticated blob tables (after an index
    object was lost or damaged); takes the exclusive lock, like prune. Run verify after."""
    engine = _engine(state)
    found, _ = _existing_repositories(
        engine, [state.site().region(region)], explicit=True, doing="rebuild"
    )
    name, repo = found[0]
    packs = repo.rebuild_index()
    click.echo(f"{name}: index rebuilt from {packs} pack(s)")


# --------------------------------------------------------------------------- pipeline


@cli.command()
@click.argument("point")
@click.option("--to", "to", required=True, metavar="REGION", help="Destination region.")
@click.option("--from", "source", metavar="REGION", help="Region holding POINT (default: found).")
@pass_state
def copy(state: CliState, point: str, to: str, source: str | None) -> None:
    """Copy recovery point POINT to region --to, re-encrypted under its keys.

    Prints the copy's recovery point id alone on the last line of standard output."""
    engine = _engine(state)
    result = engine.copy(point, source=source, to=to)
    if result.existing:
        _err(f"{to} already holds a copy of {point}: {result.point.id}")
    else:
        _err(
            f"copied {result.chunks_sent} of {result.chunks_total} chunks, "
            f"{result.bytes_moved:,} bytes over transit"
        )
    if result.point.issues:
        # a copy is as complete as its source: say so, as the backup did
        _err(
            f"regionvault: warning: point {result.point.id} is incomplete: "
            f"{_entries(result.point.issues)} not taken whole when its source was backed up"
        )
    click.echo(result.point.id)


@cli.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@json_option
@pass_state
def tag(state: CliState, region: str | None, as_json: bool) -> None:
    """Give untagged instances the site's default policy tag (never overwriting one)."""
    engine = _engine(state)
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    reports = [engine.tag(r.name) for r in regions]
    if as_json:
        print_json(
            [
                {
                    "region": rep.region,
                    "tagged": [
                        {"id": t.instance_id, "name": t.name, "value": t.value} for t in rep.tagged
                    ],
                    "skipped": [str(n) for n in rep.skipped],
                    "malformed": [str(n) for n in rep.malformed],
                    "failed": [str(n) for n in rep.failed],
                }
                for rep in reports
            ]
        )
        return
    for rep in reports:
        click.echo(rep.summary())
        for t in rep.tagged:
            click.echo(f"  tagged {t}")
        for n in rep.malformed:
            click.echo(f"  malformed: {n}")
        for n in rep.failed:
            click.echo(f"  failed: {n}")


def _tick_json(report: TickReport) -> dict[str, Any]:
    region = {"region": report.region} if report.region is not None else {}
    return {
        **region,
        "at": report.at.isoformat(),
        "ok": report.ok,
        "outcome": report.outcome,
        "tagged": [t.instance_id for rep in report.tagged for t in rep.tagged],
        "schedule": [s.summary() for s in report.schedule],
        "jobs": [o.to_dict() for o in report.jobs],
        "problems": report.problems,
    }


def _print_tick(report: TickReport) -> None:
    for s in report.schedule:
        click.echo(s.summary())
        for m in s.malformed:
            click.echo(f"  malformed: {m}")
    for o in report.jobs:
        if o.status.value == "replayed":
            continue
        if o.incomplete:
            point = o.result.get("point") if isinstance(o.result, dict) else None
            of = f" (point {point})" if point else ""
            click.echo(f"incomplete {o.key}: {_entries(o.issues_total)} not taken whole{of}")
            for issue in o.issues[:SHOWN_ISSUES]:
                click.echo(f"  {issue_line(issue)}")
            if o.issues_total > SHOWN_ISSUES:
                click.echo(f"  ... and {o.issues_total - SHOWN_ISSUES:,} more")
            continue
        line = f"{o.status.value:8} {o.key}"
        if o.error:
            line += f": {o.error}"
        click.echo(line)
    for p in report.problems:
        click.echo(f"problem: {p}")


def _exit_for(failed: int, incomplete: int) -> None:
    """Exit 1 when a step failed, else 3 when a job did its work but not whole."""
    if failed:
        raise ExpectedError(f"{failed} step(s) failed")
    if incomplete:
        _err(f"regionvault: warning: {incomplete} job(s) incomplete: see their issues above")
        raise click.exceptions.Exit(EXIT_INCOMPLETE)


@cli.command()
@_REGION_TICK
@_COPY_GRACE
@json_option
@pass_state
def tick(state: CliState, region: str | None, copy_grace: str | None, as_json: bool) -> None:
    """One pass: tag, back up what is due, copy, apply retention (for cron).

    Exits 1 when a step failed, else 3 when a backup was incomplete (its point names
    entries it could not take whole), else 0."""
    name, options = _region_tick_options(state, region, copy_grace)
    report = _engine(state, **options).tick(name)
    if as_json:
        print_json(_tick_json(report))
    else:
        _print_tick(report)
    _exit_for(len(report.failures()) + len(report.problems), len(report.incomplete()))


@cli.command()
@click.option(
    "--interval", metavar="DURATION", help="Time between ticks (default: the site's intervals)."
)
@click.option("--max-ticks", type=click.IntRange(min=1), help="Stop after this many ticks.")
@_REGION_TICK
@_COPY_GRACE
@pass_state
def run(
    state: CliState,
    interval: str | None,
    max_ticks: int | None,
    region: str | None,
    copy_grace: str | None,
) -> None:
    """Tick every interval until stopped; SIGTERM or Ctrl-C lets the current tick finish.

    Exits as one tick over all the ticks it ran: 1 when a step failed, else 3 when a backup
    was incomplete, else 0."""
    name, options = _region_tick_options(state, region, copy_grace)
    every = None
    if interval is not None:
        try:
            every = parse_duration(interval, bare_unit="s")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--interval") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        _err(f"regionvault: {signal.Signals(signum).name}: stopping after the current step")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = _engine(state, **options)
    failed = incomplete = 0

    def on_tick(report: TickReport) -> None:
        nonlocal failed, incomplete
        _print_tick(report)
        sys.stdout.flush()
        failed += len(report.failures()) + len(report.problems)
        incomplete += len(report.incomplete())

    ticks = engine.run(stop, interval=every, on_tick=on_tick, max_ticks=max_ticks, region=name)
    _err(f"regionvault: stopped after {ticks} tick(s)")
    _exit_for(failed, incomplete)


@cli.command()
@json_option
@pass_state
def status(state: CliState, as_json: bool) -> None:
    """Per instance and region: newest recovery point and its age (RPO), last copy, last
    restore drill and its RTO. A region with no recovery points (or no repository yet, which
    status does not create) is shown once, with 0 points."""
    regions = state.site().regions
    rows = _engine(state).status()
    held = {r.region for r in rows}
    order = {r.name: i for i, r in enumerate(regions)}
    entries: list[tuple[str, StatusRow | None]] = [(r.region, r) for r in rows]
    entries.extend((r.name, None) for r in regions if r.name not in held)
    entries.sort(key=lambda entry: order.get(entry[0], len(order)))
    if as_json:
        print_json([_empty_status(name) if r is None else r.to_dict() for name, r in entries])
        return

    print_table(
        [
            "instance",
            "region",
            "role",
            "points",
            "newest",
            "RPO",
            "last copy",
            "last drill RTO",
            "newest issues",
        ],
        [
            ["-", name, "-", "0", "-", "-", "-", "-", "-"]
            if r is None
            else [
                f"{r.instance_name} ({r.instance_id})",
                r.region,
                r.role,
                str(r.points),
                (r.newest_point or "-")[:12],
                human_age(r.rpo_seconds),
                r.last_copy_at.strftime("%Y-%m-%d %H:%M") if r.last_copy_at else "-",
                "-"
                if r.last_drill_at is None
                else (f"{r.last_drill_rto:.2f}s" if r.last_drill_rto is not None else "unhealthy"),
                f"{r.newest_issues:,} (incomplete)" if r.newest_issues else "-",
            ]
            for name, r in entries
        ],
    )


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
    }
