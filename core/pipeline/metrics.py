"""Prometheus metrics of the pipeline (docs/metrics.md): a plugin that counts what the hooks
report into its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide
default one), and a collector that reads the recovery points' gauges (last success, RPO,
RTO) from :meth:`Engine.status` whenever the metrics are read, so that they are right after
a restart.

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
from prometheus_client import CollectorRegistry, Counter, Histogram, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.parser import text_string_to_metric_families
from regionvault.core.errors import RegionVaultError
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
from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from regionvault.core.interfaces import Capture
    from regionvault.core.pipeline.engine import Engine
    from regionvault.core.pipeline.reports import StatusRow
    from regionvault.core.types import Instance, RecoveryPoint

__all__ = [
    "DRILL",
    "KINDS",
    "TEXTFILE",
    "VERIFY",
    "Metrics",
    "MetricsAddressError",
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
#: what :func:`prometheus_client.write_to_textfile` names its temporary (``path.pid.thread``)
_TEMPORARY = re.compile(re.escape(TEXTFILE) + r"\.\d+\.\d+")

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
    if spec.isdigit():
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
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsAddressError(f"metrics address {text!r}: port must be a number 0-65535")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class _StatusGauges:
    """The gauges read from :meth:`Engine.status` (None: it could not be read)."""

    rows: list[StatusRow] | None


class _StatusCollector:
    """The gauges derived from the engine's status each time they are collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.metrics.status_rows())

    def _families(self, rows: list[StatusRow] | None) -> list[Metric]:
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
        successes, rtos = self.metrics.event_gauges()
        for row in rows or ():
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
        for (kind, region, instance), at in sorted(successes.items()):
            last.add_metric([kind, region, instance], at)
        for (region, instance), seconds in sorted(rtos.items()):
            rto.add_metric([region, instance], seconds)
        return [last, rpo, rto]


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
        self._lock = threading.Lock()
        self._successes: dict[_SuccessKey, float] = {}
        self._rtos: dict[tuple[str, str], float] = {}
        self._captures: dict[tuple[str, str], float] = {}
        self._counted = 0
        self._engine: Engine | None = None
        self._pm: pluggy.PluginManager | None = None
        self._frozen: _StatusGauges | None = None
        self._plugins_added = False
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
            try:
                pm.hook.regionvault_metrics(registry=self.registry)
            except Exception as exc:  # ValueError: a name taken twice (the registry's check)
                pm.unregister(self)
                self._engine = self._pm = None
                raise RegionVaultError(
                    f"the regionvault_metrics hook failed: {type(exc).__name__}: {exc}"
                ) from None

    @property
    def attached(self) -> bool:
        return self._engine is not None

    def detach(self) -> None:
        """Unregister from the plugin manager, keeping the status as read now for a later
        :meth:`write_textfile` (after the site is closed)."""
        if self._engine is None:
            return
        rows = self._read_status(self._engine)
        if self._pm is not None and self._pm.is_registered(self):
            self._pm.unregister(self)
        self._engine, self._pm, self._frozen = None, None, _StatusGauges(rows)

    @staticmethod
    def _read_status(engine: Engine) -> list[StatusRow] | None:
        try:
            return engine.status()
        except Exception as exc:
            # a region that cannot be read now: its gauges are left out of this reading
            log.warning("metrics: cannot read the status for the gauges: %s", exc)
            return None

    def status_rows(self) -> list[StatusRow] | None:
        """The engine's status now (attached), as read at :meth:`detach`, or None."""
        engine = self._engine
        if engine is not None:
            return self._read_status(engine)
        return self._frozen.rows if self._frozen is not None else None

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
        with self._lock:
            self._counted += 1

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
            self._success(kind, region)

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
        hook counted one already (a backup whose capture failed, a verify that found
        errors)."""
        kind = _COMMAND_KINDS.get(command or "")
        if not self.one_shot or kind is None:
            return
        with self._lock:
            if self._counted:
                return
        region = getattr(error, "region", None)
        self._count(kind, region if isinstance(region, str) else "", "failed")

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

    def write_textfile(self, directory: Path) -> tuple[Path, str | None]:
        """Write ``directory/regionvault.prom`` atomically: what this process counted since
        its last write added to the file's counters (the site's running totals; a daemon
        writes after every tick), its gauges over the file's. Under a lock, so two commands
        at once lose nothing; leftovers of a killed writer are removed. The
        path, and a warning when the old file could not be read (it is replaced)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TEXTFILE
        warning = None
        with _locked(directory / _LOCK):
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
            rows_read = self.status_rows() is not None
            live = list(self.registry.collect())
            merged = _merge(old, live, self._written, fresh_rpo=rows_read)
            write_to_textfile(str(path), _Families(merged))
            self._written = {
                _sample_key(s.name, s.labels): s.value
                for family in live
                if family.type in _ADDED
                for s in family.samples
            }
        return path, warning


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Families:
    """A collector of metric families made beforehand (for :func:`write_to_textfile`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


_ADDED = {"counter", "histogram", "summary"}
_NEWEST = "regionvault_last_success_timestamp_seconds"
_RPO = "regionvault_rpo_seconds"


def _sample_key(name: str, labels: dict[str, str]) -> _SampleKey:
    return name, tuple(sorted(labels.items()))


def _merge(
    old: list[Metric],
    live: list[Metric],
    written: dict[_SampleKey, float],
    *,
    fresh_rpo: bool,
) -> list[Metric]:
    """The families to write: counters (histograms, summaries) summed sample by sample (the
    old file's, plus what this process counted since it wrote ``written``),
    gauges of this process over the old file's (last success: the newer), the RPO from the
    status alone when it was read; old families this process does not have, carried.
    ``_created`` samples are left out: a sum of many processes has no one creation time."""
    old_by_name = {family.name: family for family in old}
    merged: list[Metric] = []
    for family in live:
        previous = old_by_name.pop(family.name, None)
        out = Metric(family.name, family.documentation, family.type, family.unit)
        values: dict[_SampleKey, tuple[str, dict[str, str], float]] = {}
        added = family.type in _ADDED
        for s in family.samples:
            if not s.name.endswith("_created"):
                key = _sample_key(s.name, s.labels)
                since = s.value - written.get(key, 0.0) if added else s.value
                values[key] = (s.name, dict(s.labels), since)
        if previous is not None and previous.type == family.type:
            carry = not (family.name == _RPO and fresh_rpo)
            for s in previous.samples:
                if s.name.endswith("_created"):
                    continue
                key = _sample_key(s.name, s.labels)
                now = values.get(key)
                if now is None:
                    if carry:
                        values[key] = (s.name, dict(s.labels), s.value)
                elif added:
                    values[key] = (now[0], now[1], now[2] + s.value)
                elif family.name == _NEWEST:
                    values[key] = (now[0], now[1], max(now[2], s.value))
        for name, labels, value in values.values():
            out.add_sample(name, labels, value)
        merged.append(out)
    for family in old_by_name.values():  # a plugin's families, when it is not loaded now
        out = Metric(family.name, family.documentation, family.type, family.unit)
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.add_sample(s.name, dict(s.labels), s.value)
        merged.append(out)
    return merged
