"""``copy``: one recovery point to another region now, re-encrypted there under that region's
own keys (``tick`` copies what the replication pairs ask for)."""

from __future__ import annotations

import click
from regionvault.core.cli.backup import point_json
from regionvault.core.cli.interrupts import interruptible
from regionvault.core.cli.output import (
    copy_progress_bar,
    count_entries,
    echo_err,
    echo_info,
    print_json,
)
from regionvault.core.cli.root import CliState, pass_state

__all__ = ["copy"]


@click.command()
@click.argument("point")
@click.option("--to", "to", required=True, metavar="REGION", help="Destination region.")
@click.option("--from", "source", metavar="REGION", help="Region holding POINT (default: found).")
@click.option("--json", "as_json", is_flag=True, help="Print the copy as JSON.")
@pass_state
def copy(state: CliState, point: str, to: str, source: str | None, as_json: bool) -> None:
    """Copy recovery point POINT to region --to, re-encrypted under its keys.

    Prints the copy's recovery point id alone on the last line of standard output (with
    --json, one JSON document: the copy's point and what crossed). Ctrl-C lets the copy
    finish up to its commit and exits 130 (a second Ctrl-C exits at once: running it
    again resumes it)."""
    engine = state.engine()
    # the whole body: a Ctrl-C while the result is printed still prints the id, then says so
    with interruptible("the copy") as interrupted:
        with copy_progress_bar(f"copy {point[:8]} to {to}") as progress:
            result = engine.copy(point, source=source, to=to, progress=progress)
        if as_json:
            print_json(
                {
                    **point_json(result.point),
                    "existing": result.existing,
                    "chunks_total": result.chunks_total,
                    "chunks_sent": result.chunks_sent,
                    "bytes_moved": result.bytes_moved,
                }
            )
        lineage = result.point.lineage
        if result.existing and (
            lineage is None or not lineage.source_recovery_point.startswith(point)
        ):
            # a copy sent back where it came from: the original there is the answer
            echo_info(f"{point} came from {to}: its original there is {result.point.id}")
        elif result.existing:
            echo_info(f"{to} already holds a copy of {point}: {result.point.id}")
        else:
            echo_info(
                f"copied {result.chunks_sent} of {result.chunks_total} chunks, "
                f"{result.bytes_moved:,} bytes over transit"
            )
        if result.point.issues:
            # a copy is as complete as its source: say so, as the backup did
            echo_err(
                f"regionvault: warning: point {result.point.id} is incomplete: "
                f"{count_entries(result.point.issues)} not taken whole when its source was "
                "backed up"
            )
        if not as_json:
            click.echo(result.point.id)
    interrupted.exit(f"the copy finished first: point {result.point.id} is committed in {to}")
