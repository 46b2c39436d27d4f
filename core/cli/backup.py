"""Commands of one recovery point's life in a region: ``backup`` (an instance into its home
region's vault now), ``restore`` (into a directory, or launched as a new instance) and
``points`` (the recovery points, oldest first)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.interrupts import interruptible
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import (
    count_entries,
    echo_err,
    echo_info,
    human_age,
    human_size,
    issue_json,
    print_json,
    print_table,
    progress_bar,
    short_ids,
    short_regions,
    warn_issues,
)
from regionvault.core.cli.params import (
    points_of,
    refuse_ambiguous_instance,
    refuse_conflicts,
)
from regionvault.core.cli.root import EXIT_INCOMPLETE, CliState, ExpectedError, pass_state
from regionvault.core.errors import RegionVaultError, RepositoryNotFound

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import Manifest
    from regionvault.core.types import RecoveryPoint

__all__ = ["backup", "point_json", "points", "restore"]


def _point_rows(
    found: list[RecoveryPoint], now: datetime, *, wide: bool, raw: bool
) -> list[list[str]]:
    """The table's rows: ids as their shortest unique prefixes (the source point's among
    the listed ones too) and regions by short name unless ``wide``; sizes in bytes with
    ``raw``."""
    # without the year (a table is read for the recent past); --wide shows it
    when = "%Y-%m-%d %H:%M" if wide else "%m-%d %H:%M"
    sources = [p.lineage.source_recovery_point for p in found if p.lineage]
    ids = short_ids([*(p.id for p in found), *sources], wide=wide)
    regions = short_regions(
        [*(p.region for p in found), *(p.lineage.source_region for p in found if p.lineage)],
        wide=wide,
    )
    return [
        [
            ids[p.id],
            regions[p.region],
            p.instance_name,
            p.created_at.strftime(when),
            human_age(max(0.0, (now - p.created_at).total_seconds())),
            p.expires_at.strftime(when) if p.expires_at else "never",
            human_size(p.size, raw=raw),
            f"{regions[p.lineage.source_region]}/{ids[p.lineage.source_recovery_point]}"
            if p.lineage
            else "",
            f"{p.issues:,}" if p.issues else "-",
        ]
        for p in found
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


def _summary(manifest: Manifest) -> str:
    """The backup summary line, from the counters the backup recorded in the manifest:
    files new / changed / unchanged (a point without a parent has only new ones; files left
    out are counted apart, as not taken), bytes added after deduplication (before and after
    compression) and the dedup ratio: the bytes the backup read (file data, a file read
    again once, its last read; a block image's written extents, so its holes are no dedup)
    and its tree's records, over the new bytes they needed stored. A point recorded before
    ``bytes_read`` was counted uses its size instead."""
    stats = manifest.stats
    size = manifest.point.size
    added = stats.get("bytes_new", 0)
    read = stats.get("bytes_read", size)
    if manifest.image_size is not None:
        base = stats.get("bytes_from_base", 0)
        what = f"image: {size:,} bytes, {read:,} read, {base:,} taken from the base"
    else:
        files = stats.get("files", 0)
        unchanged = stats.get("files_unchanged", 0)
        changed = stats.get("files_changed", 0)
        failed = stats.get("files_failed", 0)
        new = max(0, files - unchanged - changed)
        what = f"files: {new:,} new, {changed:,} changed, {unchanged:,} unchanged"
        if failed:
            what += f", {failed:,} not taken"
    # every new byte came from a read or the tree: the ratio is at least 1 (older points,
    # whose reads were not counted, are held to that too). A file read again counts once:
    # its last read, and the new bytes of that read alone
    kept = read + manifest.tree_bytes
    needed = added - stats.get("bytes_discarded", 0)
    ratio = f"{max(1.0, kept / needed):,.2f}x" if needed > 0 else "nothing new stored"
    return (
        f"{what}; added {added:,} bytes ({stats.get('bytes_stored', 0):,} stored); "
        f"dedup ratio {ratio}"
    )


def _manifest_or_warning(engine: Engine, point: RecoveryPoint) -> Manifest | None:
    """The manifest of ``point`` just committed, for its summary line; None (with a warning)
    when it cannot be read back: the backup is committed all the same."""
    try:
        return engine.repository(point.region, create=False).load_manifest(point.id)
    except (RegionVaultError, OSError) as exc:
        echo_err(f"regionvault: warning: no summary: {exc}")
        return None


# --------------------------------------------------------------------------- commands


@click.command()
@click.argument("instance")
@click.option(
    "--region", "-r", metavar="REGION", help="The instance's region (if the name is not unique)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the new point as JSON.")
@pass_state
def backup(state: CliState, instance: str, region: str | None, as_json: bool) -> None:
    """Back up INSTANCE (id or unique name) into its home region's vault now.

    Prints the new recovery point's id alone on the last line of standard output (with
    --json, one JSON document: the point, the backup's counters and the entries it could
    not take whole). Exits 3 (incomplete) when the point names entries it could not take
    whole (each is named on standard error: the first few, then a count); the point is
    committed all the same. Ctrl-C lets the backup finish up to its commit and exits 130
    (a second Ctrl-C exits at once: nothing is committed, and running it again starts
    over)."""
    engine = state.engine()
    inst = state.site().find_instance(instance, region=region)
    # the whole body, not only the backup: a Ctrl-C while the committed point's manifest is
    # read back (a vault read, slow on S3) must still print its id and the state line
    with interruptible("the backup") as interrupted:
        with progress_bar(f"backup {inst.name}") as progress:
            point = engine.backup(inst, progress=progress)
        manifest = _manifest_or_warning(engine, point)
        issues = engine.point_issues(point) if point.issues else []
        if as_json:
            print_json(
                {
                    **point_json(point),
                    "stats": dict(manifest.stats) if manifest is not None else None,
                    "issues_listed": [issue_json(i) for i in issues],
                }
            )
        done = f"backed up {inst.name} ({inst.id}) in {point.region}: {human_size(point.size)}"
        if point.issues:
            done += f"; incomplete: {count_entries(point.issues)} not taken whole"
        echo_info(done)
        if point.issues:
            warn_issues(issues, point.issues)
        if manifest is not None:
            # last on standard error: the warnings follow the line that says the point is
            # incomplete
            echo_info(_summary(manifest))
        if not as_json:
            click.echo(point.id)
    interrupted.exit(f"the backup finished first: point {point.id} is committed")
    if point.issues:
        raise click.exceptions.Exit(EXIT_INCOMPLETE)


@click.command()
@click.argument("point")
@click.option(
    "--region", "-r", required=True, metavar="REGION", help="Region whose vault holds POINT."
)
@click.option(
    "--target",
    "-t",
    type=click.Path(path_type=Path),
    help="Restore into this directory (or image file; a directory of one image file per "
    "disk for an image of several disks).",
)
@click.option("--launch", is_flag=True, help="Launch a new instance from the restored data.")
@click.option("--name", help="Name of the launched instance.")
@click.option(
    "--health-timeout",
    metavar="DURATION",
    help="How long the launched instance may take to become healthy (90s, 15m; default: "
    "site.toml's [launch] health_timeout, else the provider's: 15m on AWS, 60s elsewhere).",
)
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
    health_timeout: str | None,
    paths: tuple[str, ...],
    sync: bool,
    as_json: bool,
) -> None:
    """Restore recovery point POINT with REGION's keys alone, into --target or, with
    --launch, into a new instance performing the same function (health-checked, RTO
    recorded). With --sync, the restored files are on disk before it exits."""
    if not launch and target is None:
        raise click.UsageError("give --target PATH, or --launch")
    refuse_conflicts(
        "--target restores into a directory, --launch into a new instance",
        target=target,
        launch=launch,
    )
    refuse_conflicts("--name names the instance --launch starts", target=target, name=name)
    refuse_conflicts(
        "--health-timeout bounds the health wait of --launch",
        target=target,
        health_timeout=health_timeout,
    )
    engine_options = _health_timeout_option(health_timeout)
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
    engine = state.engine(**engine_options)
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
    out["not_carried"] = list(result.not_carried)
    for line in result.not_carried:
        # launched all the same: what the source had and this one lacks is a warning
        echo_err(f"regionvault: warning: not carried over: {line}")
    for note in result.notes:
        # the data is whole: what this machine could not apply is a warning, not a failure
        echo_err(f"regionvault: warning: {note}")
    if result.point.issues:
        # restored as it was taken: say that the point itself is not whole
        echo_err(
            f"regionvault: warning: point {result.point.id} is incomplete: "
            f"{count_entries(result.point.issues)} not taken whole when it was backed up"
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


@click.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@click.option(
    "--instance", "-i", metavar="INSTANCE", help="Only this instance's points (name or id)."
)
@json_option
@click.option("--wide", is_flag=True, help="Whole ids and region names (default: short).")
@click.option("--bytes", "raw", is_flag=True, help="Sizes in bytes (default: KiB, MiB, ...).")
@pass_state
def points(
    state: CliState,
    region: str | None,
    instance: str | None,
    as_json: bool,
    wide: bool,
    raw: bool,
) -> None:
    """List recovery points, oldest first (a region with no repository yet has none).

    On a terminal, ids are shown as their shortest unique prefix (8 characters at least:
    any command takes it), regions by their short name where no other region has it; --wide
    shows both whole, as the tab-separated lines printed when standard output is not a
    terminal always do."""
    engine = state.engine()
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    found: list[RecoveryPoint] = []
    for r in regions:
        try:
            repo = engine.repository(r.name, create=False)
        except RepositoryNotFound:
            continue  # nothing backed up or copied here yet; and listing creates nothing
        found.extend(points_of(repo.points(), instance))
    refuse_ambiguous_instance(found, instance)
    if as_json:
        print_json([point_json(p) for p in found])
        return
    now = datetime.now(UTC)
    # scripts reading the tab-separated lines (no terminal) get every value whole
    wide = wide or not sys.stdout.isatty()
    print_table(
        [
            "id",
            "region",
            "instance",
            "created (UTC)",
            "age",
            "expires",
            "bytes" if raw else "size",
            "copy of",
            "issues",
        ],
        _point_rows(found, now, wide=wide, raw=raw),
        # whole ids do not fit 80 columns: with --wide they wrap (never cut)
        keep=()
        if wide
        else ["id", "region", "created (UTC)", "expires", "bytes" if raw else "size", "copy of"],
    )


def _health_timeout_option(value: str | None) -> dict[str, Any]:
    """The Engine options of ``restore --health-timeout`` (a duration above zero)."""
    if value is None:
        return {}
    from regionvault.core.durations import parse_duration

    try:
        timeout = parse_duration(value, bare_unit="s")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--health-timeout") from None
    return {"health_timeout": timeout.total_seconds()}
