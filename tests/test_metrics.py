"""Prometheus metrics (docs/metrics.md): ``/metrics`` scraped from a running ``regionvault
run``, and ``regionvault.prom`` written by every command into ``--metrics-dir``, read with
prometheus_client's own parser; counters carried from command to command, nothing counted
twice, a plugin's own collector, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from clock_support import clear_of_day_end
from prometheus_client import Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import JobOutcome, JobStatus, job_key
from regionvault.core.pipeline.metrics import TEXTFILE, Metrics, parse_metrics_addr
from regionvault.core.plugins import get_plugin_manager, hookimpl
from regionvault.core.site import Site
from repository_support import flip_bit
from test_commands import make_data

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
EAST, WEST = "local:east", "local:west"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a metrics text, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return found.get((name, frozenset(labels.items())))


def jobs(found: dict[tuple[str, frozenset[tuple[str, str]]], float], kind: str) -> dict[str, float]:
    """``regionvault_jobs_total`` of ``kind``: {region/result: count}."""
    out: dict[str, float] = {}
    for (name, labels), v in found.items():
        d = dict(labels)
        if name == "regionvault_jobs_total" and d["kind"] == kind:
            out[f"{d['region']}/{d['result']}"] = v
    return out


def textfile(directory: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples((directory / TEXTFILE).read_text(encoding="utf-8"))


@pytest.fixture
def instance(workdir: Path) -> str:
    data = make_data(workdir / "nf-data")
    result = ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    return result.stdout.splitlines()[-1]


def created_at(point: str) -> float:
    (found,) = [p for p in json.loads(ok("points", "--json").stdout) if p["id"] == point]
    return datetime.fromisoformat(found["created_at"]).timestamp()


# --------------------------------------------------------------------------- /metrics


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def test_run_serves_metrics_of_its_tick(workdir: Path, instance: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    proc = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "run", "--interval", "1h", "--metrics-addr", ":0"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line says where it serves
        assert "serving metrics on http://127.0.0.1:" in line, line
        url = line.split("serving metrics on ", 1)[1].strip()
        found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for _ in range(600):  # bounded: up to 60 s for the tick to back up and copy
            found = samples(_scrape(url))
            if jobs(found, "copy") and jobs(found, "retention"):
                break
            time.sleep(0.1)
        assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
        assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
        assert jobs(found, "tag") == {f"{EAST}/ok": 1.0, f"{WEST}/ok": 1.0}
        assert (
            value(found, "regionvault_job_duration_seconds_count", kind="backup", region=EAST) == 1
        )
        assert (value(found, "regionvault_bytes_total", region=EAST, direction="written") or 0) > 0
        # the gauges, from the engine's status when scraped
        points = {p["region"]: p for p in json.loads(ok("points", "--json").stdout)}
        backup_at = datetime.fromisoformat(points[EAST]["created_at"]).timestamp()
        last = value(
            found,
            "regionvault_last_success_timestamp_seconds",
            kind="backup",
            region=EAST,
            instance=instance,
        )
        assert last == pytest.approx(backup_at, abs=1e-3)
        copy_at = datetime.fromisoformat(points[WEST]["created_at"]).timestamp()
        assert value(
            found,
            "regionvault_last_success_timestamp_seconds",
            kind="copy",
            region=WEST,
            instance=instance,
        ) == pytest.approx(copy_at, abs=1e-3)
        assert (value(found, "regionvault_rpo_seconds", region=EAST, instance=instance) or -1) >= 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_gauges_are_read_from_the_vaults_after_a_restart(workdir: Path, instance: str) -> None:
    # a process that ran nothing yet still reports the newest point of every instance
    point = ok("backup", "nf1").stdout.splitlines()[-1]
    out = workdir / "m"
    ok("--metrics-dir", out, "regions")  # a command that touches no vault: no gauges known
    assert value(textfile(out), "regionvault_rpo_seconds", region=EAST, instance=instance) is None
    ok("--metrics-dir", out, "status")
    found = textfile(out)
    assert value(
        found,
        "regionvault_last_success_timestamp_seconds",
        kind="backup",
        region=EAST,
        instance=instance,
    ) == pytest.approx(created_at(point), abs=1e-3)
    assert value(found, "regionvault_rpo_seconds", region=EAST, instance=instance) is not None
    assert jobs(found, "backup") == {}  # that backup ran without metrics


# --------------------------------------------------------------------------- textfiles


def test_one_shot_commands_carry_their_counters_forward(workdir: Path, instance: str) -> None:
    out = workdir / "metrics"
    env = {"REGIONVAULT_METRICS_DIR": str(out)}  # the option's environment form
    point = ok("backup", "nf1", env=env).stdout.splitlines()[-1]
    found = textfile(out)
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    written = value(found, "regionvault_bytes_total", region=EAST, direction="written")
    assert written is not None and written > 0
    assert value(
        found,
        "regionvault_last_success_timestamp_seconds",
        kind="backup",
        region=EAST,
        instance=instance,
    ) == pytest.approx(created_at(point), abs=1e-3)

    copied = ok("--metrics-dir", out, "copy", point, "--to", "west")
    reported = int(copied.stderr.split(" chunks, ")[1].split(" bytes")[0].replace(",", ""))
    found = textfile(out)
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}  # carried from the backup's file
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert (
        value(found, "regionvault_transit_bytes_total", source=EAST, destination=WEST) == reported
    )
    assert reported > 0
    assert value(found, "regionvault_bytes_total", region=EAST, direction="written") == written

    ok("--metrics-dir", out, "verify", "--read-data", "--region", "west")
    packs = sorted((workdir / "regions" / "west" / "vault" / "objects" / "packs").rglob("*"))
    pack = next(p for p in packs if p.is_file())
    flip_bit(pack, pack.stat().st_size // 2)
    bad = run("--metrics-dir", out, "verify", "--read-data", "--region", "west")
    assert bad.exit_code == 1
    found = textfile(out)
    assert value(found, "regionvault_verify_failures_total", region=WEST) == 1
    assert jobs(found, "verify") == {f"{WEST}/ok": 1.0, f"{WEST}/failed": 1.0}
    assert (value(found, "regionvault_bytes_total", region=WEST, direction="read") or 0) > 0
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert value(found, "regionvault_job_duration_seconds_count", kind="verify", region=WEST) == 2
    # nothing but the file and its lock in the directory: no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == [".regionvault.prom.lock", TEXTFILE]
    assert not any(name.endswith("_created") for name, _ in found)


def test_a_tick_counts_each_job_once(workdir: Path, instance: str) -> None:
    clear_of_day_end()  # the second tick must find the first one's daily slot done
    out = workdir / "m"
    tick = json.loads(ok("--metrics-dir", out, "tick", "--json").stdout)
    (copy_job,) = [j for j in tick["jobs"] if j["kind"] == "copy"]
    found = textfile(out)
    # after_backup and after_copy fired too: the tick counts from after_job alone
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert jobs(found, "retention") == {f"{EAST}/ok": 1.0, f"{WEST}/ok": 1.0}
    moved = copy_job["result"]["bytes_moved"]
    assert moved > 0
    assert value(found, "regionvault_transit_bytes_total", source=EAST, destination=WEST) == moved
    # a second tick: nothing is backed up again (its tag jobs are replayed, or done again
    # when a tag slot began in between); the running totals are carried
    ok("--metrics-dir", out, "tick")
    found = textfile(out)
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert sum(jobs(found, "tag").values()) == 4


def test_a_scheduled_drill_counts_as_a_drill_job_with_its_rto(workdir: Path) -> None:
    data = make_data(workdir / "nf-data")
    added = ok(
        "instances",
        "add",
        "--region",
        "east",
        "--name",
        "nf1",
        "--data",
        data,
        "--tag",
        "backup-drill=1d",
    )
    instance = added.stdout.splitlines()[-1]
    out = workdir / "m"
    tick = json.loads(ok("--metrics-dir", out, "tick", "--json").stdout)
    (drill,) = [j for j in tick["jobs"] if j["kind"] == "drill"]
    assert drill["status"] == "done"
    found = textfile(out)
    assert jobs(found, "drill") == {f"{WEST}/ok": 1.0}
    rto = value(found, "regionvault_drill_rto_seconds", region=WEST, instance=instance)
    assert rto is not None and rto >= 0
    assert (
        value(
            found,
            "regionvault_last_success_timestamp_seconds",
            kind="drill",
            region=WEST,
            instance=instance,
        )
        is not None
    )


def test_failed_jobs_count_as_failed(workdir: Path, instance: str) -> None:
    out = workdir / "m"
    shutil.rmtree(workdir / "nf-data")  # the instance's data is gone: its capture fails
    ticked = run("--metrics-dir", out, "tick")
    assert ticked.exit_code == 1
    assert jobs(textfile(out), "backup") == {f"{EAST}/failed": 1.0}
    failed = run("--metrics-dir", out, "backup", "nf1")
    assert failed.exit_code == 1
    assert jobs(textfile(out), "backup") == {f"{EAST}/failed": 2.0}
    # a copy that fails before any hook: the command's failure is counted once
    bad = run("--metrics-dir", out, "copy", "0123456789abcdef", "--to", "west")
    assert bad.exit_code == 1
    assert jobs(textfile(out), "copy") == {"/failed": 1.0}


def test_an_unreadable_old_file_is_replaced_with_a_warning(workdir: Path, instance: str) -> None:
    out = workdir / "m"
    out.mkdir()
    (out / TEXTFILE).write_text("regionvault_jobs_total{kind=\n garbage {{{\n")
    leftover = out / f"{TEXTFILE}.4242.17"  # what a writer killed mid-write leaves
    leftover.write_text("regionvault_jobs_total 1")
    result = ok("--metrics-dir", out, "backup", "nf1")
    assert "regionvault: warning:" in result.stderr and "replaced" in result.stderr
    assert jobs(textfile(out), "backup") == {f"{EAST}/ok": 1.0}
    assert not leftover.exists()


def test_a_metrics_dir_that_is_a_file_is_a_usage_error(workdir: Path) -> None:
    (workdir / "afile").write_text("")
    result = run("--metrics-dir", workdir / "afile", "regions")
    assert result.exit_code == 2 and "--metrics-dir" in result.stderr


# --------------------------------------------------------------------------- plugins


class ThingsPlugin:
    """A plugin with a collector of its own, counted with every backup it sees."""

    def __init__(self) -> None:
        self.counter: Counter | None = None

    @hookimpl
    def regionvault_metrics(self, registry: Any) -> None:
        self.counter = Counter("samplenf_things", "Things seen.", ["region"], registry=registry)

    @hookimpl
    def regionvault_after_backup(self, region: str, recovery_point: Any) -> None:
        assert self.counter is not None
        self.counter.labels(region).inc()


@pytest.fixture
def things() -> Iterator[ThingsPlugin]:
    pm, _ = get_plugin_manager()
    plugin = ThingsPlugin()
    pm.register(plugin, name="test-things")
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def test_a_plugin_adds_its_own_collector(
    workdir: Path, instance: str, things: ThingsPlugin
) -> None:
    out = workdir / "m"
    ok("--metrics-dir", out, "backup", "nf1")
    ok("--metrics-dir", out, "backup", "nf1")
    assert value(textfile(out), "samplenf_things_total", region=EAST) == 2


# --------------------------------------------------------------------------- addresses


def test_metrics_addresses() -> None:
    assert parse_metrics_addr("9464") == ("127.0.0.1", 9464)
    assert parse_metrics_addr(":9464") == ("127.0.0.1", 9464)
    assert parse_metrics_addr("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_metrics_addr("[::1]:9464") == ("::1", 9464)


def test_a_bad_metrics_address_is_a_usage_error(workdir: Path) -> None:
    for bad in ("localhost", "127.0.0.1:http", ":70000", "::1:9464"):
        result = run("run", "--max-ticks", "1", "--metrics-addr", bad)
        assert result.exit_code == 2, (bad, result.stderr)
        assert "--metrics-addr" in result.stderr and repr(bad) in result.stderr


def test_a_port_in_use_is_one_line(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("run", "--max-ticks", "1", "--metrics-addr", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("regionvault: error: ")
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def test_run_writes_the_textfile_tick_by_tick_without_counting_twice(
    workdir: Path, instance: str
) -> None:
    out = workdir / "m"
    clear_of_day_end()  # the second tick must find the first one's daily slot done
    ok("--metrics-dir", out, "run", "--max-ticks", "2", "--interval", "1s")
    found = textfile(out)
    # written after each tick and at the end: each write adds only what came since the last
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert sum(jobs(found, "tag").values()) == 4  # two ticks, two regions
    assert sum(jobs(found, "retention").values()) == 4


def test_a_usage_error_counts_nothing(workdir: Path, instance: str) -> None:
    out = workdir / "m"
    result = run("--metrics-dir", out, "backup", "nf1", "--no-such-option")
    assert result.exit_code == 2
    assert jobs(textfile(out), "backup") == {}


KILLED_WRITER = """
import os, sys
from pathlib import Path
from regionvault.core.pipeline.metrics import Metrics

