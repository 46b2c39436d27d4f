"""How commands print: JSON, tables (rich on a terminal, tab-separated otherwise), progress
bars, ages, and the entries a recovery point did not take whole."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from regionvault.core.repository import Progress
    from regionvault.core.types import CaptureIssue, Instance

__all__ = [
    "SHOWN_ISSUES",
    "count_entries",
    "echo_err",
    "format_tags",
    "human_age",
    "instance_json",
    "issue_line",
    "print_json",
    "print_table",
    "progress_bar",
    "shown_path",
    "warn_issues",
]

#: issues named on standard error by ``backup`` and ``tick``; the rest are counted
SHOWN_ISSUES = 5


def echo_err(text: str) -> None:
    click.echo(text, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _plain_cell(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    title: str | None = None,
    tty: bool | None = None,
) -> None:
    """A rich table on a terminal; otherwise one line per row, cells separated by tabs,
    without a header line (tabs and line breaks inside a cell are escaped as ``\\t``,
    ``\\n``), for ``cut`` and ``awk``."""
    rows = [list(r) for r in rows]
    if tty is None:
        tty = sys.stdout.isatty()
    if not tty:
        for row in rows:
            click.echo("\t".join(_plain_cell(c) for c in row))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not rows:
        click.echo("(none)")
        return
    table = Table(*headers, title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout).print(table)


def format_tags(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags.items())


def instance_json(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "name": instance.name,
        "region": instance.region,
        "state": instance.state,
        "tags": dict(instance.tags),
        "function": instance.function,
        "capture_kinds": sorted(str(k) for k in instance.capture_kinds),
    }


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


# --------------------------------------------------------------------------- capture issues


def shown_path(path: str) -> str:
    """A captured path as one printable line: bytes that are not UTF-8 as ``\\xNN``, line
    breaks and tabs escaped."""
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def count_entries(count: int) -> str:
    return f"{count:,} entry" if count == 1 else f"{count:,} entries"


def issue_line(issue: CaptureIssue) -> str:
    """``<path>: <message>``; a hook's issue, about the whole capture, is its message."""
    return f"{shown_path(issue.path)}: {issue.message}" if issue.path else issue.message


def warn_issues(issues: Sequence[CaptureIssue], total: int) -> None:
    """Name the first few entries a point did not take whole on standard error, one line
    each (``regionvault: warning: <path>: <message>``), then count the rest."""
    for issue in issues[:SHOWN_ISSUES]:
        echo_err(f"regionvault: warning: {issue_line(issue)}")
    more = total - min(len(issues), SHOWN_ISSUES)
    if more > 0:
        echo_err(f"regionvault: warning: ... and {more} more")
