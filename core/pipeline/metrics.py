"""Prometheus metrics of the pipeline (docs/metrics.md): a plugin that counts what the hooks
report into its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide
default one), and a collector that reads the recovery points' gauges (last success, RPO,
RTO) as :meth:`Engine.status` reads them whenever the metrics are read, so that they are
right after a restart. Each region is read on its own: one that cannot be read leaves out
its own gauges only (``regionvault_region_up`` 0), never the others'.

::

    metrics = Metrics(one_shot=False)        # a daemon: jobs are counted from after_job
    metrics.attach(engine)                   # registered on the site's plugin manager
    server = metrics.serve("127.0.0.1", 9464)  # /metrics (prometheus_client's server)
    ...
    metrics.detach()
    metrics.write_textfile(Path("/var/lib/node_exporter"))  # regionvault.prom, running totals

Every event feeds one metric from one hook only, so nothing is counted twice: in a tick
(``one_shot=False``) the jobs are counted from ``regionvault_after_job``, which carries every
job's outcome; in a one-shot command (``one_shot=True``), which runs no jobs, from the hook of
the step itself (``after_backup`` and ``after_capture``'s error, ``after_copy``,
``after_verify``). Bytes, transit bytes, verify failures and RTOs come from their own hooks in
both modes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.parser import text_string_to_metric_families
from regionvault.core.errors import ObjectNotFound, RegionVaultError, RepositoryNotFound
from regionvault.core.fsutil import write_atomic
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    DRILL,
    PLAN_BACKUPS,
    PLAN_DRILLS,
    PLAN_INBOX,
    PLAN_OFFERS,
    RETENTION,
    TAG,
    JobOutcome,
    JobStatus,
    split_key,
)
from regionvault.core.pipeline.objectives import StatusObjectives, newest_captured
from regionvault.core.pipeline.reports import StatusRow
from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from regionvault.core.interfaces import Capture
    from regionvault.core.pipeline.engine import Engine
    from regionvault.core.types import Instance, RecoveryPoint

__all__ = [
    "DRILL",
    "KINDS",
    "TEXTFILE",
    "VERIFY",
    "Metrics",
    "MetricsAddressError",
    "MetricsBusyError",
    "metric_kind",
    "parse_metrics_addr",
]

log = logging.getLogger(__name__)

#: the kinds of ``regionvault_jobs_total`` that the pipeline's own jobs map onto
VERIFY = "verify"
KINDS = (TAG, BACKUP, COPY, RETENTION, DRILL, VERIFY)

#: the textfile every command writes into ``--metrics-dir``
TEXTFILE = "regionvault.prom"
#: the lock around a textfile's read-add-write (a hidden name: the textfile collector reads
#: ``*.prom`` only, and so does the clean-up of temporaries)
_LOCK = ".regionvault.prom.lock"
#: the temporaries of a write (:func:`~regionvault.core.fsutil.write_atomic`'s hidden
#: ``.regionvault.prom.HEX.tmp``; ``regionvault.prom.PID.THREAD``: earlier versions')
_TEMPORARY = re.compile(rf"\.{re.escape(TEXTFILE)}\.[0-9a-f]+\.tmp|{re.escape(TEXTFILE)}\.\d+\.\d+")
#: how long a write waits for another command's write of the same textfile
LOCK_TIMEOUT = 10.0
_LOCK_POLL = 0.05

#: job kinds counted as one job of a metric kind
_COUNTED = {
    TAG: TAG,
    BACKUP: BACKUP,
    COPY: COPY,
    COPY_COMMIT: COPY,  # a phased copy is made by its commit
    RETENTION: RETENTION,
    DRILL: DRILL,
    VERIFY: VERIFY,
}
#: job kinds that are part of another kind's step: counted only when they fail, as that kind
#: (a phased copy's other phases, the planning jobs of a distributed tick), so that one copy
#: is one copy, and one backup one backup
_COUNTED_WHEN_FAILED = {
    COPY_OFFER: COPY,
    COPY_REQUEST: COPY,
    COPY_SEND: COPY,
    COPY_RECEIPT: COPY,
    PLAN_BACKUPS: BACKUP,
    PLAN_INBOX: COPY,
    PLAN_OFFERS: COPY,
    PLAN_DRILLS: DRILL,
}
#: kinds whose last success per instance is read from the recovery points (the status), not
#: from the jobs: the job names no instance, and the point's own time is the one that counts
_FROM_POINTS = frozenset({BACKUP, COPY, DRILL})
#: the jobs of a copy, counted in its destination region whichever region ran them
_COPY_JOBS = frozenset({COPY, COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT, COPY_RECEIPT})
#: the one-shot commands whose failure (before any hook counted it) is a failed job
_COMMAND_KINDS = {"backup": BACKUP, "copy": COPY, "verify": VERIFY, "prune": RETENTION}

#: job durations: from a tag of a few instances to a backup of hours
_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 3 * 3600, 12 * 3600, math.inf)


#: (kind, region, instance) of a last success
_SuccessKey = tuple[str, str, str]
#: a sample's name and sorted labels
_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class MetricsAddressError(RegionVaultError):
    """A ``--metrics-addr`` that is not ``HOST:PORT``, ``:PORT`` or ``PORT``, or that
    cannot be served (the port in use, an address not of this machine)."""


class MetricsBusyError(RegionVaultError):
    """The textfile's lock was held by another writer for longer than :data:`LOCK_TIMEOUT`:
    this write was given up (a warning, never the command's failure)."""


def metric_kind(job_kind: str, status: JobStatus) -> str | None:
    """The ``kind`` label a job of ``job_kind`` ending in ``status`` is counted under, or
    None when it is not counted (a copy phase or planning job that did not fail). A
    plugin's own job kinds are counted under their own names."""
    counted = _COUNTED.get(job_kind)
    if counted is not None:
        return counted
    part_of = _COUNTED_WHEN_FAILED.get(job_kind)
    if part_of is not None:
        return part_of if status is JobStatus.FAILED else None
    return job_kind


def _result(outcome: JobOutcome) -> str:
    """The ``result`` label: ok, incomplete, failed, busy, stopped, or replayed (done by an
    earlier run of its key: not done again)."""
    if outcome.status is JobStatus.REPLAYED:
        return "replayed"
    return outcome.outcome


def _copy_ends(outcome: JobOutcome) -> tuple[str, str] | None:
    """``(source, destination)`` of a copy job or copy phase, from its key."""
    parts = split_key(outcome.key)
    if len(parts) < 4:
        return None
    region, peer = parts[1], parts[3]
    if outcome.kind in (COPY, COPY_OFFER, COPY_SEND, COPY_RECEIPT):
        return region, peer
    return peer, region


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6), ``:PORT`` or ``PORT`` as ``(host, port)``;
    no host means 127.0.0.1. Port 0 asks for any free port."""
    spec = text.strip()
    if re.fullmatch(r"[0-9]+", spec):
        host, port = "", spec
    else:
        host, sep, port = spec.rpartition(":")
        if not sep:
            raise MetricsAddressError(
                f"metrics address {text!r}: expected HOST:PORT, :PORT or PORT"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise MetricsAddressError(
                f"metrics address {text!r}: write an IPv6 host in brackets ([::1]:PORT)"
            )
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) <= 65535:
        raise MetricsAddressError(f"metrics address {text!r}: port must be a number 0-65535")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class _Reading:
    """The gauges read from the vaults at one moment: every region of the site, whether it
    could be read (``up``), and the status rows of those that were."""

    up: dict[str, bool]
    rows: list[StatusRow]


def _region_rows(engine: Engine, region: str, objectives: StatusObjectives) -> list[StatusRow]:
    """``region``'s rows of :meth:`Engine.status` (its loop over one region: the newest data
    by capture, the last drill from the event log and the objectives); raises what reading
    the region raises."""
    try:
        repo = engine.repository(region, create=False)
        points = repo.points()
    except (RepositoryNotFound, ObjectNotFound):
        return []  # nothing backed up or copied here yet
    by_instance: dict[str, list[RecoveryPoint]] = {}
    for p in points:
        by_instance.setdefault(p.instance_id, []).append(p)
    rows = []
    for instance_id, pts in sorted(by_instance.items()):
        newest, captured = newest_captured(repo, pts) or (pts[-1], pts[-1].created_at)
        copies = [p for p in pts if p.lineage is not None]
        row = StatusRow(
            instance_id=instance_id,
            instance_name=newest.instance_name,
            region=region,
            role="copy" if copies and len(copies) == len(pts) else "home",
            newest_point=newest.id,
            newest_at=newest.created_at,
            rpo_seconds=(objectives.now - captured).total_seconds(),
            points=len(pts),
        )
        rows.append(objectives.apply(row, newest, captured))
    return rows


def _read_vaults(engine: Engine) -> _Reading:
    """:meth:`Engine.status`'s rows, region by region: a region that cannot be read (an
    outage, a key not to be had) is down, with a warning in the log, and the others are
    read all the same."""
    objectives = StatusObjectives(engine, engine.clock())
    up: dict[str, bool] = {}
    rows: list[StatusRow] = []
    try:
        for region in engine.site.regions:
            try:
                rows.extend(_region_rows(engine, region.name, objectives))
            except Exception as exc:
                log.warning("metrics: cannot read %s for the gauges: %s", region.name, exc)
                up[region.name] = False
            else:
                up[region.name] = True
    finally:
        objectives.close()
    return _Reading(up, rows)


class _StatusCollector:
    """The gauges read from the vaults each time they are collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.metrics.reading())

    def _families(self, reading: _Reading | None) -> list[Metric]:
        last = GaugeMetricFamily(
            "regionvault_last_success_timestamp_seconds",
            "Unix time of the newest success of each kind per region and instance (backup, "
            "copy, drill: from the recovery points; others: this process's jobs).",
            labels=["kind", "region", "instance"],
        )
        rpo = GaugeMetricFamily(
            "regionvault_rpo_seconds",
            "Age of the data in the newest recovery point of each instance in each region.",
            labels=["region", "instance"],
        )
        rto = GaugeMetricFamily(
            "regionvault_drill_rto_seconds",
            "Seconds from the restore request to a healthy instance, in the last drill.",
            labels=["region", "instance"],
        )
        up = GaugeMetricFamily(
            "regionvault_region_up",
            "1 when the region's vault could be read for these gauges, 0 when it could not "
            "(its gauges are then left out).",
            labels=["region"],
        )
        successes, rtos = self.metrics.event_gauges()
        for row in reading.rows if reading is not None else ():
            if row.newest_at is not None:
                key = (BACKUP if row.role == "home" else COPY, row.region, row.instance_id)
                successes[key] = max(successes.get(key, 0.0), row.newest_at.timestamp())
            if row.rpo_seconds is not None:
                rpo.add_metric([row.region, row.instance_id], row.rpo_seconds)
            if row.last_drill_at is not None and row.last_drill_healthy:
                key = (DRILL, row.region, row.instance_id)
                successes[key] = max(successes.get(key, 0.0), row.last_drill_at.timestamp())
            if row.last_drill_rto is not None:
                rtos[(row.region, row.instance_id)] = row.last_drill_rto
        for region, read in sorted(reading.up.items()) if reading is not None else ():
            up.add_metric([region], 1.0 if read else 0.0)
        for (kind, region, instance), at in sorted(successes.items()):
            last.add_metric([kind, region, instance], at)
        for (region, instance), seconds in sorted(rtos.items()):
            rto.add_metric([region, instance], seconds)
        return [last, rpo, rto, up]


