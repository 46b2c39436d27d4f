"""The cost of running a tick's jobs on Celery (issue #18): N small instances in two local
regions (east replicating to west), one tick on a fresh site, on

- ``thread``: the site names no ``[executor]``; ``Service.tick()`` runs the jobs on the
  engine's thread pool in this process (copies as one ``copy`` job each);
- ``thread-dist``: the same thread pool made to tick as a distributed executor does (plans
  as jobs, every copy as its five phase jobs), so that the job set is Celery's own;
- ``celery-1`` / ``celery-2``: the site's ``[executor] kind = "celery"``, with one or two
  ``regionvault worker --region R`` processes per region (concurrency 1, thread pool) on a
  private redis-server; the ticking process is the coordinator, and opens no region.

Not a test. Each mode gets a fresh site and a fresh redis-server; the tick's wall time, its
jobs by kind, and then a second tick with nothing due are measured; the redis-server and the
workers are started and stopped here (by PID, also on Ctrl-C). Results are printed and
written to benchmarks/results/<date>-celery-<N>.json; docs/benchmarks.md says what they mean.

    .venv/bin/python benchmarks/celery_tick.py [--instances 1000] [--modes thread,...]
        [--work DIR] [--keep] [--no-write]

The machines here have two cores, so the Celery figures are overhead per job, not scale-out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regionvault.core import Site, load_site
from regionvault.core.pipeline import Engine, Service, TickReport
from regionvault.core.pipeline.jobs import PLAN_KINDS
from regionvault.core.pipeline.kinds import THREAD, executor_kind
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.plugins.celery import plugin as celery_plugin
from regionvault.plugins.celery.redis_server import RedisServer
from regionvault.plugins.celery.testing import WorkerProcess, stop_all
from regionvault.providers.local import plugin as local_plugin

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EAST, WEST = "local:east", "local:west"
MODES = ("thread", "thread-dist", "celery-1", "celery-2")
#: how long a worker may take to say it is ready, and to exit after SIGTERM
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that every ``finally`` runs."""


