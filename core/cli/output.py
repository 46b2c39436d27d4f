"""How commands print: JSON, tables (rich on a terminal, tab-separated otherwise), progress
bars, ages, and the entries a recovery point did not take whole."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import logging

    from regionvault.core.repository import CopyProgress, Progress
    from regionvault.core.types import CaptureIssue, Instance

__all__ = [
    "SHOWN_ISSUES",
    "copy_progress_bar",
    "count_entries",
    "echo_err",
    "echo_info",
    "format_tags",
    "human_age",
    "human_duration",
    "human_size",
    "instance_json",
    "issue_json",
    "issue_line",
    "print_json",
    "print_table",
    "progress_bar",
    "set_verbosity",
    "short_ids",
    "short_regions",
    "shown_path",
    "step_status",
    "warn_issues",
]

#: issues named on standard error by ``backup`` and ``tick``; the rest are counted
SHOWN_ISSUES = 5


#: ``-q``: no progress, and no summary on standard error (warnings and errors still show)
_quiet = False


def set_verbosity(*, quiet: bool = False, verbose: bool = False) -> None:
    """``-q`` / ``-v``: quiet drops progress and summaries; verbose shows the INFO logs
    (on standard error, each line stamped in ISO 8601 UTC). Neither: as Python's default
    (warnings and errors)."""
    import logging

    global _quiet
    _quiet = quiet
    root = logging.getLogger("regionvault")
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.NOTSET)
    if verbose:
        root.addHandler(timestamped_handler())


#: marks the logging handler ``-v`` adds (so that the next command line removes it)
_OURS = "regionvault_cli"


def timestamped_handler() -> logging.Handler:
    """A logging handler to standard error whose lines start with their time in ISO 8601
    UTC (``2026-12-07T23:05:14Z``): ``-v``, and ``run``'s log."""
    import logging
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    setattr(handler, _OURS, True)
    return handler


def echo_err(text: str) -> None:
    click.echo(text, err=True)


def echo_info(text: str) -> None:
    """A summary line on standard error, left out under ``-q``."""
    if not _quiet:
        click.echo(text, err=True)


def _show_progress() -> bool:
    return not _quiet and sys.stderr.isatty()


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
    keep: Collection[str] | None = None,
) -> None:
    """A rich table on a terminal; otherwise one line per row, cells separated by tabs,
    without a header line (tabs and line breaks inside a cell are escaped as ``\\t``,
    ``\\n``), for ``cut`` and ``awk``.

    On a terminal too narrow for it, the columns named in ``keep`` (default: the first, the
    row's key) stay on one line and the others wrap onto more lines: no cell is cut to an
    ellipsis (``local:e…`` names nothing)."""
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
    kept = set(headers[:1] if keep is None else keep)
    # one space between columns (the box's), none at the edges: 80 columns hold more
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        padding=(0, 0),
        pad_edge=False,
        show_edge=False,
    )
    for header in headers:
        table.add_column(header, overflow="fold", no_wrap=header in kept)
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


