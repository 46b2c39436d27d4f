"""kill -9 trials on the composed edge site (providers/openstack/conformance.py: a fake
OpenStack cloud per region, SoftHSM keys, libcloud vaults on moto's S3 server), run by
test_edge_kill.py in a child pytest process of their own (SoftHSM reads its configuration
once per process).

``regionvault backup`` of a server, ``regionvault copy`` of its point and ``regionvault
restore --launch`` of the copy run as processes and are SIGKILLed at seeded random moments
(the first backup while its capture holds a cinder snapshot, the first launch while its
server boots). After each kill the same command is run again and succeeds; its first
capture or restore sweeps what the killed one left (compute.py's sweep of dead owners). At
the end both vaults pass ``verify --read-data``, nothing of a killed run is left in either
fake cloud (no snapshot, no volume but the servers' own, no ``rv-`` image, no server still
carrying a launch's markers, no scratch file), and the launched server's volume holds the
original's bytes and carries the original's tags, never a half-launched one.

Kill moments come from a seeded RNG (REGIONVAULT_KILL_SEED picks another) within the
duration of one measured, unkilled run of the same command; each trial's seed and moment
are printed (shown with a failure).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from openstack_world import edge_regions
from regionvault.core.conformance.support import tar_image
from regionvault.providers.openstack.compute import PURPOSE_KEY, SCRATCH_PREFIX

pytest.importorskip("moto", reason="the edge kill trials need moto[server]")
pytest.importorskip("pkcs11", reason="the edge regions' keys need python-pkcs11")

pytestmark = pytest.mark.slow

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
SEED = int(os.environ.get("REGIONVAULT_KILL_SEED", "17"))
TRIALS = 3
A, B = "openstack:east", "openstack:west"
FLAVOR = "m1.medium"
METADATA = {"backup": "1-7", "function": "vcu"}
#: seconds one command may take
LIMIT = 180


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, dict[str, Any]], dict[str, Any]]]:
    try:
        with edge_regions(tmp_path_factory.mktemp("edge")) as made:
            yield made
    except Exception as exc:  # SoftHSM missing: UnsupportedOperation
        if type(exc).__name__ == "UnsupportedOperation":
            pytest.skip(str(exc))
        raise


def _site(regions: dict[str, Any], tmp_path: Path, scratch: Path) -> Path:
    regions = {
        name: {**settings, "scratch_dir": str(scratch), "poll_interval": 0.02}
        for name, settings in regions.items()
    }
    doc = {
        "site": {"name": "kill-edge", "state_dir": str(tmp_path / "state")},
        "regions": regions,
        "replication": [{"from": A, "to": B}],
    }
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def _command(site: Path, *args: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), "--site", str(site), *args]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}


def _run(site: Path, *args: str) -> tuple[str, float]:
    started = time.monotonic()
    done = subprocess.run(
        _command(site, *args),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1], took


def _killed(
    site: Path, args: tuple[str, ...], after: float, when: Callable[[], bool] | None = None
) -> int | None:
    """Start a command and SIGKILL it ``after`` seconds in, or as soon as ``when()`` holds;
    its exit status if it ended first."""
    child = subprocess.Popen(
        _command(site, *args),
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if when is None:
            return child.wait(timeout=after)
        deadline = time.monotonic() + LIMIT
        while not when():
            if child.poll() is not None or time.monotonic() > deadline:
                return child.wait()
            time.sleep(0.002)
        raise subprocess.TimeoutExpired(args, 0)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=LIMIT)
        return None


def _left_behind(fake: Any, scratch: Path) -> list[str]:
    """What a capture, restore or launch left: snapshots, volumes no server has, images
    named ``rv-``, servers still carrying a launch's markers, scratch files."""
    fake.settle()
    return (
        [f"snapshot {s['name']}" for s in fake.snapshots()]
        + [f"volume {v['name']}" for v in fake.volumes() if not v.get("server")]
        + [f"image {i['name']}" for i in fake.images() if str(i["name"]).startswith("rv-")]
        + [f"server {s['name']}" for s in fake.servers() if PURPOSE_KEY in s["metadata"]]
        + [f"file {p.name}" for p in scratch.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    )


def test_backup_copy_and_launch_killed_at_random_moments_finish_when_run_again(
    edge: tuple[dict[str, dict[str, Any]], dict[str, Any]], tmp_path: Path
) -> None:
    regions, fakes = edge
    east, west = fakes["east"], fakes["west"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    original = tar_image({"disk": random.Random(SEED).randbytes(3 * 1024 * 1024)})
    server_id = east.seed_server("vcu-1", original, FLAVOR, dict(METADATA))
    site = _site(regions, tmp_path, scratch)
    rng = random.Random(SEED)

    point, backup_took = _run(site, "backup", server_id, "--region", A)
    _copy, copy_took = _run(site, "copy", point, "--to", B)

    swept: list[str] = []
    for trial in range(TRIALS):
        after = rng.uniform(0.15 * backup_took, 0.7 * backup_took)
        when = (lambda: bool(east.snapshots())) if trial == 0 else None
        moment = "while a snapshot exists" if when else f"{after:.3f}s in"
        print(f"trial {trial}: seed {SEED}, backup killed {moment}")
        assert _killed(site, ("backup", server_id, "--region", A), after, when) is None
        swept += _left_behind(east, scratch)
        point, _took = _run(site, "backup", server_id, "--region", A)  # sweeps, backs up
        assert _left_behind(east, scratch) == []
        after = rng.uniform(0.15 * copy_took, 0.7 * copy_took)
        print(f"trial {trial}: seed {SEED}, copy of {point} killed {after:.3f}s in")
        assert _killed(site, ("copy", point, "--to", B), after) is None
        copy, _took = _run(site, "copy", point, "--to", B)
    print(f"left by killed backups, swept by the next: {swept}")
    assert any(s.startswith("snapshot ") for s in swept), swept

    # a launch killed while its server boots: the re-run sweeps the half-launched server
    servers_before = {s["id"] for s in west.servers()}

    def booting() -> bool:
        return any(PURPOSE_KEY in s["metadata"] for s in west.servers())

    print(f"seed {SEED}: restore --launch of {copy} killed while its server boots")
    assert _killed(site, ("restore", copy, "--region", B, "--launch"), LIMIT, booting) is None
    left = _left_behind(west, scratch)
    print(f"left by the killed launch: {left}")
    _run(site, "restore", copy, "--region", B, "--launch", "--name", "vcu-1-restored")
    assert _left_behind(west, scratch) == []
    launched = [s for s in west.servers() if s["id"] not in servers_before]
    assert len(launched) == 1, launched
    (server,) = launched
    assert server["metadata"] == METADATA and server["flavor_name"] == FLAVOR
    assert west.volume_bytes(server["id"])[: len(original)] == original

    _run(site, "backup", server_id, "--region", A)  # sweeps what the last killed copy left
    for region in (A, B):
        _run(site, "verify", "--read-data", "--region", region)
    assert _left_behind(east, scratch) == [] and _left_behind(west, scratch) == []