class _PluginRegistry(CollectorRegistry):
    """The registry one plugin's ``regionvault_metrics`` hook is given: what it registers
    joins the metrics' registry only when the hook returns, so a hook that fails half-way
    adds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[Any] = []

    def register(self, collector: Any) -> None:
        super().register(collector)
        self.added.append(collector)


class Metrics:
    """The pipeline's Prometheus metrics (docs/metrics.md), fed through the hooks while
    :meth:`attach`-ed to an engine. ``one_shot``: count jobs from the steps' own hooks (a
    command that runs no tick), not from ``regionvault_after_job`` (a tick, a daemon)."""

    def __init__(self, *, one_shot: bool) -> None:
        self.one_shot = one_shot
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "regionvault_jobs",
            "Jobs run, by kind (tag, backup, copy, retention, drill, verify), region and "
            "result (ok, incomplete, failed, busy, stopped, replayed).",
            ["kind", "region", "result"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "regionvault_job_duration_seconds",
            "How long jobs ran, by kind and region.",
            ["kind", "region"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes = Counter(
            "regionvault_bytes",
            "Bytes written to (a backup's new packs) and read from (verify) a region's vault.",
            ["region", "direction"],
            registry=self.registry,
        )
        self.transit = Counter(
            "regionvault_transit_bytes",
            "Bytes that crossed the transit link between two regions for copies.",
            ["source", "destination"],
            registry=self.registry,
        )
        self.verify_failures = Counter(
            "regionvault_verify_failures",
            "Verifications of a region's vault that found errors.",
            ["region"],
            registry=self.registry,
        )
        self.plugin_errors = Counter(
            "regionvault_metrics_plugin_errors",
            "Plugins whose regionvault_metrics hook failed (their metrics are left out).",
            ["plugin"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._successes: dict[_SuccessKey, float] = {}
        self._rtos: dict[tuple[str, str], float] = {}
        self._captures: dict[tuple[str, str], float] = {}
        #: the kinds a failed job was counted of (a command's failure is then not counted again)
        self._failed_kinds: set[str] = set()
        self._engine: Engine | None = None
        self._pm: pluggy.PluginManager | None = None
        self._frozen: _Reading | None = None
        self._plugins_added = False
        #: warnings for the command's user (a plugin's hook that failed), taken by the CLI
        self._warnings: list[str] = []
        #: the counters' values as last written to a textfile (what is added next is the rest)
        self._written: dict[_SampleKey, float] = {}
        self.registry.register(_StatusCollector(self))

    # ------------------------------------------------------------------ attach, status

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s plugin manager (every hook this process calls reaches it,
        as a plugin author's do), read the gauges from its status, and let the plugins add
        their collectors (``regionvault_metrics``, once)."""
        if self._engine is not None:
            raise RegionVaultError("these metrics are attached to an engine already")
        pm = engine.site.plugin_manager
        pm.register(self, name=f"regionvault-metrics-{id(self)}")
        self._engine, self._pm, self._frozen = engine, pm, None
        if not self._plugins_added:
            self._plugins_added = True
            self._add_plugin_collectors(pm)

    def _add_plugin_collectors(self, pm: pluggy.PluginManager) -> None:
        """Each plugin's ``regionvault_metrics`` hook, called on its own: one that raises, or
        registers a name taken already (the registry's ValueError), is left out with a
        warning and counted in ``regionvault_metrics_plugin_errors_total``; the command runs
        (as :meth:`Engine.notify` treats a failing hook)."""
        hook = pm.hook.regionvault_metrics
        plugins: list[object] = []
        for impl in hook.get_hookimpls():
            if not any(impl.plugin is p for p in plugins):
                plugins.append(impl.plugin)
        for plugin in plugins:
            name = pm.get_name(plugin) or type(plugin).__name__
            own = _PluginRegistry()
            added: list[Any] = []
            try:
                others = [p for p in plugins if p is not plugin]
                pm.subset_hook_caller("regionvault_metrics", others)(registry=own)
                for collector in own.added:
                    self.registry.register(collector)
                    added.append(collector)
            except Exception as exc:
                for collector in added:
                    self.registry.unregister(collector)
                self.plugin_errors.labels(name).inc()
                message = (
                    f"plugin {name}: its regionvault_metrics hook failed "
                    f"({type(exc).__name__}: {exc}); its metrics are left out"
                )
                log.warning("%s", message, exc_info=True)
                self._warnings.append(message)

    def take_warnings(self) -> list[str]:
        """The warnings for the command's user since the last call (a plugin's failed
        ``regionvault_metrics`` hook): one line each."""
        warnings, self._warnings = self._warnings, []
        return warnings

    @property
    def attached(self) -> bool:
        return self._engine is not None

    def detach(self) -> None:
        """Unregister from the plugin manager, keeping the status as read now for a later
        :meth:`write_textfile` (after the site is closed)."""
        if self._engine is None:
            return
        reading = _read_vaults(self._engine)
        if self._pm is not None and self._pm.is_registered(self):
            self._pm.unregister(self)
        self._engine, self._pm, self._frozen = None, None, reading

    def reading(self) -> _Reading | None:
        """The vaults' gauges read now (attached), as read at :meth:`detach`, or None (no
        engine was attached: nothing was read)."""
        engine = self._engine
        if engine is not None:
            return _read_vaults(engine)
        return self._frozen

    def event_gauges(self) -> tuple[dict[_SuccessKey, float], dict[tuple[str, str], float]]:
        """Copies of the last successes and RTOs this process saw in events."""
        with self._lock:
            return dict(self._successes), dict(self._rtos)

    def _success(self, kind: str, region: str, instance: str = "", at: float | None = None) -> None:
        with self._lock:
            self._successes[(kind, region, instance)] = time.time() if at is None else at

    def _count(self, kind: str, region: str, result: str, seconds: float | None = None) -> None:
        self.jobs.labels(kind, region, result).inc()
        if seconds is not None and seconds >= 0:
            self.durations.labels(kind, region).observe(seconds)
        if result == "failed":
            with self._lock:
                self._failed_kinds.add(kind)

    # ------------------------------------------------------------------ ticks

    @hookimpl
    def regionvault_after_job(self, outcome: JobOutcome) -> None:
        if outcome.status is JobStatus.DONE and outcome.kind in (COPY_REQUEST, COPY_SEND):
            sent = outcome.result.get("bytes_sent") if isinstance(outcome.result, dict) else None
            ends = _copy_ends(outcome)
            if isinstance(sent, int) and sent > 0 and ends is not None:
                self.transit.labels(*ends).inc(sent)
        if self.one_shot:
            return
        kind = metric_kind(outcome.kind, outcome.status)
        if kind is None:
            return
        region = outcome.region or ""
        if outcome.kind in _COPY_JOBS:
            ends = _copy_ends(outcome)
            region = ends[1] if ends is not None else region
        seconds = None
        if outcome.started_at is not None and outcome.finished_at is not None and outcome.attempts:
            seconds = (outcome.finished_at - outcome.started_at).total_seconds()
        self._count(kind, region, _result(outcome), seconds)
        if outcome.status is JobStatus.DONE and kind not in _FROM_POINTS:
            finished = outcome.finished_at  # the job's own (engine's) clock
            self._success(kind, region, at=None if finished is None else finished.timestamp())

    # ------------------------------------------------------------------ the steps' hooks

    @hookimpl
    def regionvault_before_capture(self, region: str, instance: Instance) -> None:
        with self._lock:
            self._captures[(region, instance.id)] = time.monotonic()

    def _capture_seconds(self, region: str, instance_id: str) -> float | None:
        with self._lock:
            started = self._captures.pop((region, instance_id), None)
        return None if started is None else time.monotonic() - started

    @hookimpl
    def regionvault_after_capture(
        self, region: str, instance: Instance, capture: Capture, error: BaseException | None
    ) -> None:
        if error is None:
            return
        seconds = self._capture_seconds(region, instance.id)
        if self.one_shot:
            self._count(BACKUP, region, "failed", seconds)

    @hookimpl
    def regionvault_after_backup(self, region: str, recovery_point: RecoveryPoint) -> None:
        seconds = self._capture_seconds(region, recovery_point.instance_id)
        engine = self._engine
        if engine is not None:
            try:
                stats = engine.repository(region, create=False).load_manifest(recovery_point.id)
                stored = stats.stats.get("bytes_stored", 0)
            except RegionVaultError as exc:
                log.warning("metrics: cannot read %s's stats: %s", recovery_point.id, exc)
                stored = 0
            if stored > 0:
                self.bytes.labels(region, "written").inc(stored)
        if self.one_shot:
            result = "incomplete" if recovery_point.issues else "ok"
            self._count(BACKUP, region, result, seconds)
            at = recovery_point.created_at.timestamp()
            self._success(BACKUP, region, recovery_point.instance_id, at)

    @hookimpl
    def regionvault_after_copy(
        self,
        source_region: str,
        region: str,
        source: RecoveryPoint,
        copy: RecoveryPoint,
        result: Any,
    ) -> None:
        moved = getattr(result, "bytes_moved", None)
        if isinstance(moved, int) and moved > 0:
            # a copy in one call; a phased copy's bytes are its request's and send's jobs'
            self.transit.labels(source_region, region).inc(moved)
        if self.one_shot:
            self._count(COPY, region, "ok")
            self._success(COPY, region, copy.instance_id, copy.created_at.timestamp())

    @hookimpl
    def regionvault_after_verify(self, region: str, report: Any, seconds: float) -> None:
        read = getattr(report, "bytes_read", 0)
        if isinstance(read, int) and read > 0:
            self.bytes.labels(region, "read").inc(read)
        ok = bool(getattr(report, "ok", False))
        if not ok:
            self.verify_failures.labels(region).inc()
        if self.one_shot:
            self._count(VERIFY, region, "ok" if ok else "failed", seconds)
            if ok:
                self._success(VERIFY, region)

    @hookimpl
    def regionvault_after_launch(
        self,
        region: str,
        instance: Instance,
        recovery_point: RecoveryPoint,
        seconds_to_healthy: float | None,
    ) -> None:
        if seconds_to_healthy is not None:
            with self._lock:
                self._rtos[(region, recovery_point.instance_id)] = seconds_to_healthy

    def command_failed(self, command: str | None, error: BaseException) -> None:
        """A one-shot ``command`` failed with ``error``: a failed job of its kind, unless a
        failed one was counted already (a backup whose capture failed, a verify that found
        errors or could not read its region: :meth:`job_failed`). Jobs of the command that
        succeeded before it failed do not hide the failure."""
        kind = _COMMAND_KINDS.get(command or "")
        if not self.one_shot or kind is None:
            return
        with self._lock:
            if kind in self._failed_kinds:
                return
        region = getattr(error, "region", None)
        self._count(kind, region if isinstance(region, str) else "", "failed")

    def job_failed(self, kind: str, region: str) -> None:
        """A one-shot command's job of ``kind`` in ``region`` failed where no hook says so
        (verify's read of one region raised): a failed job there."""
        if self.one_shot:
            self._count(kind, region, "failed")

    # ------------------------------------------------------------------ exposition

    def serve(self, host: str, port: int) -> tuple[WSGIServer, str]:
        """Serve ``/metrics`` on ``host:port`` (prometheus_client's server, on a thread of
        its own): the server (``shutdown()`` it) and the address it listens on."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MetricsAddressError(f"cannot serve metrics on {host}:{port}: {reason}") from None
        bound = server.server_address
        host_text = str(bound[0], "ascii") if isinstance(bound[0], bytes) else str(bound[0])
        shown = f"[{host_text}]" if ":" in host_text else host_text
        return server, f"{shown}:{server.server_port}"

    def write_textfile(
        self, directory: Path, *, lock_timeout: float | None = None
    ) -> tuple[Path, str | None]:
        """Write ``directory/regionvault.prom`` atomically and durably: what this process
        counted since its last write added to the file's counters (the site's running
        totals; a daemon writes after every tick); the gauges are this reading's alone
        (the vaults are read before the lock is taken), but for the last success of the
        kinds only commands see (tag, retention, verify: the newer of the file's and this
        process's). Under a lock, so two commands at once lose nothing; a lock held longer
        than ``lock_timeout`` (:data:`LOCK_TIMEOUT`) raises :class:`MetricsBusyError`;
        leftovers of a killed writer are removed. The path, and a warning when the old file
        could not be read (it is replaced)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TEXTFILE
        warning = None
        # every family by the name it is exposed under (an info's ``_info`` gauge, a
        # stateset's gauge), as the old file is parsed: the two are merged name by name
        live = list(text_string_to_metric_families(generate_latest(self.registry).decode()))
        timeout = LOCK_TIMEOUT if lock_timeout is None else lock_timeout
        with _locked(directory / _LOCK, timeout):
            for leftover in directory.iterdir():
                if _TEMPORARY.fullmatch(leftover.name):
                    leftover.unlink(missing_ok=True)
            old: list[Metric] = []
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            except (OSError, UnicodeDecodeError) as exc:
                warning = f"{path}: cannot be read ({exc}); replaced"
                text = ""
            try:
                old = list(text_string_to_metric_families(text))
            except Exception as exc:
                warning = f"{path}: not a metrics file ({exc}); replaced"
                old = []
            merged, notes = _merge(old, live, self._written)
            if notes:
                warning = "; ".join([*([warning] if warning else []), *notes])
            write_atomic(path, generate_latest(_Families(merged)))
            self._written = {
                _sample_key(s.name, s.labels): s.value
                for family in live
                if family.type in _ADDED
                for s in family.samples
            }
        return path, warning


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    with path.open("a+b") as handle:
        for _ in range(max(1, math.ceil(timeout / _LOCK_POLL)) + 1):
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(_LOCK_POLL)
        else:
            raise MetricsBusyError(
                f"{path.parent / TEXTFILE}: another writer held {path.name} for over "
                f"{timeout:g} s; not written this time"
            )
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Families:
    """A collector of metric families made beforehand (for :func:`generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


_ADDED = {"counter", "histogram", "summary"}
_NEWEST = "regionvault_last_success_timestamp_seconds"


def _sample_key(name: str, labels: dict[str, str]) -> _SampleKey:
    return name, tuple(sorted(labels.items()))


def _carried(family: str, sample: Any) -> bool:
    """Whether a gauge sample of the old file is kept when this process has none like it:
    only the last success of a kind not read from the vaults (tag, retention, verify),
    which no later command that did not run that kind could know."""
    return family == _NEWEST and sample.labels.get("kind") not in _FROM_POINTS


def _merge(
    old: list[Metric], live: list[Metric], written: dict[_SampleKey, float]
) -> tuple[list[Metric], list[str]]:
    """The families to write, each name once: counters (histograms, summaries) summed
    sample by sample (the old file's, plus what this process counted since it wrote
    ``written``), and old counter families this process does not have (a plugin not loaded
    now) carried whole; gauges are this process's, and of the old file's only the last
    successes :func:`_carried` says (the newer of the two). ``_created`` samples are left
    out: a sum of many processes has no one creation time. An old family of another type,
    or a histogram with other buckets (a file of another version), is dropped (a counter
    reset), with a note for the warning: merged, its sums would be wrong. The families and
    the notes."""
    old_by_name = {family.name: family for family in old}
    merged: list[Metric] = []
    notes: list[str] = []
    for family in live:
        previous = old_by_name.pop(family.name, None)
        if previous is not None and previous.type != family.type:
            notes.append(f"{family.name} was a {previous.type}, now a {family.type}: reset")
            previous = None
        if previous is not None and family.type == "histogram":
            old_le, new_le = _buckets(previous), _buckets(family)
            if old_le and new_le and old_le != new_le:
                notes.append(f"{family.name}'s buckets changed: reset")
                previous = None
        out = Metric(family.name, family.documentation, family.type, family.unit)
        values: dict[_SampleKey, tuple[str, dict[str, str], float]] = {}
        added = family.type in _ADDED
        for s in family.samples:
            if not s.name.endswith("_created"):
                key = _sample_key(s.name, s.labels)
                since = s.value - written.get(key, 0.0) if added else s.value
                values[key] = (s.name, dict(s.labels), since)
        if previous is not None and previous.type == family.type:
            for s in previous.samples:
                if s.name.endswith("_created"):
                    continue
                key = _sample_key(s.name, s.labels)
                now = values.get(key)
                if added:
                    total = s.value + (now[2] if now is not None else 0.0)
                    values[key] = (s.name, dict(s.labels), total)
                elif _carried(family.name, s):
                    at = max(s.value, now[2]) if now is not None else s.value
                    values[key] = (s.name, dict(s.labels), at)
        for name, labels, value in values.values():
            out.add_sample(name, labels, value)
        merged.append(out)
    for family in old_by_name.values():  # a plugin's counters, when it is not loaded now
        if family.type not in _ADDED:
            continue
        out = Metric(family.name, family.documentation, family.type, family.unit)
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.add_sample(s.name, dict(s.labels), s.value)
        merged.append(out)
    return merged, notes


def _buckets(family: Metric) -> set[str]:
    """A histogram's bucket bounds (``le``), as written."""
    return {s.labels.get("le", "") for s in family.samples if s.name.endswith("_bucket")}