def human_duration(seconds: float) -> str:
    """One scheme for every duration shown: ``45s``, ``2m05s``, ``3h07m``, ``26h``, ``3d4h``."""
    total = round(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    if total < 172800:
        return f"{total // 3600}h"
    days, hours = divmod(total // 3600, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def human_age(seconds: float | None) -> str:
    """:func:`human_duration`, or ``-`` for none."""
    return "-" if seconds is None else human_duration(seconds)


def human_size(size: int, *, raw: bool = False) -> str:
    """``1.5 MiB`` (binary units, 3 significant digits, at least one decimal under 10:
    ``1.0 MiB``); the byte count itself with ``raw`` (``--bytes``). A value that rounds to
    1000 or more of a unit is shown in the next one (``0.977 MiB``, never ``1e+03 KiB`` nor
    ``1024 KiB``); only TiB grows past it, in whole units."""
    if raw:
        return str(size)
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value = float(size)
    n = 0
    while n < len(units) - 1 and (abs(value) >= 1024 or (n and float(f"{value:.3g}") >= 1000)):
        value /= 1024
        n += 1
    if n == 0:
        return f"{size} B"
    if abs(value) >= 1000:  # TiB only
        return f"{value:.0f} {units[n]}"
    text = f"{value:.3g}"
    if "." not in text and abs(float(text)) < 10:
        text += ".0"
    return f"{text} {units[n]}"


#: the shortest prefix :func:`short_ids` gives
SHORT_ID = 8


def short_ids(ids: Iterable[str], *, wide: bool = False) -> dict[str, str]:
    """Each id's shortest prefix of at least :data:`SHORT_ID` characters that no other of
    ``ids`` starts with (the whole id with ``wide``, or when it is a prefix of another)."""
    unique = sorted(set(ids))
    if wide:
        return {i: i for i in unique}
    out: dict[str, str] = {}
    for n, ident in enumerate(unique):
        need = SHORT_ID
        for other in (unique[n - 1] if n else None, unique[n + 1] if n + 1 < len(unique) else None):
            if other is None:
                continue
            common = 0
            for a, b in zip(ident, other, strict=False):
                if a != b:
                    break
                common += 1
            need = max(need, common + 1)
        out[ident] = ident[:need]
    return out


def short_regions(names: Iterable[str], *, wide: bool = False) -> dict[str, str]:
    """Each region's name without its provider (``local:east`` -> ``east``) where no other
    region of ``names`` has the same short name; the full name otherwise, or with ``wide``."""
    unique = sorted(set(names))
    short = {n: n.partition(":")[2] or n for n in unique}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {n: n if wide or counts[short[n]] > 1 else short[n] for n in unique}


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress bar on a terminal (standard error), in bytes (binary units, as
    :func:`human_size`: ``12.3 MiB/64.0 MiB``, ``31.5 MiB/s``); nothing when not on one, or
    under ``-q``."""
    if not _show_progress():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
    from rich.text import Text

    # rich's DownloadColumn and TransferSpeedColumn speak kB and MB; every table, summary
    # and the copy bar speak KiB and MiB (human_size): one scheme on the screen
    class Transferred(ProgressColumn):
        def render(self, task: Task) -> Text:
            done = human_size(int(task.completed))
            total = "?" if task.total is None else human_size(int(task.total))
            return Text(f"{done}/{total}", style="progress.download")

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            shown = "?" if speed is None else f"{human_size(int(speed))}/s"
            return Text(shown, style="progress.data.speed")

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        Transferred(),
        Speed(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(p: Any) -> None:
            bar.update(task, completed=p.bytes_done, total=p.bytes_total)

        yield update


@contextmanager
def copy_progress_bar(label: str) -> Iterator[Callable[[CopyProgress], None] | None]:
    """:func:`progress_bar` for a copy: chunks sent of the chunks to send, and the bytes
    sent so far."""
    if not _show_progress():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "chunks, {task.fields[sent]}",
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, sent="0 B")

        def update(p: CopyProgress) -> None:
            bar.update(
                task, completed=p.chunks_sent, total=p.chunks_total, sent=human_size(p.bytes_sent)
            )

        yield update


@contextmanager
def step_status(label: str) -> Iterator[Callable[[str, int], None] | None]:
    """A spinner on a terminal (standard error) naming the step running now, for a command
    made of steps (``tick``, ``run``): the callback takes the step's name and its number of
    jobs (0: none to show). Nothing when not on a terminal, or under ``-q``."""
    if not _show_progress():
        yield None
        return
    from rich.console import Console

    with Console(stderr=True).status(f"{label}: starting") as status:

        def update(step: str, jobs: int) -> None:
            count = f" ({jobs} job{'' if jobs == 1 else 's'})" if jobs else ""
            status.update(f"{label}: {step}{count}")

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


def issue_json(issue: CaptureIssue) -> dict[str, str]:
    """An entry not taken whole, for ``--json``."""
    return {"path": shown_path(issue.path), "kind": str(issue.kind), "message": issue.message}


def warn_issues(issues: Sequence[CaptureIssue], total: int) -> None:
    """Name the first few entries a point did not take whole on standard error, one line
    each (``regionvault: warning: <path>: <message>``), then count the rest."""
    for issue in issues[:SHOWN_ISSUES]:
        echo_err(f"regionvault: warning: {issue_line(issue)}")
    more = total - min(len(issues), SHOWN_ISSUES)
    if more > 0:
        echo_err(f"regionvault: warning: ... and {more} more")
