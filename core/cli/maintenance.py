"""Commands that look after a region's vault: ``verify`` (structure, or every byte; with
``--repair``, mend what can be mended), ``prune`` (collect unreferenced data) and
``rebuild-index``. None of them creates a repository where there is none."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import print_json, progress_bar
from regionvault.core.cli.root import CliState, ExpectedError, pass_state
from regionvault.core.errors import RepositoryNotFound

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import Repository
    from regionvault.core.site import Region

__all__ = ["prune", "rebuild_index", "verify"]

#: how verify and prune show a region whose vault holds no repository yet
NO_REPOSITORY = "no repository yet (nothing backed up or copied there)"


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


@click.command()
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
    engine = state.engine()
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    try:
        repos, missing = _existing_repositories(
            engine, regions, explicit=region is not None, doing="verify"
        )
    except ExpectedError:
        if as_json:
            # still a document (a monitor parses it): every region asked, none to check
            print_json([_no_repository(r.name, read_data=read_data) for r in regions])
        raise
    reports = []
    swept: dict[str, list[str]] = {}
    for name, _ in repos:
        started = time.monotonic()
        with progress_bar(f"verify {name}") as progress:
            # through the engine: the result goes into the region's event log
            try:
                report = engine.verify(name, read_data=read_data, progress=progress, repair=repair)
            except Exception:
                state.job_failed("verify", name)  # this region's, not the regions verified
                raise
        engine.notify(
            "regionvault_after_verify",
            f"the verify of {name}",
            region=name,
            report=report,
            seconds=time.monotonic() - started,
        )
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


@click.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@click.option(
    "--dry-run",
    "-n",
    is_flag=True,
    help="Say which packs would be deleted or rewritten and the bytes freed; change nothing "
    "(and take no lock).",
)
@json_option
@pass_state
def prune(state: CliState, region: str | None, dry_run: bool, as_json: bool) -> None:
    """Collect data no recovery point references (never what a WORM lock or legal hold
    protects).

    A region with no repository yet is skipped (and said so); exit 1 when the region asked
    for, or every region, has none: there is nothing to prune."""
    engine = state.engine()
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    repos, missing = _existing_repositories(
        engine, regions, explicit=region is not None, doing="prune"
    )
    if dry_run:
        _prune_dry_run(repos, missing, regions, as_json)
        return
    out: list[dict[str, Any]] = []
    for name, _ in repos:
        with progress_bar(f"prune {name}") as progress:
            rep = engine.prune(name, progress=progress)  # recorded in the event log
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


def _prune_dry_run(
    repos: list[tuple[str, Repository]], missing: list[str], regions: list[Region], as_json: bool
) -> None:
    """What ``prune`` would do in each region, from the decision prune itself makes
    (:func:`~regionvault.core.repository.forecast_prune`); nothing is written."""
    from regionvault.core.repository import forecast_prune

    out: list[dict[str, Any]] = []
    for name, repo in repos:
        plan = forecast_prune(repo)
        out.append(
            {
                "region": name,
                "repository": True,
                "dry_run": True,
                "packs_to_delete": plan.packs_to_delete,
                "packs_to_rewrite": plan.packs_to_rewrite,
                "unindexed_packs": plan.unindexed_packs,
                "indexes_to_replace": plan.indexes_to_replace,
                "bytes_to_free": plan.bytes_to_free,
                "kept_by_locks": [f"{obj}: {why}" for obj, why in plan.kept_by_locks],
            }
        )
    out.extend(
        {
            "region": name,
            "repository": False,
            "dry_run": True,
            "packs_to_delete": [],
            "packs_to_rewrite": [],
            "unindexed_packs": 0,
            "indexes_to_replace": [],
            "bytes_to_free": 0,
            "kept_by_locks": [],
        }
        for name in missing
    )
    out = _in_site_order(out, regions)
    if as_json:
        print_json(out)
        return
    for row in out:
        if not row["repository"]:
            click.echo(f"{row['region']}: {NO_REPOSITORY}")
            continue
        click.echo(
            f"{row['region']}: would delete {len(row['packs_to_delete'])} packs, rewrite "
            f"{len(row['packs_to_rewrite'])}, free up to {row['bytes_to_free']:,} bytes"
            + (
                f" ({row['unindexed_packs']} unindexed: left by a killed run, or a backup "
                "running now)"
                if row["unindexed_packs"]
                else ""
            )
            + (f", {len(row['kept_by_locks'])} kept by locks" if row["kept_by_locks"] else "")
            + " (dry run: nothing changed)"
        )
        for obj in row["packs_to_delete"]:
            click.echo(f"  delete: {obj}")
        for obj in row["packs_to_rewrite"]:
            click.echo(f"  rewrite: {obj}")
        for obj in row["indexes_to_replace"]:
            click.echo(f"  replace index: {obj}")
        for line in row["kept_by_locks"]:
            click.echo(f"  kept: {line}")


@click.command("rebuild-index")
@click.option("--region", "-r", metavar="REGION", required=True, help="The region to mend.")
@pass_state
def rebuild_index(state: CliState, region: str) -> None:
    """Rebuild REGION's index from its packs' own authenticated blob tables (after an index
    object was lost or damaged); takes the exclusive lock, like prune. Run verify after."""
    engine = state.engine()
    found, _ = _existing_repositories(
        engine, [state.site().region(region)], explicit=True, doing="rebuild"
    )
    name, repo = found[0]
    packs = repo.rebuild_index()
    click.echo(f"{name}: index rebuilt from {packs} pack(s)")
