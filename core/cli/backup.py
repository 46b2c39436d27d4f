"""Commands of one recovery point's life in a region: ``backup`` (an instance into its home
region's vault now), ``restore`` (into a directory, or launched as a new instance) and
``points`` (the recovery points, oldest first)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import (
    count_entries,
    echo_err,
    human_age,
    print_json,
    print_table,
    progress_bar,
    warn_issues,
)
from regionvault.core.cli.root import EXIT_INCOMPLETE, CliState, ExpectedError, pass_state
from regionvault.core.errors import RegionVaultError, RepositoryNotFound

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import Manifest
    from regionvault.core.types import RecoveryPoint

__all__ = ["backup", "point_json", "points", "restore"]


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


def _summary_or_warning(engine: Engine, point: RecoveryPoint) -> str | None:
    """The summary line of ``point`` just committed; None (with a warning) when its
    manifest cannot be read back: the backup is committed all the same."""
    try:
        return _summary(engine.repository(point.region, create=False).load_manifest(point.id))
    except (RegionVaultError, OSError) as exc:
        echo_err(f"regionvault: warning: no summary: {exc}")
        return None


# --------------------------------------------------------------------------- commands


@click.command()
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
    engine = state.engine()
    inst = state.site().find_instance(instance, region=region)
    with progress_bar(f"backup {inst.name}") as progress:
        point = engine.backup(inst, progress=progress)
    done = f"backed up {inst.name} ({inst.id}) in {point.region}: {point.size:,} bytes"
    if not point.issues:
        echo_err(done)
        summary = _summary_or_warning(engine, point)
        if summary is not None:
            echo_err(summary)
        click.echo(point.id)
        return
    echo_err(f"{done}; incomplete: {count_entries(point.issues)} not taken whole")
    warn_issues(engine.point_issues(point), point.issues)
    # last: the warnings follow the line that says the point is incomplete
    summary = _summary_or_warning(engine, point)
    if summary is not None:
        echo_err(summary)
    click.echo(point.id)
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
    engine = state.engine()
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
@click.option("--instance", "-i", metavar="INSTANCE", help="Only this instance's points (id).")
@json_option
@pass_state
def points(state: CliState, region: str | None, instance: str | None, as_json: bool) -> None:
    """List recovery points, oldest first (a region with no repository yet has none)."""
    engine = state.engine()
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
