"""The pipeline's commands: ``tag`` (the tagger alone), ``tick`` (one pass: tag, back up
what is due, copy, apply retention; for cron) and ``run`` (tick every interval until
stopped), over every region or, with ``--region``, as that region's own service."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.interrupts import Interrupted, interruptible
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import (
    SHOWN_ISSUES,
    count_entries,
    echo_err,
    issue_line,
    print_json,
    step_status,
    timestamped_handler,
)
from regionvault.core.cli.root import EXIT_INCOMPLETE, CliState, ExpectedError, pass_state
from regionvault.core.durations import parse_duration

if TYPE_CHECKING:
    from regionvault.core.pipeline import Service, TickReport
    from regionvault.core.pipeline.metrics import Metrics

__all__ = ["run", "tag", "tick"]


@contextlib.contextmanager
def _service(
    state: CliState,
    executor: str | None,
    stop: threading.Event | None = None,
    **options: Any,
) -> Iterator[Service]:
    """The service that ticks over the site's engine (``options`` go to the Engine), on the
    site's executor (``[executor]``), or on ``executor`` when given (``--executor``). For
    ``thread``, this process's threads, made afresh by each tick as ever; for another kind
    (plugins/celery), the executor it makes, closed when the command ends."""
    from regionvault.core.pipeline import Service
    from regionvault.core.pipeline.kinds import THREAD, executor_kind

    engine = state.engine(**options)
    kind = executor_kind(state.site(), executor)
    with _failures_reported_once():
        if kind is THREAD:
            yield Service(engine)
            return
        with kind.executor(engine, stop=stop) as running:
            yield Service(engine, executor=running)


def _region_tick_options(
    state: CliState, region: str | None, copy_grace: str | None
) -> tuple[str | None, dict[str, Any]]:
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
_EXECUTOR = click.option(
    "--executor",
    metavar="KIND",
    help="Run the jobs on this executor kind, whatever the site's [executor] says "
    "(thread: in this process).",
)
_COPY_GRACE = click.option(
    "--copy-grace",
    metavar="DURATION",
    help="With --region: offer a point again when no receipt came this long after (1h).",
)


@click.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@json_option
@pass_state
def tag(state: CliState, region: str | None, as_json: bool) -> None:
    """Give untagged instances the site's default policy tag (never overwriting one)."""
    engine = state.engine()
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
                    "completed": [
                        {
                            "id": c.instance_id,
                            "name": c.name,
                            "value": c.value,
                            "completed": c.completed,
                        }
                        for c in rep.completed
                    ],
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
        for c in rep.completed:
            click.echo(f"  completed {c}")
        for n in rep.malformed:
            click.echo(f"  malformed: {n}")
        for n in rep.failed:
            click.echo(f"  failed: {n}")


def _tick_json(report: TickReport) -> dict[str, Any]:
    return report.to_dict()


def _utc_stamp() -> str:
    """Now in ISO 8601 UTC, to the second: what starts each of ``run``'s lines."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_tick(report: TickReport, *, stamped: bool = False) -> None:
    """The tick's report on standard output; with ``stamped`` (``run``), each line starts
    with the time it was printed (ISO 8601 UTC)."""
    echo: Callable[[str], None] = click.echo
    if stamped:
        stamp = _utc_stamp()

        def echo(line: str) -> None:
            click.echo(f"{stamp} {line}")

    for s in report.schedule:
        echo(s.summary())
        for m in s.malformed:
            echo(f"  malformed: {m}")
    for o in report.jobs:
        if o.status.value == "replayed":
            continue
        if o.incomplete:
            point = o.result.get("point") if isinstance(o.result, dict) else None
            of = f" (point {point})" if point else ""
            echo(f"incomplete {o.key}: {count_entries(o.issues_total)} not taken whole{of}")
            for issue in o.issues[:SHOWN_ISSUES]:
                echo(f"  {issue_line(issue)}")
            if o.issues_total > SHOWN_ISSUES:
                echo(f"  ... and {o.issues_total - SHOWN_ISSUES:,} more")
            continue
        line = f"{o.status.value:8} {o.key}"
        if o.error:
            line += f": {o.error}"
        echo(line)
    for p in report.problems:
        echo(f"problem: {p}")
    for n in report.notes:
        echo(f"note: {n}")
    echo(tick_summary(report))


def tick_summary(report: TickReport) -> str:
    """The tick's last line: what its jobs really did, each job counted once. ``failed``
    counts the jobs that failed and the problems met outside any job (what makes the tick
    exit 1); a job replayed from an earlier tick did nothing now and is counted apart."""
    counts = {status: 0 for status in ("done", "incomplete", "failed", "busy", "stopped")}
    replayed = 0
    for o in report.jobs:
        if o.status.value == "replayed":
            replayed += 1
        elif o.status.value == "done" and o.incomplete:
            counts["incomplete"] += 1
        elif o.status.value in counts:
            counts[o.status.value] += 1
    counts["failed"] += len(report.problems)
    where = f" {report.region}" if report.region else ""
    line = f"tick{where}: " + ", ".join(f"{status} {n}" for status, n in counts.items())
    return line + (f" (and {replayed} done before, replayed)" if replayed else "")


class _FailureLoggedOnce(logging.Filter):
    """Drops the executor's log line about a failed job while a command runs that prints
    the tick's report, which names the failure already: printed once, not twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("job %s failed after"))