def _on_term(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


# ---- the site


def _toml(value: str | Path) -> str:
    return json.dumps(str(value))


def site_text(
    name: str,
    roots: dict[str, Path],
    state_dir: Path,
    *,
    keys: dict[str, Path] | None = None,
    executor: str = "",
) -> str:
    """A site file: the two local regions (``keys``: a region's keys root, when not under its
    root), east replicating to west, and an ``[executor]`` table when given."""
    parts = [f"[site]\nname = {_toml(name)}\nstate_dir = {_toml(state_dir)}\n"]
    for region, root in roots.items():
        parts.append(f'[regions."{region}"]\nroot = {_toml(root)}\n')
        if keys and region in keys:
            parts.append(f'[regions."{region}".keys]\nroot = {_toml(keys[region])}\n')
    parts.append(f"[[replication]]\nfrom = {_toml(EAST)}\nto = [{_toml(WEST)}]\n")
    if executor:
        parts.append(executor)
    return "\n".join(parts)


def open_site(path: Path) -> Site:
    """The site of ``path`` with the local provider and the celery executor kind."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin, celery_plugin])
    registry = registry_from(pm)
    return Site(load_site(path, registry=registry), registry=registry, plugin_manager=pm)


def make_site(root: Path, instances: int, seed: int) -> tuple[Path, dict[str, Path], int]:
    """A fresh two-region site under ``root`` with ``instances`` small instances, half in
    each region, each a directory of two files (a few KiB) adopted in place as the local
    provider registers instances (``LocalCompute.register_instance``), tagged for a daily
    backup; both regions' keys made. Returns the site file, the regions' roots and the
    instances' bytes."""
    roots = {EAST: root / "east", WEST: root / "west"}
    site_file = root / "site.toml"
    site_file.write_text(site_text("bench", roots, root / "state"))
    rng = random.Random(seed)
    total = 0
    with open_site(site_file) as site:
        regions = [site.region("east"), site.region("west")]
        for i in range(instances):
            data = root / "data" / f"vm-{i:04d}"
            data.mkdir(parents=True)
            blob = rng.randbytes(rng.randrange(2048, 6144))
            conf = "".join(f"key{k} = {rng.randrange(10**6)}\n" for k in range(40)).encode()
            (data / "disk.bin").write_bytes(blob)
            (data / "app.conf").write_bytes(conf)
            total += len(blob) + len(conf)
            regions[i % 2].compute.register_instance(f"vm-{i:04d}", data, tags={"backup": "1-7"})
        for region in regions:
            region.sealer()  # each region's keys, made by its own provider
    return site_file, roots, total


def executor_table(broker: str, namespace: str) -> str:
    return (
        f'[executor]\nkind = "celery"\nbroker = {_toml(broker)}\nnamespace = {_toml(namespace)}\n'
    )


def worker_site(root: Path, own: str, roots: dict[str, Path], table: str) -> Path:
    """The site file of ``own``'s workers: its own keys; of the other region its public
    sealing key alone (as docs/distributed.md deploys them)."""
    other = WEST if own == EAST else EAST
    short = own.split(":")[1]
    public = root / f"public-of-{other.split(':')[1]}" / "keys"
    public.mkdir(parents=True, exist_ok=True)
    shutil.copy(roots[other] / "keys" / "sealing.pub", public / "sealing.pub")
    path = root / f"worker-{short}" / "site.toml"
    path.parent.mkdir(parents=True)
    path.write_text(
        site_text(
            f"worker-{short}",
            roots,
            path.parent / "state",
            keys={other: public.parent},
            executor=table,
        )
    )
    return path


# ---- processes


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, 0.0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@contextmanager
def workers(specs: list[tuple[str, str, Path]], logs: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        for name, region, site_file in specs:
            started.append(WorkerProcess(name, region, site_file, logs / f"{name}.log"))
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        stop_all(started)


# ---- one mode


def _summary(report: TickReport) -> dict[str, Any]:
    by_kind = Counter(o.kind for o in report.jobs)
    by_status = Counter(o.status.value for o in report.jobs)
    return {
        "jobs": len(report.jobs),
        "plan_jobs": sum(n for k, n in by_kind.items() if k in PLAN_KINDS),
        "by_kind": dict(sorted(by_kind.items())),
        "by_status": dict(sorted(by_status.items())),
        "ok": report.ok,
        "failures": [f"{o.key}: {o.status.value}: {o.error}" for o in report.failures()][:5],
        "problems": report.problems[:5],
    }


def _timed_tick(service: Service) -> tuple[float, TickReport]:
    start = time.perf_counter()
    report = service.tick()
    return time.perf_counter() - start, report


def run_mode(mode: str, work: Path, instances: int, seed: int) -> dict[str, Any]:
    root = work / mode
    root.mkdir(parents=True)
    site_file, roots, data_bytes = make_site(root, instances, seed)
    result: dict[str, Any] = {"mode": mode, "instances": instances, "data_bytes": data_bytes}
    per_region = int(mode.split("-")[1]) if mode.startswith("celery") else 0
    if per_region:
        logs = root / "logs"
        logs.mkdir()
        with RedisServer(root / "redis") as redis:
            table = executor_table(redis.url, f"bench-{mode}")
            files = {r: worker_site(root, r, roots, table) for r in (EAST, WEST)}
            coordinator = root / "coordinator" / "site.toml"
            coordinator.parent.mkdir()
            coordinator.write_text(
                site_text("coordinator", roots, coordinator.parent / "state", executor=table)
            )
            specs = [
                (f"{r.split(':')[1]}-{i}", r, files[r])
                for r in (EAST, WEST)
                for i in range(1, per_region + 1)
            ]
            with workers(specs, logs) as running:
                result["workers"] = [w.name for w in running]
                result |= _measure(coordinator, [w.proc.pid for w in running], redis)
    else:
        result |= _measure(site_file, [], None, same_jobs=mode == "thread-dist")
    return result


def redis_commands(redis: RedisServer | None) -> Counter[str]:
    """The commands ``redis`` has run so far, by name (``INFO commandstats``)."""
    if redis is None:
        return Counter()
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


def _measure(
    site_file: Path, worker_pids: list[int], redis: RedisServer | None, *, same_jobs: bool = False
) -> dict[str, Any]:
    """Both ticks through the executor kind ``site_file`` names (as ``regionvault tick``
    does); CPU seconds of this process, the workers and redis-server during the first, and
    the commands Redis ran in each."""
    redis_pid = redis.pid if redis is not None else None
    load = os.getloadavg()
    with open_site(site_file) as site:
        engine = Engine(site)
        kind = executor_kind(site)
        with tick_service(kind, engine, same_jobs) as service:
            cpu0 = (own_cpu(), sum(cpu_of(p) for p in worker_pids), cpu_of(redis_pid or 0))
            commands0 = redis_commands(redis)
            first_wall, first = _timed_tick(service)
            cpu1 = (own_cpu(), sum(cpu_of(p) for p in worker_pids), cpu_of(redis_pid or 0))
            commands1 = redis_commands(redis)
            second_wall, second = _timed_tick(service)
            commands2 = redis_commands(redis)
    return {
        "executor": kind.name + (" (distributed tick)" if same_jobs else ""),
        "engine_workers": engine.workers,
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "tick": {"wall_s": round(first_wall, 3), **_summary(first)},
        "idle_tick": {"wall_s": round(second_wall, 3), **_summary(second)},
        "redis_commands": {
            "tick": dict((commands1 - commands0).most_common()),
            "idle_tick": dict((commands2 - commands1).most_common()),
        },
        "cpu_s": {
            "ticking_process": round(cpu1[0] - cpu0[0], 2),
            "workers": round(cpu1[1] - cpu0[1], 2),
            "redis": round(cpu1[2] - cpu0[2], 2),
        },
    }


@contextmanager
def tick_service(kind: Any, engine: Engine, same_jobs: bool) -> Iterator[Service]:
    """The service of ``regionvault tick`` (core/cli/tick.py): for ``thread``, the engine's
    own pool made afresh by each tick; for another kind, its executor. ``same_jobs``: a
    thread pool that ticks as a distributed executor does (plans and copy phases as jobs)."""
    if kind is THREAD and not same_jobs:
        yield Service(engine)
        return
    with kind.executor(engine, stop=None) as running:
        if same_jobs:
            running.distributed = True
        yield Service(engine, executor=running)


# ---- report


def table(results: list[dict[str, Any]]) -> str:
    base = {r["mode"]: r for r in results}
    thread = base.get("thread")
    same = base.get("thread-dist")
    lines = [
        "| mode | tick wall s | jobs (plans) | backup | copy jobs | ms/job | overhead ms/job "
        "vs thread | vs thread-dist | idle tick s (jobs) | CPU s: ticker / workers / redis "
        "| Redis cmds/job |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        t = r["tick"]
        jobs = t["jobs"]
        copies = sum(n for k, n in t["by_kind"].items() if k.startswith("copy"))

        def over(b: dict[str, Any] | None, r: dict[str, Any] = r, jobs: int = jobs) -> str:
            if b is None or b is r or r["mode"] == "thread":
                return ""
            return f"{(r['tick']['wall_s'] - b['tick']['wall_s']) / jobs * 1000:.1f}"

        cpu = r["cpu_s"]
        commands = sum(r.get("redis_commands", {}).get("tick", {}).values())
        per_job = f"{commands / jobs:.1f}" if commands else ""
        lines.append(
            f"| {r['mode']} | {t['wall_s']:.1f} | {jobs} ({t['plan_jobs']}) "
            f"| {t['by_kind'].get('backup', 0)} | {copies} | {t['wall_s'] / jobs * 1000:.1f} "
            f"| {over(thread)} | {over(same)} "
            f"| {r['idle_tick']['wall_s']:.2f} ({r['idle_tick']['jobs']}) "
            f"| {cpu['ticking_process']:.1f} / {cpu['workers']:.1f} / {cpu['redis']:.1f} "
            f"| {per_job} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the scratch directory")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)} (known: {', '.join(MODES)})")
    signal.signal(signal.SIGTERM, _on_term)
    work = Path(tempfile.mkdtemp(prefix="rv-celery-tick-", dir=args.work))
    started = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    try:
        for mode in modes:
            print(f"{mode}: {args.instances} instances ...", file=sys.stderr, flush=True)
            result = run_mode(mode, work, args.instances, args.seed)
            results.append(result)
            t = result["tick"]
            print(
                f"{mode}: tick {t['wall_s']:.1f} s, {t['jobs']} jobs, ok={t['ok']}; idle tick "
                f"{result['idle_tick']['wall_s']:.2f} s; load {result['load_after'][0]}",
                file=sys.stderr,
                flush=True,
            )
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: workers and redis-server stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    record = {
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/celery_tick.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "git": git_head(),
        "results": results,
    }
    print(f"Machine: {record['machine']}; git {record['git']}")
    print(table(results))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{record['date']}-celery-{args.instances}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
