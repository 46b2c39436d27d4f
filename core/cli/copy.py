"""``copy``: one recovery point to another region now, re-encrypted there under that region's
own keys (``tick`` copies what the replication pairs ask for)."""

from __future__ import annotations

import click
from regionvault.core.cli.output import count_entries, echo_err
from regionvault.core.cli.root import CliState, pass_state

__all__ = ["copy"]


@click.command()
@click.argument("point")
@click.option("--to", "to", required=True, metavar="REGION", help="Destination region.")
@click.option("--from", "source", metavar="REGION", help="Region holding POINT (default: found).")
@pass_state
def copy(state: CliState, point: str, to: str, source: str | None) -> None:
    """Copy recovery point POINT to region --to, re-encrypted under its keys.

    Prints the copy's recovery point id alone on the last line of standard output."""
    engine = state.engine()
    result = engine.copy(point, source=source, to=to)
    lineage = result.point.lineage
    if result.existing and (lineage is None or not lineage.source_recovery_point.startswith(point)):
        # a copy sent back where it came from: the original there is the answer
        echo_err(f"{point} came from {to}: its original there is {result.point.id}")
    elif result.existing:
        echo_err(f"{to} already holds a copy of {point}: {result.point.id}")
    else:
        echo_err(
            f"copied {result.chunks_sent} of {result.chunks_total} chunks, "
            f"{result.bytes_moved:,} bytes over transit"
        )
    if result.point.issues:
        # a copy is as complete as its source: say so, as the backup did
        echo_err(
            f"regionvault: warning: point {result.point.id} is incomplete: "
            f"{count_entries(result.point.issues)} not taken whole when its source was backed up"
        )
    click.echo(result.point.id)