@contextlib.contextmanager
def _failures_reported_once() -> Iterator[None]:
    logger = logging.getLogger("regionvault.core.pipeline.executor")
    only_once = _FailureLoggedOnce()
    logger.addFilter(only_once)
    try:
        yield
    finally:
        logger.removeFilter(only_once)


def _exit_for(failed: int, incomplete: int) -> None:
    """Exit 1 when a step failed, else 3 when a job did its work but not whole."""
    if failed:
        raise ExpectedError(f"{failed} step(s) failed")
    if incomplete:
        echo_err(f"regionvault: warning: {incomplete} job(s) incomplete: see their issues above")
        raise click.exceptions.Exit(EXIT_INCOMPLETE)


@click.command()
@_REGION_TICK
@_COPY_GRACE
@_EXECUTOR
@json_option
@pass_state
def tick(
    state: CliState,
    region: str | None,
    copy_grace: str | None,
    executor: str | None,
    as_json: bool,
) -> None:
    """One pass: tag, back up what is due, copy, apply retention (for cron).

    Exits 1 when a step failed, else 3 when a backup was incomplete (its point names
    entries it could not take whole), else 0. Ctrl-C lets the jobs running finish and runs
    no further step: it says what was committed and what the next tick does, and exits 130
    (a second Ctrl-C exits at once)."""
    name, options = _region_tick_options(state, region, copy_grace)
    interrupted = Interrupted()
    # the whole body: a Ctrl-C while the report is printed still prints it, then the state
    with interruptible("the tick", interrupted):
        with (
            _service(state, executor, interrupted.requested, **options) as service,
            step_status("tick") as on_step,
        ):
            service.halt = interrupted.requested
            service.on_step = on_step
            report = service.tick(name, stop=interrupted.requested)
        if as_json:
            print_json(_tick_json(report))
        else:
            _print_tick(report)
    interrupted.exit(_stopped_state(report))
    _exit_for(len(report.failures()) + len(report.problems), len(report.incomplete()))


def _stopped_state(report: TickReport) -> str:
    """What a tick stopped by Ctrl-C left: the points it committed (a backup's, a copy's
    that was not there already), the other jobs it finished (drills, receipts recorded), and
    what it did not run (the next tick runs it). Each job is named by its kind, not by the
    fields of its result (a drill's result names the point it drilled, a receipt's the copy
    another region made)."""
    from regionvault.core.pipeline.jobs import BACKUP, COPY, COPY_COMMIT, COPY_RECEIPT, DRILL

    made: list[str] = []
    other: list[str] = []
    for o in report.jobs:
        if o.status.value != "done" or not isinstance(o.result, dict):
            continue
        if o.kind == BACKUP and o.result.get("point"):
            made.append(f"backup {o.result['point']}")
        elif o.kind in (COPY, COPY_COMMIT) and o.result.get("copy"):
            if not o.result.get("existing"):
                made.append(f"copy {o.result['copy']}")
        elif o.kind == DRILL and o.result.get("point"):
            other.append(f"drill of {o.result['point']}")
        elif o.kind == COPY_RECEIPT and o.result.get("copy") and o.result.get("recorded"):
            other.append(f"receipt of copy {o.result['copy']}")
    committed = f"committed {', '.join(made)}" if made else "nothing new committed"
    if other:
        committed += f"; done {', '.join(other)}"
    skipped = [n.removeprefix("stopped before ") for n in report.notes if n.startswith("stopped")]
    left = (
        f"not run: {'; '.join(skipped)} (the next tick runs them)"
        if skipped
        else "every step had run"
    )
    return f"{committed}; {left}"


