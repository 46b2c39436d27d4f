"""The data-plane and pipeline CLI end to end, in a site made by `regionvault init`: backup,
points, copy, restore (to a directory and with --launch), verify, prune, tag, tick, status,
run (bounded, and stopped by SIGTERM), and one-line errors."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from click.testing import Result
from clock_support import clear_of_day_end
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from repository_support import flip_bit, snapshot

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
POINT_ID = re.compile(r"[0-9a-f]{32}")


def last_line(result: Result | subprocess.CompletedProcess[str]) -> str:
    return result.stdout.splitlines()[-1]


def fails(result: Result, *words: str) -> str:
    """Exit 1, one ``regionvault: error:`` line naming ``words``, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regionvault: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def make_data(root: Path, *, seed: int = 1, size: int = 200_000) -> Path:
    rng = random.Random(seed)
    (root / "db").mkdir(parents=True)
    (root / "db" / "subscribers.bin").write_bytes(rng.randbytes(size))
    (root / "conf.txt").write_text("apn = internet\n")
    return root


@pytest.fixture
def data(workdir: Path) -> Path:
    return make_data(workdir / "nf-data")


@pytest.fixture
def instance(workdir: Path, data: Path) -> str:
    result = ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    return last_line(result)


@pytest.fixture
def point(instance: str) -> str:
    result = ok("backup", "nf1")
    rp = last_line(result)
    assert POINT_ID.fullmatch(rp)
    return rp


def script(*args: str | Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"},
    )


def site_of(workdir: Path) -> Site:
    return Site.load(workdir / "site.toml")


# --------------------------------------------------------------------------- backup .. restore


def test_backup_copy_and_restore_through_the_console_script(
    workdir: Path, data: Path, instance: str
) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"no console script at {CONSOLE_SCRIPT}"
    backed = script("backup", "nf1", cwd=workdir)
    assert backed.returncode == 0, backed.stderr
    rp = last_line(backed)
    assert POINT_ID.fullmatch(rp) and backed.stdout.strip() == rp
    assert "nf1" in backed.stderr and "local:east" in backed.stderr

    listed = as_json(ok("points", "--json"))
    assert [(p["id"], p["region"], p["instance_id"]) for p in listed] == [
        (rp, "local:east", instance)
    ]
    assert listed[0]["lineage"] is None and listed[0]["policy"] == "1d-1w"

    copied = script("copy", rp, "--to", "west", cwd=workdir)
    assert copied.returncode == 0, copied.stderr
    cp = last_line(copied)
    assert POINT_ID.fullmatch(cp) and cp != rp
    assert "bytes over transit" in copied.stderr
    (west_point,) = as_json(ok("points", "--region", "west", "--json"))
    assert west_point["id"] == cp
    assert west_point["lineage"] == {"source_region": "local:east", "source_recovery_point": rp}

    # copying again prints the same copy
    again = ok("copy", rp[:12], "--to", "west")
    assert last_line(again) == cp and "already holds" in again.stderr

    out = workdir / "restored"
    restored = script("restore", cp, "--region", "west", "--target", out, cwd=workdir)
    assert restored.returncode == 0, restored.stderr
    assert snapshot(out) == snapshot(data)

    # plain listing: one row per point
    rows = ok("points").stdout.splitlines()
    assert len(rows) == 2 and all("\t" in row for row in rows)


def test_restore_selected_paths_and_json(workdir: Path, data: Path, point: str) -> None:
    out = workdir / "part"
    result = ok("restore", point, "--region", "east", "--target", out, "--path", "db", "--json")
    report = as_json(result)
    assert report["point"] == point and report["target"] == str(out)
    assert (out / "db" / "subscribers.bin").read_bytes() == (
        data / "db" / "subscribers.bin"
    ).read_bytes()
    assert not (out / "conf.txt").exists()

    missing = workdir / "missing"
    line = fails(run("restore", point, "--region", "east", "--target", missing, "--path", "dbx"))
    assert line.endswith(f"recovery point {point} holds no path 'dbx'")
    assert not missing.exists()


