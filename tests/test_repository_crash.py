"""A backup or prune killed at random points (SIGKILL) leaves a vault that verifies, the next
backup succeeds at once, and prune afterwards collects what the killed run left."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from regionvault.core import Region
from repository_support import capture, listing, repo_for, snapshot

WORKER = """
import sys, time
from pathlib import Path
from datetime import UTC, datetime
from regionvault.core import Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import ChunkerParams, Repository, RepositorySettings
from regionvault.providers.local import plugin
sys.path.insert(0, sys.argv[4])
from repository_support import INSTANCE, capture

pm = make_plugin_manager(load_entry_points=False, plugins=[plugin])
registry = registry_from(pm)
site = Site(load_site(sys.argv[1], registry=registry), registry=registry, plugin_manager=pm)
east = site.region("east")
settings = RepositorySettings(pack_size=512 << 10, index_every_packs=2)
repo = Repository.init_or_open(east.vault, east.keys, region=east.name, settings=settings,
    chunker=ChunkerParams(min_size=2048, avg_size=8192, max_size=32768))
print("started", flush=True)
if sys.argv[2] == "prune":
    repo.prune()
else:
    print(repo.backup(capture(Path(sys.argv[3]))).id, flush=True)
print("finished", flush=True)
"""


def make_data(root: Path, seed: int, mib: int = 12) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(mib):
        if i % 3:
            data = rng.randbytes(1 << 20)
        else:
            data = "".join(f"{i} {rng.random()} log line\n" for _ in range(40_000)).encode()
        (root / f"file{i:02d}").write_bytes(data[: 1 << 20])


def run_and_kill(script: Path, site_file: Path, what: str, src: Path, delay: float) -> str:
    """Start the worker, SIGKILL it ``delay`` seconds after it opened the repository; its
    output (it may have finished first)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(site_file), what, str(src), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "started" (or EOF if it died)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out = line + proc.communicate(timeout=60)[0]
    return out


def check_after_crash(repo_region: Region, src: Path, tmp: Path, tag: str) -> None:
    repo = repo_for(repo_region)
    report = repo.verify()
    assert report.ok, report.errors
    # the next backup is not blocked by the dead process's lock, and it succeeds
    point = repo.backup(capture(src))
    out = tmp / f"restored-{tag}"
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)
    assert repo.verify(read_data=True).ok


def trial(east: Region, tmp_path: Path, site_file: Path, seed: int) -> None:
    rng = random.Random(seed)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    src = tmp_path / f"src{seed}"
    make_data(src, seed)
    out = run_and_kill(script, site_file, "backup", src, rng.uniform(0.0, 0.25))
    check_after_crash(east, src, tmp_path, f"{seed}")
    repo = repo_for(east)
    if "finished" not in out:
        assert not any(p.id in out for p in repo.points())
    # prune collects the killed run's leftovers: afterwards nothing is unreferenced
    repo.prune()
    report = repo.verify(read_data=True)
    assert report.ok and report.warnings == [], report


def test_a_killed_backup_leaves_a_sound_vault(
    east: Region, tmp_path: Path, site_file: Path
) -> None:
    trial(east, tmp_path, site_file, seed=1)


@pytest.mark.slow
def test_backups_killed_at_random_points(east: Region, tmp_path: Path, site_file: Path) -> None:
    for seed in range(2, 7):
        trial(east, tmp_path, site_file, seed)
    assert listing(east, "locks/") == []


@pytest.mark.slow
def test_prune_killed_at_random_points_loses_nothing(
    east: Region, tmp_path: Path, site_file: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    repo = repo_for(east)
    keep_src = tmp_path / "keep"
    make_data(keep_src, 100, mib=6)
    rng = random.Random(7)
    for round_ in range(4):
        gone = tmp_path / f"gone{round_}"
        make_data(gone, 200 + round_, mib=6)
        # a point that shares half its data with the one kept, then forgotten
        for p in list(keep_src.iterdir())[:3]:
            (gone / p.name).write_bytes(p.read_bytes())
        keep = repo.backup(capture(keep_src))
        repo.forget([repo.backup(capture(gone)).id])
        run_and_kill(script, tmp_path / "site.toml", "prune", keep_src, rng.uniform(0.0, 0.3))
        repo = repo_for(east)
        assert repo.verify(read_data=True).ok
        out = tmp_path / f"out{round_}"
        repo.restore(keep.id, out)
        assert snapshot(out) == snapshot(keep_src)
    repo.prune()
    report = repo.verify(read_data=True)
    assert report.ok and report.warnings == [], report
