"""kill -9 trials on the GCP provider: ``regionvault backup`` of a GCE instance and
``regionvault copy`` of its point run as processes against the offline GCP stack of two
regions (this process's Cloud KMS and Compute Engine fakes, the session's
gcp-storage-emulator) and are SIGKILLed at a random moment. After every kill the same command
is run again and succeeds; its first capture sweeps what the killed one left on the worker
(the disks it had attached, its snapshots: compute.py's sweep of dead owners). At the end
both vaults pass ``verify --read-data``, nothing of a killed run is left in either zone (no
temporary disk, no snapshot, nothing attached to the worker but its own disk), and the last
copy launches in gcp:west as an instance whose disk holds the original's bytes.

Kill moments come from a seeded RNG (REGIONVAULT_KILL_SEED picks another) within the
duration of one measured, unkilled run of the same command, start-up included; each
trial's seed and moment are printed (shown with a failure).
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

import pytest
import tomli_w
from at_rest import DISK, disk_pieces, image_of
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.gcp.compute import KEEP_LABEL
from regionvault.providers.gcp.conformance import WORKER, OfflineRegion, offline_region
from regionvault.providers.gcp.emulator import GcsEmulator

pytestmark = pytest.mark.slow

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
SEED = int(os.environ.get("REGIONVAULT_KILL_SEED", "16"))
TRIALS = 3
A, B = "gcp:east", "gcp:west"
#: seconds one command may take
LIMIT = 120


@pytest.fixture
def regions(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[dict[str, OfflineRegion]]:
    tag = os.urandom(5).hex()
    with (
        offline_region(
            "east", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=tag
        ) as east,
        offline_region(
            "west", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=tag
        ) as west,
    ):
        yield {A: east, B: west}


def _site(regions: dict[str, OfflineRegion], tmp_path: Path) -> Path:
    doc = {
        "site": {"name": "kill-gcp", "state_dir": str(tmp_path / "state")},
        "regions": {name: region.settings for name, region in regions.items()},
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
    """Run a command to its end; its last line of output and its duration."""
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
    """Start a command and SIGKILL it ``after`` seconds in, or as soon as ``when()`` holds
    (polled, for at most ``LIMIT`` seconds); its exit status if it ended first."""
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


def _reading(region: OfflineRegion) -> Callable[[], bool]:
    """True while a capture has a disk attached to the worker (besides the worker's own)."""
    return lambda: len(region.gce.instance(WORKER)["disks"]) > 1


def _left_behind(region: OfflineRegion) -> list[str]:
    """What capture or restore left in the region's zone: disks attached to the worker
    besides its own, disks no instance uses, snapshots no one keeps."""
    gce = region.gce
    gce.settle()
    attached = [str(d["source"]).rsplit("/", 1)[-1] for d in gce.instance(WORKER)["disks"]]
    owned = {
        str(d["source"]).rsplit("/", 1)[-1]
        for name in gce.instance_names()
        for d in gce.instance(name)["disks"]
    }
    with gce._lock:  # the fake's own record of each snapshot's labels
        unkept = [n for n, s in gce._snapshots.items() if KEEP_LABEL not in s.labels]
    return (
        [f"attached {d}" for d in attached[1:]]
        + [f"disk {d}" for d in sorted(set(gce.disk_names()) - owned)]
        + [f"snapshot {n}" for n in unkept]
    )


def _nothing_left(region: OfflineRegion) -> None:
    """No capture or restore resource of a killed run: the disks are the instances' own and
    the worker's, the worker holds only its own disk, every snapshot left is a kept one
    (``KEEP_LABEL``: the base of the next incremental capture, the engine's to release)."""
    gce = region.gce
    gce.settle()
    attached = {str(d["source"]).rsplit("/", 1)[-1] for d in gce.instance(WORKER)["disks"]}
    assert len(attached) == 1, f"disks left attached to the worker: {attached}"
    owned = {
        str(d["source"]).rsplit("/", 1)[-1]
        for name in gce.instance_names()
        for d in gce.instance(name)["disks"]
    }
    assert set(gce.disk_names()) == owned, set(gce.disk_names()) - owned
    with gce._lock:  # the fake's own record of each snapshot's labels
        unkept = [n for n, s in gce._snapshots.items() if KEEP_LABEL not in s.labels]
    assert unkept == [], f"snapshots no one keeps: {unkept}"
    assert sorted(p.name for p in gce.device_dir.iterdir()) == ["google-persistent-disk-0"]


def test_backup_and_copy_killed_at_random_moments_finish_when_run_again(
    regions: dict[str, OfflineRegion], tmp_path: Path
) -> None:
    east, west = regions[A], regions[B]
    pieces = disk_pieces(seed=SEED)
    east.gce.seed_instance("vcu-1", disks=[pieces], labels={"backup": "1-7"})
    site = _site(regions, tmp_path)
    rng = random.Random(SEED)

    # one measured run of each command gives the span the kills fall in
    point, backup_took = _run(site, "backup", "vcu-1", "--region", A)
    _copy, copy_took = _run(site, "copy", point, "--to", B)

    swept: list[str] = []
    for trial in range(TRIALS):
        # the first kill falls while the capture reads a disk through the worker
        after = rng.uniform(0.5 * backup_took, backup_took)
        when = _reading(east) if trial == 0 else None
        moment = "while reading" if when else f"{after:.3f}s in"
        print(f"trial {trial}: seed {SEED}, backup killed {moment}")
        assert _killed(site, ("backup", "vcu-1", "--region", A), after, when) is None
        swept += _left_behind(east)
        point, _took = _run(site, "backup", "vcu-1", "--region", A)  # sweeps, then backs up
        assert _left_behind(east) == []
        after = rng.uniform(0.2, copy_took)
        print(f"trial {trial}: seed {SEED}, copy of {point} killed {after:.3f}s in")
        assert _killed(site, ("copy", point, "--to", B), after) is None
        copy, _took = _run(site, "copy", point, "--to", B)
    # the kills fell while captures held resources, which the next run's sweep removed
    print(f"left by killed backups, swept by the next: {swept}")
    assert any(s.startswith("attached ") for s in swept), swept

    # a last backup sweeps what the last killed copy's source capture could have left
    _run(site, "backup", "vcu-1", "--region", A)
    for region in (A, B):
        _run(site, "verify", "--read-data", "--region", region)
    pm = make_plugin_manager()
    with Site.load(site, registry=registry_from(pm), plugin_manager=pm) as loaded:
        engine = Engine(loaded)
        _nothing_left(east)
        _nothing_left(west)
        with east.gce._lock:
            kept = sorted(east.gce._snapshots)
        print(f"kept snapshots in {A} at the end: {len(kept)}")
        result = engine.restore(copy, region=B, launch=True)
        assert result.healthy and result.instance is not None
        raw = west.gce.instance(result.instance.name)
        (boot,) = [d for d in raw["disks"] if d.get("boot")]
        restored = west.gce.disk_path(str(boot["source"]).rsplit("/", 1)[-1])
        with restored.open("rb") as f:
            assert f.read(DISK) == image_of(pieces)
