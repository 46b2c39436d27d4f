"""The control plane at scale (issue #21 item 4): N local instances in one region (east,
replicating to west), and the commands an operator runs on every tick, each timed as the
operator runs it (a fresh ``regionvault`` process, output to a pipe):

- ``register``: ``LocalCompute.register_instance`` of instance N+1 (and the mean over the
  last hundred of the N registrations that set the site up);
- ``instances``: ``regionvault instances`` (every instance, every page);
- ``tag``: ``regionvault tag`` with every instance tagged already (a pass that writes
  nothing: the steady state);
- ``tick``: ``regionvault tick`` with nothing due (every instance has its point of the
  day, made by one first tick that this script also times, and copied to west).

Not a test. The provider's own counts (index queries, records read) are printed beside the
times. ``--profile DIR`` runs each command once more in this process under cProfile and
writes ``DIR/<command>.prof`` (read them with ``python -m pstats``). Results are printed and
written to benchmarks/results/<date>-control-plane-<N>.json; docs/benchmarks.md, "The
control plane at scale", says what they mean.

    .venv/bin/python benchmarks/control_plane.py [--instances 10000] [--bulk]
        [--policy 1-7|none] [--work DIR] [--keep] [--no-tick] [--profile DIR] [--no-write]

``--bulk`` writes the records as a release before the index did (one JSON file each), and
times the index's first build from them, then registers through the API from there (minutes
less to set up 10,000 on a busy machine). ``--policy none`` opts every instance out, so
that a tick has nothing due without a first tick making N points (which takes the data
plane about half a second a point on this machine, copy included). ``--work DIR`` with a
site made by an earlier run (``--keep``) reuses it: setup is skipped.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import cProfile
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import regionvault.core
from regionvault.core import Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.local import plugin as local_plugin
from regionvault.providers.local.compute import LocalCompute

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EAST, WEST = "local:east", "local:west"
#: the commands timed, as ``regionvault`` arguments
COMMANDS = {
    "instances": ["instances"],
    "tag": ["tag"],
    "tick": ["tick"],
}


def _toml(value: str | Path) -> str:
    return json.dumps(str(value))


def site_text(root: Path) -> str:
    return (
        f'[site]\nname = "scale"\nstate_dir = {_toml(root / "state")}\n\n'
        f'[regions."{EAST}"]\nroot = {_toml(root / "east")}\n\n'
        f'[regions."{WEST}"]\nroot = {_toml(root / "west")}\n\n'
        f"[[replication]]\nfrom = {_toml(EAST)}\nto = [{_toml(WEST)}]\n"
    )


def open_site(path: Path) -> Site:
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin])
    registry = registry_from(pm)
    return Site(load_site(path, registry=registry), registry=registry, plugin_manager=pm)


def east_compute(site: Site) -> LocalCompute:
    compute = site.region("east").compute
    assert isinstance(compute, LocalCompute)
    return compute


def make_site(root: Path, instances: int, policy: str) -> dict[str, Any]:
    """``instances`` small instances in east, each a directory of one small file, tagged
    for a daily backup kept 7 days; returns the registration times."""
    site_file = root / "site.toml"
    root.mkdir(parents=True, exist_ok=True)
    site_file.write_text(site_text(root))
    times: list[float] = []
    with open_site(site_file) as site:
        compute = east_compute(site)
        for i in range(instances):
            data = root / "data" / f"nf-{i:05d}"
            data.mkdir(parents=True)
            (data / "state.bin").write_bytes(i.to_bytes(4, "big") * 64)
            start = time.perf_counter()
            compute.register_instance(f"nf-{i:05d}", data, tags={"backup": policy})
            times.append(time.perf_counter() - start)
            if (i + 1) % 1000 == 0:
                print(f"  registered {i + 1}", file=sys.stderr)
        for name in ("east", "west"):
            site.region(name).sealer()
    return {
        "register_total_s": round(sum(times), 2),
        "register_first100_mean_ms": round(statistics.mean(times[:100]) * 1000, 2),
        "register_last100_mean_ms": round(statistics.mean(times[-100:]) * 1000, 2),
    }


def make_site_in_bulk(root: Path, instances: int, policy: str) -> dict[str, Any]:
    """As :func:`make_site`, but the records are written as a release before the index
    wrote them (one JSON file each, no fsync: minutes less to set up 10,000), and the index
    is built from them on first use, as after an upgrade; returns that build's time."""
    site_file = root / "site.toml"
    root.mkdir(parents=True, exist_ok=True)
    site_file.write_text(site_text(root))
    with open_site(site_file) as site:
        compute = east_compute(site)
        compute.instances_dir.mkdir(parents=True, exist_ok=True)
        for i in range(instances):
            data = root / "data" / f"nf-{i:05d}"
            data.mkdir(parents=True)
            (data / "state.bin").write_bytes(i.to_bytes(4, "big") * 64)
            instance_id = f"i-{i + 1:016x}"
            record = compute._new_record(
                instance_id,
                name=f"nf-{i:05d}",
                tags=compute._tags({"backup": policy}),
                function=None,
                data_dir=data,
                owned=False,
                state="running",
            )
            (compute.instances_dir / instance_id).mkdir()
            (compute.instances_dir / instance_id / "instance.json").write_text(json.dumps(record))
        for name in ("east", "west"):
            site.region(name).sealer()
    with open_site(site_file) as site:
        compute = east_compute(site)
        start = time.perf_counter()
        compute.list_instances_page(page_size=1)
        took = time.perf_counter() - start
    return {"index_build_s": round(took, 2)}