metrics = Metrics(one_shot=True)
metrics.jobs.labels("backup", "local:east", "ok").inc(5)
directory = Path(sys.argv[1])
metrics.write_textfile(directory)
metrics.jobs.labels("backup", "local:east", "ok").inc(2)
os.rename = lambda *args: os._exit(9)  # killed after the temporary, before the rename
metrics.write_textfile(directory)
"""


def test_a_writer_killed_mid_write_leaves_the_last_whole_file(tmp_path: Path) -> None:
    out = tmp_path / "m"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True
    )
    assert killed.returncode == 9, killed.stderr
    leftovers = [p for p in out.iterdir() if p.name.startswith(f"{TEXTFILE}.")]
    assert len(leftovers) == 1  # its temporary, never read: node_exporter reads *.prom
    # the file is the first write's, whole
    assert jobs(textfile(out), "backup") == {f"{EAST}/ok": 5.0}
    # the next writer removes the leftover and adds its own counts to the file's
    metrics = Metrics(one_shot=True)
    metrics.jobs.labels("backup", EAST, "failed").inc()
    metrics.write_textfile(out)
    metrics.write_textfile(out)  # a second write adds nothing more
    assert jobs(textfile(out), "backup") == {f"{EAST}/ok": 5.0, f"{EAST}/failed": 1.0}
    assert sorted(p.name for p in out.iterdir()) == [".regionvault.prom.lock", TEXTFILE]


# --------------------------------------------------------------------------- the job kinds


def _outcome(kind: str, key: str, region: str, status: JobStatus, **more: Any) -> JobOutcome:
    started = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    return JobOutcome(
        key=key,
        kind=kind,
        region=region,
        status=status,
        started_at=started,
        finished_at=started + timedelta(seconds=2),
        attempts=0 if status is JobStatus.BUSY else 1,
        **more,
    )


def test_job_kinds_map_onto_the_metric_kinds() -> None:
    metrics = Metrics(one_shot=False)
    feed = metrics.regionvault_after_job
    done, failed = JobStatus.DONE, JobStatus.FAILED
    feed(_outcome("drill", job_key("drill", WEST, "i-1", "s"), WEST, done))
    # the phases of one copy: only the commit counts, in the destination
    for phase, where in (("copy-offer", EAST), ("copy-request", WEST), ("copy-send", EAST)):
        key = job_key(phase, where, "p1", WEST if where == EAST else EAST)
        feed(_outcome(phase, key, where, done, result={"bytes_sent": 100}))
    feed(_outcome("copy-commit", job_key("copy-commit", WEST, "p1", EAST), WEST, done))
    # a failed phase (run in the source) is a failed copy to its destination
    feed(_outcome("copy-offer", job_key("copy-offer", EAST, "p2", WEST), EAST, failed))
    feed(_outcome("plan-backups", job_key("plan-backups", EAST, "s"), EAST, done))
    feed(_outcome("plan-backups", job_key("plan-backups", EAST, "s2"), EAST, failed))
    feed(_outcome("backup", job_key("backup", EAST, "i-1", "s"), EAST, JobStatus.BUSY))
    feed(_outcome("tag", job_key("tag", EAST, "s"), EAST, JobStatus.REPLAYED))
    found = samples(generate_latest(metrics.registry).decode())
    assert jobs(found, "drill") == {f"{WEST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0, f"{WEST}/failed": 1.0}
    assert jobs(found, "backup") == {f"{EAST}/failed": 1.0, f"{EAST}/busy": 1.0}
    assert jobs(found, "tag") == {f"{EAST}/replayed": 1.0}
    assert not [name for name, labels in found if "plan" in str(labels)]
    assert value(found, "regionvault_transit_bytes_total", source=EAST, destination=WEST) == 200
    assert value(found, "regionvault_job_duration_seconds_sum", kind="drill", region=WEST) == 2
    # a busy job ran nothing here: no duration
    assert value(found, "regionvault_job_duration_seconds_count", kind="backup", region=EAST) == 1


def test_an_embedded_phased_copy_counts_once_with_its_transit_bytes(
    workdir: Path, instance: str
) -> None:
    site = Site.load(workdir / "site.toml")
    try:
        engine = Engine(site, split_copies=True)
        metrics = Metrics(one_shot=False)
        metrics.attach(engine)
        try:
            report = Service(engine).tick()
        finally:
            metrics.detach()
        assert not metrics.attached and not site.plugin_manager.is_registered(metrics)
    finally:
        site.close()
    assert report.ok, report.problems
    found = samples(generate_latest(metrics.registry).decode())
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    sent = sum(
        o.result["bytes_sent"] for o in report.jobs if o.kind in ("copy-request", "copy-send")
    )
    assert sent > 0
    assert value(found, "regionvault_transit_bytes_total", source=EAST, destination=WEST) == sent
    # the gauges, as read from the status when detached (the site is closed now)
    (copy,) = [o for o in report.jobs if o.kind == "copy-commit"]
    assert (
        value(
            found,
            "regionvault_last_success_timestamp_seconds",
            kind="copy",
            region=WEST,
            instance=instance,
        )
        is not None
    )
    assert copy.result["copy"]


def test_a_launch_sets_the_drill_gauges(workdir: Path) -> None:
    data = workdir / "nf-data"
    data.mkdir()
    command = f"{sys.executable} -m regionvault.plugins.samplenf"
    ok("instances", "add", "--region", "east", "--name", "vcore", "--data", data,
       "--command", command)  # fmt: skip
    rp = ok("backup", "vcore").stdout.splitlines()[-1]
    cp = ok("copy", rp, "--to", "west").stdout.splitlines()[-1]
    out = workdir / "m"
    launched = json.loads(
        ok("--metrics-dir", out, "restore", cp, "--region", "west", "--launch", "--json").stdout
    )
    site = Site.load(workdir / "site.toml")
    try:
        site.region("west").compute.terminate(launched["instance"])
    finally:
        site.close()
    found = textfile(out)
    (row,) = [r for r in json.loads(ok("status", "--json").stdout) if r["region"] == WEST]
    instance = row["instance_id"]
    rto = value(found, "regionvault_drill_rto_seconds", region=WEST, instance=instance)
    assert rto == pytest.approx(launched["rto_seconds"], abs=1e-3)
    drilled = datetime.fromisoformat(row["last_drill_at"]).timestamp()
    assert value(
        found,
        "regionvault_last_success_timestamp_seconds",
        kind="drill",
        region=WEST,
        instance=instance,
    ) == pytest.approx(drilled, abs=1e-3)
    assert not [name for name, _ in found if name == "regionvault_jobs_total"]  # no job


class Squatter:
    """A plugin that takes one of the core's metric names."""

    @hookimpl
    def regionvault_metrics(self, registry: Any) -> None:
        Counter("regionvault_jobs", "Not ours.", registry=registry)


def test_a_plugin_taking_a_core_metric_name_is_one_line(workdir: Path, instance: str) -> None:
    pm, _ = get_plugin_manager()
    squatter = Squatter()
    pm.register(squatter, name="test-squatter")
    try:
        result = run("--metrics-dir", workdir / "m", "points")
    finally:
        pm.unregister(squatter)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "regionvault_metrics hook failed" in lines[0], lines
    assert "regionvault_jobs" in lines[0] and "Traceback" not in result.stderr
    assert not [p for p in pm.get_plugins() if isinstance(p, Metrics)]  # unregistered
