"""``regionvault rotate-keys``: a new master key for a region, and everything its repository
holds re-wrapped under it (docs/commands.md), so that the old key can then be disabled."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import print_json
from regionvault.core.cli.root import CliState, ExpectedError, pass_state
from regionvault.core.errors import RepositoryNotFound

__all__ = ["rotate_keys"]

#: below this many packs the header reading is too quick to be worth a progress line
_PROGRESS_FROM = 1024


def _progress() -> Callable[[int, int], None]:
    """Progress lines on standard error while pack headers are read (many runs only)."""

    def update(done: int, total: int) -> None:
        if total >= _PROGRESS_FROM:
            end = "\n" if done == total else "\r"
            sys.stderr.write(f"reading pack headers: {done:,}/{total:,}{end}")
            sys.stderr.flush()

    return update


@click.command("rotate-keys")
@click.option("--region", "-r", metavar="REGION", required=True, help="The region to rotate.")
@json_option
@pass_state
def rotate_keys(state: CliState, region: str, as_json: bool) -> None:
    """Make a new master key current in REGION and re-wrap every wrapped data key and
    repository secret its vault holds under it, without rewriting packs; then the old key
    can be disabled. Run again after an interruption, it finishes the rotation."""
    engine = state.engine()
    name = state.site().region(region).name
    try:
        report = engine.rotate_keys(name, _progress())
    except RepositoryNotFound as exc:
        raise ExpectedError(f"{exc}, so there is nothing to re-wrap (no key was rotated)") from None
    row = {
        "region": report.region,
        "old_key_id": report.old_key_id,
        "new_key_id": report.new_key_id,
        "generation": report.generation,
        "runs": report.runs,
        "packs": report.packs,
        "resumed": report.resumed,
        "deleted": report.deleted,
        "seconds": round(report.seconds, 3),
    }
    if as_json:
        print_json(row)
        return
    what = "finished an interrupted rotation" if report.resumed else "rotated"
    click.echo(
        f"{report.region}: {what}: master key {report.new_key_id} (was "
        f"{report.old_key_id or 'not recorded'}); keyring generation {report.generation} "
        f"holds {report.runs} run key(s); config re-wrapped; {report.seconds:.2f} s"
    )