def test_restore_with_launch_starts_the_function_in_west(workdir: Path) -> None:
    data = workdir / "nf-data"
    data.mkdir()
    command = f"{sys.executable} -m regionvault.plugins.samplenf"
    ok("instances", "add", "--region", "east", "--name", "vcore", "--data", data,
       "--command", command)  # fmt: skip
    # the function's state on disk, as if it had run in east
    from regionvault.plugins.samplenf import NetworkFunction, read_state, state_digest

    NetworkFunction(data).seed(12)
    digest = state_digest(read_state(data))
    rp = last_line(ok("backup", "vcore"))
    cp = last_line(ok("copy", rp, "--to", "west"))

    site = site_of(workdir)
    launched: list[str] = []
    try:
        result = ok("restore", cp, "--region", "west", "--launch", "--name", "vcore-west")
        instance_id = last_line(result)
        launched.append(instance_id)
        assert "healthy after" in result.stdout and "vcore-west" in result.stdout
        west = site.region("west")
        inst = west.compute.get_instance(instance_id)
        assert inst.state == "running" and inst.function == command
        restored = Path(inst.extra["data_dir"])
        assert state_digest(read_state(restored)) == digest

        again = as_json(ok("restore", cp, "--region", "west", "--launch", "--json"))
        launched.append(again["instance"])
        assert again["healthy"] is True and again["rto_seconds"] > 0
        status = as_json(ok("status", "--json"))
        (row,) = [r for r in status if r["region"] == "local:west" and r["role"] == "copy"]
        assert row["last_drill_healthy"] is True
        assert row["last_drill_rto"] == pytest.approx(again["rto_seconds"], abs=0.001)
    finally:
        for instance_id in launched:
            site.region("west").compute.terminate(instance_id)
        site.close()


# --------------------------------------------------------------------------- verify, prune


