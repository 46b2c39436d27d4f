"""A quick throughput check of the data plane alone (no CLI, no peers): full backup, the 1%
change, incremental backup and restore of a ~200 MiB dataset through the Python API on the
local provider. Not a test and not the side-by-side benchmark (that is ``run.py``).

    .venv/bin/python benchmarks/repository_quick.py [--size 200MiB] [--avg 131072]
        [--min 32768] [--max 524288] [--workers 0] [--work DIR]

The dataset comes from ``dataset.py`` (same shape as the benchmark's, smaller). Each phase
starts after ``sync()`` with the dataset read once, so the data is in the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset
import psutil
from regionvault.core.repository import ChunkerParams, Repository, RepositorySettings
from regionvault.core.types import Instance
from regionvault.providers.local import LocalKeyService, LocalProvider, LocalVault
from regionvault.providers.local.compute import LocalFileCapture

T = TypeVar("T")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                while f.read(8 << 20):
                    pass


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            with p.open("rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
            h.update(oct(p.stat().st_mode & 0o7777).encode())
    return h.hexdigest()


class PeakRss:
    """Samples this process's resident set size while a phase runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = psutil.Process().memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def vault_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "vault" / "objects").rglob("*") if p.is_file())


def phase(name: str, nbytes: int, fn: Callable[[], T]) -> T:
    os.sync()
    with PeakRss() as rss:
        c, t = cpu_seconds(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    print(
        f"{name:12s} {wall:6.2f} s  {nbytes / wall / 1e6:7.0f} MB/s  cpu {cpu:5.2f} s  "
        f"peak RSS {rss.peak / 2**20:4.0f} MiB (from {rss.start / 2**20:.0f})"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="200MiB")
    ap.add_argument("--avg", type=int, default=ChunkerParams().avg_size)
    ap.add_argument("--min", type=int, default=ChunkerParams().min_size)
    ap.add_argument("--max", type=int, default=ChunkerParams().max_size)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="rv-quick-"))
    data, region_root, out = work / "data", work / "region", work / "restore"
    total = dataset.parse_size(args.size)
    if data.exists() and dataset.undo_path(data).exists():
        dataset.revert(data)
    if not data.exists():
        dataset.generate(data, total)
    for path in (region_root, out):
        shutil.rmtree(path, ignore_errors=True)
    plan = dataset.plan_dataset(total)

    caps = LocalProvider.capabilities
    vault = LocalVault(root=region_root, provider="local", region="local:quick", capabilities=caps)
    keys = LocalKeyService(root=region_root, provider="local", region="local:quick",
                           capabilities=caps)  # fmt: skip
    chunker = ChunkerParams(min_size=args.min, avg_size=args.avg, max_size=args.max)
    repo = Repository.init_or_open(
        vault, keys, region="local:quick", chunker=chunker,
        settings=RepositorySettings(workers=args.workers),
    )  # fmt: skip
    instance = Instance(id="i-quick", name="quick", region="local:quick")
    print(f"dataset {dataset.summary_line(plan)}")
    print(f"chunker min {args.min} avg {args.avg} max {args.max}; workers "
          f"{repo.settings.worker_count()}")  # fmt: skip

    warm(data)
    phase("full", total, lambda: repo.backup(LocalFileCapture(instance, datetime.now(UTC), data)))
    stored = vault_bytes(region_root)
    summary = dataset.mutate(data, plan)
    warm(data)
    point = phase(
        "incremental",
        total,
        lambda: repo.backup(LocalFileCapture(instance, datetime.now(UTC), data)),
    )
    growth = vault_bytes(region_root) - stored
    phase("restore", total, lambda: repo.restore(point.id, out))
    same = tree_digest(out) == tree_digest(data)
    print(f"repository {stored / 1e6:.1f} MB after full, +{growth / 1e6:.1f} MB after the "
          f"change ({summary.bytes_changed / 1e6:.1f} MB changed)")  # fmt: skip
    print(f"restore byte-exact: {same}")
    dataset.revert(data)
    shutil.rmtree(out, ignore_errors=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
