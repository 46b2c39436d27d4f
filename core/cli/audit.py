"""``regionvault audit``: the controls an auditor asks for, per instance and region, each
passed, failed or not applicable with its evidence (core/pipeline/audit.py, docs/audit.md);
and ``audit --events``: the regions' event logs, every event in order."""

from __future__ import annotations

import re
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import print_json, print_table, short_regions
from regionvault.core.cli.root import CliState, ExpectedError, pass_state
from regionvault.core.errors import RegionVaultError

if TYPE_CHECKING:
    from regionvault.core.pipeline.audit import AuditReport

__all__ = ["audit"]


@click.command()
@click.option(
    "--since",
    metavar="DURATION|TIME",
    default=None,
    help="Look back this far (7d, 12h) or from this ISO 8601 time (UTC when it has no "
    "offset): the backup gaps looked for, or the events listed.",
)
@click.option("--region", "-r", metavar="REGION", help="Only the controls (or events) of REGION.")
@click.option(
    "--events",
    "list_events",
    is_flag=True,
    help="Instead: list the regions' event logs (from --since, or all), in sequence order.",
)
@click.option(
    "--wide", is_flag=True, help="Whole ids and region names in the table (as --json has)."
)
@json_option
@pass_state
def audit(
    state: CliState,
    since: str | None,
    region: str | None,
    list_events: bool,
    wide: bool,
    as_json: bool,
) -> None:
    """Audit every instance's backups against its policy, with evidence.

    Controls: backed_up, retained, copied, copy_encrypted, locked, drilled, verified (and
    policy, for a bad tag). Exit 0 when every control passed or does not apply, 1 when any
    failed or something could not be read (docs/audit.md). With --events, list the event
    logs instead (exit 1 when a region's log cannot be read, or an event is damaged,
    missing or replaced)."""
    # the audit (and the engine beneath it) only when the command runs: --help stays light
    from regionvault.core.pipeline.audit import audit as run_audit
    from regionvault.core.pipeline.audit import parse_since

    engine = state.engine()
    site = state.site()
    if region is not None:
        try:
            region = site.region(region).name
        except RegionVaultError as exc:
            raise click.BadParameter(str(exc), param_hint="--region") from None
    now = engine.clock()
    try:
        since_at = None if since is None else parse_since(since, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    if list_events:
        _events(engine, site.regions if region is None else [site.region(region)], since_at,
                as_json=as_json)  # fmt: skip
        return
    report = run_audit(engine, since=since_at, region=region)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report, wide=wide)
    failed = report.failed
    if failed:
        raise ExpectedError(
            f"audit: {len(failed)} control(s) failed, the first: {failed[0][0].instance_name} "
            f"{failed[0][1].control} in {failed[0][1].region}"
        )
    if report.problems:
        raise ExpectedError(
            f"audit: {len(report.problems)} thing(s) could not be read, the first: "
            f"{report.problems[0]}"
        )


#: a recovery point's id or another 32-hex id inside a control's reason
_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _print_report(report: AuditReport, *, wide: bool = False) -> None:
    """The controls as a table. On a terminal (without ``wide``) regions by their short name
    and the 32-hex ids inside the reasons as their first 8 characters (the evidence in
    ``--json`` keeps them whole), so that 80 columns hold it; the tab-separated lines for
    scripts keep every value whole."""
    wide = wide or not sys.stdout.isatty()
    controls = [(inst, c) for inst in report.instances for c in inst.controls]
    regions = short_regions((c.region for _inst, c in controls), wide=wide)
    rows = [
        (
            inst.instance_name,
            regions[control.region],
            control.control,
            control.status.replace("_", " "),
            control.why if wide else _HEX_ID.sub(lambda m: m.group(0)[:8], control.why),
        )
        for inst, control in controls
    ]
    print_table(
        ("INSTANCE", "REGION", "CONTROL", "STATUS", "WHY"),
        rows,
        title=f"audit at {report.at.isoformat(timespec='seconds')}"
        + (f", since {report.since.isoformat(timespec='seconds')}" if report.since else ""),
    )
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    failed = sum(1 for row in rows if row[3] == "failed")
    click.echo(f"{len(rows) - failed} control(s) passed or not applicable, {failed} failed")


def _events(engine: Any, regions: list[Any], since: datetime | None, *, as_json: bool) -> None:
    from regionvault.core.pipeline.audit import region_events

    logs = [region_events(engine, r.name, since) for r in regions]
    # each region's log in its own order (seq): writers' clocks do not order events
    merged = [(log.region, event) for log in logs for event in log.events]
    problems = [f"{log.region}: {p}" for log in logs for p in log.problems]
    if as_json:
        print_json(
            {
                "events": [{"region": r, **event.to_dict()} for r, event in merged],
                "problems": problems,
                "unreadable": {log.region: log.unreadable for log in logs if log.unreadable},
                "read": {log.region: log.reads(since) for log in logs if not log.unreadable},
            }
        )
    else:
        print_table(
            ("AT", "REGION", "ACTION", "RESULT", "WHO", "POINT", "INSTANCE", "DETAIL"),
            [
                (
                    event.at.isoformat(),
                    r,
                    event.action,
                    event.result + (f": {event.error}" if event.error else ""),
                    f"{event.who.get('user')}"
                    + (f" job {event.who['job']}" if event.who.get("job") else ""),
                    event.point or "-",
                    event.instance or "-",
                    " ".join(f"{k}={v}" for k, v in sorted(event.detail.items()) if v is not None),
                )
                for r, event in merged
            ],
        )
        for log in logs:
            if log.unreadable:
                click.echo(f"{log.region}: {log.unreadable}")
        for problem in problems:
            click.echo(f"problem: {problem}")
    unreadable = [f"{log.region}: {log.unreadable}" for log in logs if log.unreadable and
                  not log.missing]  # fmt: skip
    if unreadable:
        raise ExpectedError(
            f"{len(unreadable)} region(s)' event log cannot be read, the first: {unreadable[0]}"
        )
    if problems:
        raise ExpectedError(
            f"{len(problems)} problem(s) in the event log (damaged, missing or replaced "
            f"events): {problems[0]}"
        )