def register_more(root: Path, instances: int, count: int = 100) -> dict[str, Any]:
    """Register ``count`` more instances (after instance N+1), each timed, then remove them."""
    times: list[float] = []
    made: list[str] = []
    with open_site(root / "site.toml") as site:
        compute = east_compute(site)
        for i in range(count):
            data = root / "data" / f"more-{i}"
            data.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            made.append(compute.register_instance(f"more-{i:03d}", data).id)
            times.append(time.perf_counter() - start)
        for instance_id in made:
            compute.unregister_instance(instance_id)
    return {
        f"register_{count}_more_median_ms": round(statistics.median(times) * 1000, 2),
        f"register_{count}_more_mean_ms": round(statistics.mean(times) * 1000, 2),
        f"register_{count}_more_max_ms": round(max(times) * 1000, 2),
    }


def register_one_more(root: Path, instances: int, tries: int = 5) -> dict[str, Any]:
    """Register instance N+1 with a Compute opened afresh (its index connection cold), then
    remove it; ``tries`` times: the median and worst time, and what the index did for the
    first (a single registration's time on a shared machine is mostly its fsyncs' wait)."""
    times: list[float] = []
    counted: dict[str, int] = {}
    data = root / "data" / "one-more"
    data.mkdir(parents=True, exist_ok=True)
    for _ in range(tries):
        with open_site(root / "site.toml") as site:
            compute = east_compute(site)
            start = time.perf_counter()
            inst = compute.register_instance(f"nf-{instances:05d}", data, tags={"backup": "1-7"})
            times.append(time.perf_counter() - start)
            stats = compute.index.stats
            counted = counted or {
                "index_queries": stats.queries,
                "records_read": stats.records_read,
            }
            compute.unregister_instance(inst.id)
    return {
        "register_one_more_median_ms": round(statistics.median(times) * 1000, 2),
        "register_one_more_max_ms": round(max(times) * 1000, 2),
        **counted,
    }


def run_cli(root: Path, args: list[str]) -> tuple[float, float, int, int]:
    """Wall time, CPU time (user + system: what a busy machine inflates least), exit status
    and output lines of ``regionvault --site ... <args>``."""
    script = Path(sys.executable).parent / "regionvault"
    command = [str(script), "--site", str(root / "site.toml")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command + args, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 3):
        print(done.stderr, file=sys.stderr)
    return took, cpu, done.returncode, len(done.stdout.splitlines())


def profile(root: Path, name: str, args: list[str], out: Path) -> None:
    from regionvault.core.cli import main

    out.mkdir(parents=True, exist_ok=True)
    profiler = cProfile.Profile()
    with Path(os.devnull).open("w") as devnull, contextlib.redirect_stdout(devnull):
        profiler.enable()
        try:
            main(["--site", str(root / "site.toml"), *args])
        except SystemExit:
            pass
        finally:
            profiler.disable()
    profiler.dump_stats(out / f"{name}.prof")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the scratch directory")
    parser.add_argument("--no-tick", action="store_true", help="skip the backup tick and tick")
    parser.add_argument(
        "--policy",
        default="1-7",
        help="the instances' backup tag (none: opted out, so the tick needs no points)",
    )
    parser.add_argument(
        "--bulk", action="store_true", help="write the records in bulk, then build the index"
    )
    parser.add_argument("--profile", type=Path, help="write cProfile stats here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="rv-control-plane-"))
    # each command is timed as an installed package runs it: from compiled modules (where
    # PYTHONDONTWRITEBYTECODE is set, every run would otherwise compile them all, ~1 s)
    compileall.compile_dir(Path(regionvault.core.__file__).parent.parent, quiet=1)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "instances": args.instances,
        "machine": machine(),
    }
    try:
        if (work / "site.toml").exists():
            print(f"reusing the site in {work}", file=sys.stderr)
        else:
            print(f"making {args.instances} instances in {work}", file=sys.stderr)
            make = make_site_in_bulk if args.bulk else make_site
            result.update(make(work, args.instances, args.policy))
            result["policy"] = args.policy
        result.update(register_one_more(work, args.instances))
        result.update(register_more(work, args.instances))
        commands = dict(COMMANDS)
        if args.no_tick:
            commands.pop("tick")
        elif not (work / "state" / "ticked").exists():
            took, cpu, status, _ = run_cli(work, ["tick"])
            result["first_tick_s"] = round(took, 2)
            result["first_tick_cpu_s"] = round(cpu, 2)
            result["first_tick_status"] = status
            (work / "state" / "ticked").write_text(str(status))
        for name, cli_args in commands.items():
            took, cpu, status, lines = run_cli(work, cli_args)
            result[f"{name}_s"] = round(took, 2)
            result[f"{name}_cpu_s"] = round(cpu, 2)
            result[f"{name}_status"] = status
            result[f"{name}_lines"] = lines
            if args.profile:
                profile(work, name, cli_args, args.profile)
        took, cpu, _, _ = run_cli(work, ["--help"])
        result["startup_s"] = round(took, 2)
        result["startup_cpu_s"] = round(cpu, 2)
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        day = result["date"][:10]
        kind = "" if args.policy == "1-7" else "-opted-out"
        (RESULTS / f"{day}-control-plane-{args.instances}{kind}.json").write_text(
            json.dumps(result, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
