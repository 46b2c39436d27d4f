"""Prometheus metrics (docs/metrics.md): ``/metrics`` scraped from a running ``regionvault
run``, and ``regionvault.prom`` written by every command into ``--metrics-dir``, read with
prometheus_client's own parser; counters carried from command to command, nothing counted
twice, a plugin's own collector, and one-line errors."""

from __future__ import annotations

import errno
import fcntl
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
from prometheus_client import Counter, Enum, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline import metrics as metrics_module
from regionvault.core.pipeline.jobs import JobOutcome, JobStatus, job_key
from regionvault.core.pipeline.metrics import TEXTFILE, Metrics, parse_metrics_addr
from regionvault.core.plugins import get_plugin_manager, hookimpl
from regionvault.core.repository import Repository
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
    out = workdir / "m"
    clear_of_day_end()  # both ticks in one daily backup slot, whatever the time of day
    tick = json.loads(ok("--metrics-dir", out, "tick", "--json").stdout)
    (copy_job,) = [j for j in tick["jobs"] if j["kind"] == "copy"]
    found = textfile(out)
    # after_backup and after_copy fired too: the tick counts from after_job alone
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}
    assert jobs(found, "copy") == {f"{WEST}/ok": 1.0}
    assert jobs(found, "retention") == {f"{EAST}/ok": 1.0, f"{WEST}/ok": 1.0}
    moved = copy_job["result"]["bytes_moved"]
    assert moved > 0
    (backup_job,) = [j for j in tick["jobs"] if j["kind"] == "backup"]
    last = value(
        found,
        "regionvault_last_success_timestamp_seconds",
        kind="backup",
        region=EAST,
        instance=instance,
    )
    assert last == pytest.approx(created_at(backup_job["result"]["point"]), abs=1e-3)
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
    # another machine (no local drill record) reads the drill from west's event log, as
    # status does
    shutil.rmtree(workdir / ".regionvault" / "drills")
    (row,) = [r for r in json.loads(ok("status", "--json").stdout) if r["region"] == WEST]
    assert row["last_drill_rto"] is not None
    ok("--metrics-dir", out, "points")
    found = textfile(out)
    assert value(found, "regionvault_drill_rto_seconds", region=WEST, instance=instance) == (
        pytest.approx(row["last_drill_rto"], abs=1e-3)
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
    for bad in ("localhost", "127.0.0.1:http", ":70000", "::1:9464", ":²", "²", "١٢"):
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
    clear_of_day_end()  # both ticks in one daily backup slot, whatever the time of day
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
os.replace = lambda *args: os._exit(9)  # killed after the temporary, before the rename
metrics.write_textfile(directory)
"""


def test_a_writer_killed_mid_write_leaves_the_last_whole_file(tmp_path: Path) -> None:
    out = tmp_path / "m"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True
    )
    assert killed.returncode == 9, killed.stderr
    leftovers = [p for p in out.iterdir() if p.name.endswith(".tmp")]
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
    feed(_outcome("retention", job_key("retention", EAST, "s"), EAST, done))
    found = samples(generate_latest(metrics.registry).decode())
    # the last success is the job's own end (its engine's clock), not when it was counted
    ended = datetime(2026, 12, 7, 12, 0, 2, tzinfo=UTC).timestamp()
    assert (
        value(
            found,
            "regionvault_last_success_timestamp_seconds",
            kind="retention",
            region=EAST,
            instance="",
        )
        == ended
    )
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


class Broken:
    """A plugin whose metrics hook registers a collector, then fails."""

    @hookimpl
    def regionvault_metrics(self, registry: Any) -> None:
        Counter("broken_things", "Half made.", registry=registry)
        raise RuntimeError("plugin bug")


def test_a_failing_plugin_metrics_hook_is_left_out_and_the_command_runs(
    workdir: Path, instance: str, things: ThingsPlugin
) -> None:
    pm, _ = get_plugin_manager()
    plugins = {"test-squatter": Squatter(), "test-broken": Broken()}
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    out = workdir / "m"
    clear_of_day_end()  # the tick finds the backup's daily slot done
    try:
        result = run("--metrics-dir", out, "backup", "nf1")
        ticked = run("--metrics-dir", out, "tick")
    finally:
        for plugin in plugins.values():
            pm.unregister(plugin)
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(ok("points", "--json").stdout)) >= 1  # the backup ran
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, warnings  # one line per plugin
    assert all(line.startswith("regionvault: warning: plugin test-") for line in warnings)
    assert any("test-broken" in w and "RuntimeError: plugin bug" in w for w in warnings)
    assert any("test-squatter" in w and "regionvault_jobs" in w for w in warnings)
    assert ticked.exit_code == 0, ticked.stderr
    found = textfile(out)
    assert jobs(found, "backup") == {f"{EAST}/ok": 1.0}  # the squatter's counter is not ours
    errors = {"test-squatter": 2.0, "test-broken": 2.0}
    for name, count in errors.items():
        assert value(found, "regionvault_metrics_plugin_errors_total", plugin=name) == count
    assert not [name for name, _ in found if name.startswith("broken_things")]
    # a plugin whose hook worked is not taken down with them
    assert value(found, "samplenf_things_total", region=EAST) == 1
    assert not [p for p in pm.get_plugins() if isinstance(p, Metrics)]  # unregistered


# --------------------------------------------------------------------------- review fixes


def _points_failing_in(region: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Repository.points

    def points(self: Repository, *args: Any, **kwargs: Any) -> Any:
        if region in str(self.region):
            raise RegionVaultError(f"[{region}] list: 503 SlowDown")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Repository, "points", points)


def test_one_unreadable_region_leaves_the_other_regions_gauges(
    workdir: Path, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = ok("backup", "nf1").stdout.splitlines()[-1]
    copied = ok("copy", point, "--to", "west").stdout.splitlines()[-1]
    out = workdir / "m"
    ok("--metrics-dir", out, "verify", "--region", "west")
    before = textfile(out)
    assert value(before, "regionvault_rpo_seconds", region=EAST, instance=instance) is not None
    assert value(before, "regionvault_region_up", region=EAST) == 1
    verified_at = value(
        before, "regionvault_last_success_timestamp_seconds", kind="verify", region=WEST,
        instance="",
    )  # fmt: skip
    assert verified_at is not None
    copied_at = created_at(copied)
    site = Site.load(workdir / "site.toml")
    metrics = Metrics(one_shot=False)
    metrics.attach(Engine(site))
    try:
        _points_failing_in("east", monkeypatch)
        # /metrics: west's gauges stay, east's are gone and east is down
        found = samples(generate_latest(metrics.registry).decode())
        assert value(found, "regionvault_region_up", region=EAST) == 0
        assert value(found, "regionvault_region_up", region=WEST) == 1
        assert value(found, "regionvault_rpo_seconds", region=EAST, instance=instance) is None
        assert (value(found, "regionvault_rpo_seconds", region=WEST, instance=instance) or -1) >= 0
        assert value(
            found, "regionvault_last_success_timestamp_seconds", kind="copy", region=WEST,
            instance=instance,
        ) == pytest.approx(copied_at, abs=1e-3)  # fmt: skip
    finally:
        metrics.detach()
        site.close()
    # the textfile: what only a verify knows is carried by a command that did not verify;
    # the vaults' gauges are this command's reading alone (it read none)
    ok("--metrics-dir", out, "regions")
    found = textfile(out)
    verify_key = {"kind": "verify", "region": WEST, "instance": ""}
    assert value(found, "regionvault_last_success_timestamp_seconds", **verify_key) == verified_at
    assert not [name for name, _ in found if name == "regionvault_rpo_seconds"]
    # east's old RPO is not carried while east cannot be read
    ok("--metrics-dir", out, "verify", "--region", "west")
    found = textfile(out)
    assert value(found, "regionvault_region_up", region=EAST) == 0
    assert value(found, "regionvault_rpo_seconds", region=EAST, instance=instance) is None
    assert value(found, "regionvault_rpo_seconds", region=WEST, instance=instance) is not None
    assert value(
        found, "regionvault_last_success_timestamp_seconds", kind="backup", region=EAST,
        instance=instance,
    ) is None  # fmt: skip
    assert (
        value(found, "regionvault_last_success_timestamp_seconds", **verify_key) or 0
    ) >= verified_at


def test_a_raw_os_error_is_counted_and_kept_when_the_metrics_write_fails_too(
    workdir: Path, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def backup(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "state" / "x.json"))

    monkeypatch.setattr(Engine, "backup", backup)
    out = workdir / "m"
    (out / ".regionvault.prom.lock").mkdir(parents=True)  # the metrics cannot be written
    result = run("--metrics-dir", out, "backup", "nf1")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("regionvault: warning: metrics not written"), lines
    assert lines[1].startswith("regionvault: error: ") and "No space left" in lines[1], lines
    (out / ".regionvault.prom.lock").rmdir()
    assert run("--metrics-dir", out, "backup", "nf1").exit_code == 1
    assert jobs(textfile(out), "backup") == {"/failed": 1.0}

    # a bug (not an error the CLI knows): still a failed backup, the bug's traceback kept
    def buggy(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Engine, "backup", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        run("--metrics-dir", out, "backup", "nf1")
    assert jobs(textfile(out), "backup") == {"/failed": 2.0}


def test_the_textfile_lock_wait_is_bounded_and_no_vault_is_read_under_it(
    workdir: Path, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = workdir / "m"
    out.mkdir()
    lock = out / ".regionvault.prom.lock"
    reads_under_lock = []
    original = Repository.points

    def points(self: Repository, *args: Any, **kwargs: Any) -> Any:
        with lock.open("a+b") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
            except BlockingIOError:
                reads_under_lock.append(str(self.region))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Repository, "points", points)
    ok("--metrics-dir", out, "status")
    assert not reads_under_lock
    assert textfile(out)  # written
    # another writer holds the lock (a hung one): a warning, the command's outcome kept
    monkeypatch.setattr(metrics_module, "LOCK_TIMEOUT", 0.2)
    with lock.open("a+b") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        before = len(json.loads(ok("points", "--json").stdout))
        result = run("--metrics-dir", out, "backup", "nf1")
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "metrics" in line]
    assert line.startswith("regionvault: warning: metrics not written") and "0.2 s" in line
    assert len(json.loads(ok("points", "--json").stdout)) == before + 1


def test_a_plugins_info_and_enum_are_written_once(tmp_path: Path) -> None:
    out = tmp_path / "m"
    for _ in range(3):
        metrics = Metrics(one_shot=True)
        Info("buildx", "Build.", registry=metrics.registry).info({"version": "1"})
        Enum("phase", "Phase.", states=["a", "b"], registry=metrics.registry).state("a")
        metrics.jobs.labels("backup", EAST, "ok").inc()
        metrics.write_textfile(out)
    text = (out / TEXTFILE).read_text(encoding="utf-8")
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), types  # node_exporter drops a file with two
    found = samples(text)
    assert len(found) == sum(1 for line in text.splitlines() if not line.startswith("#"))
    assert value(found, "buildx_info", version="1") == 1
    assert value(found, "phase", phase="a") == 1 and value(found, "phase", phase="b") == 0
    assert jobs(found, "backup") == {f"{EAST}/ok": 3.0}


def test_a_region_that_fails_verify_after_another_verified_is_counted(
    workdir: Path, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("copy", ok("backup", "nf1").stdout.splitlines()[-1], "--to", "west")
    original = Repository.verify

    def verify(self: Repository, *args: Any, **kwargs: Any) -> Any:
        if "west" in str(self.region):
            raise RegionVaultError("[local:west] listing failed: 503 Service Unavailable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Repository, "verify", verify)
    out = workdir / "m"
    assert run("--metrics-dir", out, "verify").exit_code == 1
    assert jobs(textfile(out), "verify") == {f"{EAST}/ok": 1.0, f"{WEST}/failed": 1.0}


def test_the_textfile_is_synced_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        calls.append(f"fsync {Path(f'/proc/self/fd/{fd}').readlink()}")
        fsync(fd)

    def replaced(src: Any, dst: Any) -> None:
        calls.append(f"replace {src} {dst}")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", replaced)
    metrics = Metrics(one_shot=True)
    metrics.jobs.labels("backup", EAST, "ok").inc()
    metrics.write_textfile(tmp_path)
    (moved,) = [i for i, c in enumerate(calls) if c.startswith("replace ")]
    temporary = calls[moved].split()[1]
    assert calls[moved].endswith(f" {tmp_path / TEXTFILE}")
    assert f"fsync {temporary}" in calls[:moved]  # the data is on disk before the rename
    assert f"fsync {tmp_path}" in calls[moved:]  # and so is the rename


def test_a_histogram_with_other_buckets_or_a_family_of_another_type_is_reset(
    tmp_path: Path,
) -> None:
    # a file another version wrote: other duration buckets, a counter now a gauge
    tmp_path.joinpath(TEXTFILE).write_text(
        "# TYPE regionvault_job_duration_seconds histogram\n"
        'regionvault_job_duration_seconds_bucket{kind="backup",region="r",le="7.0"} 1.0\n'
        'regionvault_job_duration_seconds_bucket{kind="backup",region="r",le="+Inf"} 1.0\n'
        'regionvault_job_duration_seconds_count{kind="backup",region="r"} 1.0\n'
        'regionvault_job_duration_seconds_sum{kind="backup",region="r"} 6.0\n'
        "# TYPE regionvault_region_up counter\n"
        'regionvault_region_up_total{region="r"} 5.0\n',
        encoding="utf-8",
    )
    metrics = Metrics(one_shot=True)
    metrics.durations.labels("backup", "r").observe(2)
    _, warning = metrics.write_textfile(tmp_path)
    assert warning is not None
    assert "regionvault_job_duration_seconds's buckets changed: reset" in warning
    assert "regionvault_region_up was a counter, now a gauge: reset" in warning
    found = textfile(tmp_path)
    name = "regionvault_job_duration_seconds"
    assert value(found, f"{name}_bucket", kind="backup", region="r", le="7.0") is None
    assert value(found, f"{name}_bucket", kind="backup", region="r", le="5.0") == 1
    assert value(found, f"{name}_bucket", kind="backup", region="r", le="1.0") == 0
    assert value(found, f"{name}_count", kind="backup", region="r") == 1
    assert value(found, f"{name}_sum", kind="backup", region="r") == 2
    assert not [n for n, _ in found if n.startswith("regionvault_region_up")]
    # and the next write, of the same version, carries them as always
    metrics.durations.labels("backup", "r").observe(2)
    assert metrics.write_textfile(tmp_path)[1] is None
    assert value(textfile(tmp_path), f"{name}_count", kind="backup", region="r") == 2