@contextlib.contextmanager
def _serving(metrics: Metrics | None, address: tuple[str, int] | None) -> Iterator[None]:
    """``/metrics`` served on ``address`` while the block runs (nothing without one)."""
    if metrics is None or address is None:
        yield
        return
    server, shown = metrics.serve(*address)
    echo_err(f"regionvault: serving metrics on http://{shown}/metrics")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@click.command()
@click.option(
    "--interval", metavar="DURATION", help="Time between ticks (default: the site's intervals)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per tick, one per line.")
@click.option("--max-ticks", type=click.IntRange(min=1), help="Stop after this many ticks.")
@_REGION_TICK
@_COPY_GRACE
@_EXECUTOR
@click.option(
    "--metrics-addr",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics; :PORT or PORT alone listens "
    "on 127.0.0.1 (another host only when named: docs/metrics.md).",
)
@pass_state
def run(
    state: CliState,
    interval: str | None,
    max_ticks: int | None,
    region: str | None,
    copy_grace: str | None,
    executor: str | None,
    metrics_addr: str | None,
    as_json: bool,
) -> None:
    """Tick every interval until stopped; SIGTERM or Ctrl-C lets the current tick finish
    (as service managers expect: exit 0 then, when no step failed).

    Each line of a tick's report starts with its time (ISO 8601 UTC); with --json, each
    tick is one JSON document on one line. Exits as one tick over all the ticks it ran:
    1 when a step failed, else 3 when a backup was incomplete, else 0."""
    address: tuple[str, int] | None = None
    if metrics_addr is not None:
        from regionvault.core.pipeline.metrics import MetricsAddressError, parse_metrics_addr

        try:
            address = parse_metrics_addr(metrics_addr)
        except MetricsAddressError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-addr") from None
    name, options = _region_tick_options(state, region, copy_grace)
    every = None
    if interval is not None:
        try:
            every = parse_duration(interval, bare_unit="s")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--interval") from None
    metrics = state.metrics() if address is not None else None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        # run's stop is not the tick's halt: the tick in progress finishes whole
        echo_err(
            f"{_utc_stamp()} regionvault: {name}: the tick in progress finishes (all its "
            "steps), then run stops"
        )
        stop.set()

    log = logging.getLogger("regionvault")
    if not log.handlers:  # a daemon's log lines say when (-v put its own, stamped too)
        log.addHandler(timestamped_handler())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failed = incomplete = 0
    shown_step: Callable[[str, int], None] | None = None  # the spinner on a terminal

    def on_tick(report: TickReport) -> None:
        nonlocal failed, incomplete
        if as_json:
            click.echo(json.dumps(_tick_json(report), default=str))
        else:
            _print_tick(report, stamped=True)
        sys.stdout.flush()
        failed += len(report.failures()) + len(report.problems)
        incomplete += len(report.incomplete())
        state.write_metrics(final=False)  # the textfile, tick by tick (docs/metrics.md)
        if shown_step is not None:
            shown_step("waiting for the next tick", 0)

    with (
        _service(state, executor, stop, **options) as service,
        _serving(metrics, address),
        step_status("run") as on_step,
    ):
        service.on_step = shown_step = on_step
        ticks = service.run(stop, interval=every, on_tick=on_tick, max_ticks=max_ticks, region=name)
    echo_err(f"{_utc_stamp()} regionvault: stopped after {ticks} tick(s)")
    _exit_for(failed, incomplete)