def test_verify_reads_every_byte_and_names_a_damaged_pack(workdir: Path, point: str) -> None:
    good = ok("verify", "--read-data")
    assert "local:east: ok" in good.stdout and "bytes read" in good.stdout
    report = {r["region"]: r for r in as_json(ok("verify", "--read-data", "--json"))}
    assert report["local:east"]["ok"] and report["local:east"]["points"] == 1

    packs = sorted((workdir / "regions" / "east" / "vault" / "objects" / "packs").rglob("*"))
    pack = next(p for p in packs if p.is_file())
    flip_bit(pack, pack.stat().st_size // 2)
    bad = run("verify", "--read-data")
    fails(bad, "verify found errors", "local:east")
    assert pack.name in bad.stdout  # the details name the damaged object
    structure_only = run("verify", "--region", "east")
    assert structure_only.exit_code == 0  # structure is intact; only reading finds it


def test_prune_collects_what_no_point_uses(workdir: Path, data: Path, point: str) -> None:
    nothing = as_json(ok("prune", "--json"))
    assert [r["packs_deleted"] for r in nothing] == [0, 0]
    site = site_of(workdir)
    try:
        east = site.region("east")
        Repository.open(east.vault, east.keys, region=east.name).forget([point])
    finally:
        site.close()
    pruned = {r["region"]: r for r in as_json(ok("prune", "--region", "east", "--json"))}
    assert list(pruned) == ["local:east"]
    assert pruned["local:east"]["packs_deleted"] >= 1
    assert pruned["local:east"]["bytes_freed"] > 0
    assert "deleted 0 packs" in ok("prune").stdout
    assert as_json(ok("points", "--json")) == []


# --------------------------------------------------------------------------- tag, tick, status, run


def test_tag_tick_and_status(workdir: Path, data: Path, instance: str) -> None:
    clear_of_day_end()  # the second tick must find the first one's daily slot done
    tagged = as_json(ok("tag", "--json"))
    east = next(r for r in tagged if r["region"] == "local:east")
    assert east["tagged"] == [{"id": instance, "name": "nf1", "value": "1-7"}]
    again = as_json(ok("tag", "--json"))
    assert all(r["tagged"] == [] for r in again)
    assert "tagged 0" in ok("tag").stdout

    tick = as_json(ok("tick", "--json"))
    assert tick["ok"] is True and tick["problems"] == []
    kinds = {(j["kind"], j["status"]) for j in tick["jobs"]}
    assert {("backup", "done"), ("copy", "done"), ("retention", "done")} <= kinds
    (backup_job,) = [j for j in tick["jobs"] if j["kind"] == "backup"]
    (copy_job,) = [j for j in tick["jobs"] if j["kind"] == "copy"]
    rp, cp = backup_job["result"]["point"], copy_job["result"]["copy"]

    # a second tick right away has nothing new to do
    second = as_json(ok("tick", "--json"))
    assert not [j for j in second["jobs"] if j["kind"] in ("backup", "copy")]
    assert "local:east: due 0" in ok("tick").stdout

    rows = {r["region"]: r for r in as_json(ok("status", "--json"))}
    assert rows["local:east"]["newest_point"] == rp and rows["local:east"]["role"] == "home"
    assert rows["local:west"]["newest_point"] == cp and rows["local:west"]["role"] == "copy"
    for row in rows.values():
        assert row["instance_id"] == instance and 0 <= row["rpo_seconds"] < 3600
    assert rows["local:west"]["last_copy_at"] is not None
    table = ok("status").stdout.splitlines()
    assert len(table) == 2 and all("nf1" in line for line in table)


def test_run_a_bounded_number_of_ticks(workdir: Path, instance: str) -> None:
    result = ok("run", "--max-ticks", "1", "--interval", "1s")
    assert "stopped after 1 tick(s)" in result.stderr
    assert len(as_json(ok("points", "--json"))) == 2  # the backup and its copy
    bad = run("run", "--interval", "soon", "--max-ticks", "1")
    assert bad.exit_code == 2 and "--interval" in bad.stderr


def test_a_sigterm_during_a_retry_wait_ends_run_cleanly(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # east's tag job is throttled, and SIGTERM arrives as it starts to wait to retry: the
    # runner stopped, no step failed, so `run` exits 0 (not 1, "1 step(s) failed")
    from regionvault.core.errors import TransientError
    from regionvault.core.pipeline import Engine

    real_tag = Engine.tag
    signalled: list[str] = []

    def tag(self: Engine, region: str) -> Any:
        if "east" not in region:
            return real_tag(self, region)
        if not signalled:
            signalled.append(region)
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler sets its stop event
        raise TransientError("throttled (test)", region=region, retry_after=3600)

    monkeypatch.setattr(Engine, "tag", tag)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = run("run", "--interval", "1h")  # bounded: the default waits end by 4 min
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert signalled
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "stopped while waiting to retry" in result.stdout
    assert "SIGTERM" in result.stderr and "stopped after 1 tick(s)" in result.stderr
    assert "step(s) failed" not in result.stderr and "error" not in result.stderr


@pytest.fixture
def big_instance(workdir: Path) -> str:
    # enough data that the tick's backup takes a moment, to stop the daemon inside it
    data = make_data(workdir / "big-data", size=48 << 20)
    result = ok("instances", "add", "--region", "east", "--name", "big", "--data", data)
    return last_line(result)


def test_run_stops_on_sigterm_after_finishing_its_tick(workdir: Path, big_instance: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    proc = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "run", "--interval", "1h"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        locks = workdir / ".regionvault" / "jobs" / "locks"
        for _ in range(3000):  # bounded: up to 30 s for the tick to start a job
            if proc.poll() is not None or any(locks.glob("*.lock")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped after 1 tick(s)" in err
    assert "Traceback" not in err
    # the tick it was in finished: the backup and its copy are both there
    points = as_json(ok("points", "--json"))
    assert sorted(p["region"] for p in points) == ["local:east", "local:west"]
    assert "backup" in out and "copy" in out
    assert not any((workdir / ".regionvault" / "jobs" / "locks").glob("*.lock"))


# --------------------------------------------------------------------------- no repository yet


def vault_objects(workdir: Path) -> dict[str, list[str]]:
    """Every object in every region's vault, read through the Vault interface."""
    site = site_of(workdir)
    try:
        return {r.name: [o.name for o in r.vault.list()] for r in site.regions}
    finally:
        site.close()


def test_reading_commands_create_no_repository(workdir: Path) -> None:
    """points, status, verify, prune and restore on regions whose vaults hold no repository
    yet: listings are empty (exit 0), the rest say so in one line (exit 1), and not one
    object is written to any vault."""
    empty = {"local:east": [], "local:west": []}
    assert vault_objects(workdir) == empty

    assert ok("points").stdout == ""
    assert as_json(ok("points", "--json")) == []
    assert as_json(ok("points", "--region", "west", "--json")) == []

    rows = as_json(ok("status", "--json"))
    assert [(r["region"], r["points"], r["instance_id"]) for r in rows] == [
        ("local:east", 0, None),
        ("local:west", 0, None),
    ]
    assert all(r["newest_point"] is None and r["rpo_seconds"] is None for r in rows)
    table = ok("status").stdout.splitlines()
    assert [line.split("\t")[1:4] for line in table] == [
        ["local:east", "-", "0"],
        ["local:west", "-", "0"],
    ]

    fails(run("verify"), "no region holds a repository yet", "nothing to verify")
    fails(run("verify", "--json", "--read-data"), "nothing to verify")
    fails(run("verify", "--region", "west"), "no repository in local:west yet", "verify")
    fails(run("prune"), "no region holds a repository yet", "nothing to prune")
    fails(run("prune", "--region", "east", "--json"), "no repository in local:east yet")
    fp = "f" * 32
    fails(run("restore", fp, "--region", "west", "--target", workdir / "out"), "no repository")
    fails(run("restore", fp, "--region", "west", "--launch"), fp, "no repository yet")
    assert not (workdir / "out").exists()

    assert vault_objects(workdir) == empty
    assert not list((workdir / "regions").glob("*/compute/instances/*"))  # no sink was made


def test_commands_skip_a_region_without_a_repository(workdir: Path, point: str) -> None:
    """With a repository in east only: verify and prune work on east and say that west has
    none (exit 0); status shows west with no points; west's vault stays empty."""
    verified = ok("verify")
    assert "local:east: ok" in verified.stdout
    assert "local:west: no repository yet" in verified.stdout
    report = {r["region"]: r for r in as_json(ok("verify", "--json"))}
    assert report["local:east"]["repository"] is True and report["local:east"]["points"] == 1
    assert report["local:west"]["repository"] is False and report["local:west"]["ok"] is True
    pruned = as_json(ok("prune", "--json"))
    assert [(r["region"], r["repository"]) for r in pruned] == [
        ("local:east", True),
        ("local:west", False),
    ]
    assert "local:west: no repository yet" in ok("prune").stdout
    fails(run("verify", "--region", "west"), "no repository in local:west yet")
    rows = as_json(ok("status", "--json"))
    assert [(r["region"], r["points"]) for r in rows] == [("local:east", 1), ("local:west", 0)]
    assert [p["region"] for p in as_json(ok("points", "--json"))] == ["local:east"]
    objects = vault_objects(workdir)
    assert "config" in objects["local:east"] and objects["local:west"] == []


def test_a_failed_launch_through_the_cli_leaves_nothing_in_the_region(
    workdir: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launched function cannot be started: the restore fails with one line, and no
    restored data or pending sink stays behind."""
    from regionvault.providers.local.compute import LocalCompute

    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data,
       "--command", "exec sleep 60")  # fmt: skip
    rp = last_line(ok("backup", "nf1"))

    def no_start(self: LocalCompute, record: Any) -> Any:
        raise self._error(f"cannot start {record['function']!r}: no such interpreter")

    instances = workdir / "regions" / "east" / "compute" / "instances"
    before = {p.name for p in instances.iterdir()}
    monkeypatch.setattr(LocalCompute, "_start", no_start)
    fails(run("restore", rp, "--region", "east", "--launch"), "no such interpreter")
    assert {p.name for p in instances.iterdir()} == before
    assert len(before) == 1  # nf1 alone


def test_an_unhealthy_launch_is_kept_and_named(
    workdir: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launched instance does not become healthy: restore exits 1 naming it, and the
    instance stays (the engine never removes an instance that exists)."""
    from regionvault.core.pipeline import engine

    def never_healthy(region: Any, instance: Any, started: float, **options: Any) -> Any:
        return None, "not healthy after 0.1s (state running)"

    monkeypatch.setattr(engine, "await_healthy", never_healthy)
    result = run("restore", point, "--region", "east", "--launch", "--json")
    line = fails(result, "did not become healthy", "not healthy after 0.1s", "local:east")
    report = as_json(result)
    assert report["healthy"] is False and report["health_error"].startswith("not healthy")
    assert report["instance"] in line
    site = site_of(workdir)
    try:
        kept = site.region("east").compute.get_instance(report["instance"])
        assert kept.state == "running"
        site.region("east").compute.terminate(kept.id)
    finally:
        site.close()


# --------------------------------------------------------------------------- errors


def test_errors_are_one_line_without_a_traceback(workdir: Path, point: str) -> None:
    out = workdir / "out"
    fails(run("restore", "0" * 32, "--region", "east", "--target", out), "no recovery point")
    fails(run("restore", "nonsense", "--region", "west", "--target", out), "nonsense")
    for wrong_region in (
        run("restore", point, "--region", "nowhere", "--target", out),
        run("copy", point, "--to", "nowhere"),
        run("points", "--region", "nowhere"),
    ):  # a usage error naming the known regions (issue #20), not the site's
        assert wrong_region.exit_code == 2, wrong_region.stderr
        assert "unknown region 'nowhere'; known regions: local:east, local:west" in (
            wrong_region.stderr
        )
    fails(run("copy", point, "--to", "east"), "itself")
    fails(run("backup", "no-such-instance"), "no-such-instance")
    full = workdir / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    fails(run("restore", point, "--region", "east", "--target", full), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    a_file = full / "keep.txt"
    fails(run("restore", point, "--region", "east", "--target", a_file), "existing file")
    assert a_file.read_text() == "mine"
    fails(run("restore", point, "--region", "east", "--target", "/proc/no/such/dir"), "/proc")
    fails(run("backup", "nf1", "--region", "west"), "nf1", "local:west")
    usage = run("restore", point, "--region", "east")
    assert usage.exit_code == 2 and "--target" in usage.stderr


def test_errors_through_the_console_script(workdir: Path) -> None:
    result = script("restore", "f" * 32, "--region", "west", "--target", "x", cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"regionvault: error: no recovery point '{'f' * 32}' in local:west: it holds no "
        "repository yet (nothing has been backed up or copied there)"
    ]
    assert result.stdout == ""
