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

    .venv/bin/python benchmarks/control_plane.py [--instances 10000] [--bulk] [--aws]
        [--policy 1-7|none] [--work DIR] [--keep] [--no-tick] [--profile DIR] [--no-write]

``--bulk`` writes the records as a release before the index did (one JSON file each), and
times the index's first build from them, then registers through the API from there (minutes
less to set up 10,000 on a busy machine). ``--policy none`` opts every instance out, so
that a tick has nothing due without a first tick making N points (which takes the data
plane about half a second a point on this machine, copy included). ``--work DIR`` with a
site made by an earlier run (``--keep``) reuses it: setup is skipped. ``--aws`` adds the
AWS provider's Compute over :class:`PagingEc2` (N instances, half tagged): a listing, two
tagger passes and a scheduler pass, in this process, with their EC2 calls counted.
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
    cpu: list[float] = []
    made: list[str] = []
    with open_site(root / "site.toml") as site:
        compute = east_compute(site)
        for i in range(count):
            data = root / "data" / f"more-{i}"
            data.mkdir(parents=True, exist_ok=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            made.append(compute.register_instance(f"more-{i:03d}", data).id)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        for instance_id in made:
            compute.unregister_instance(instance_id)
    return {
        f"register_{count}_more_median_ms": round(statistics.median(times) * 1000, 2),
        f"register_{count}_more_mean_ms": round(statistics.mean(times) * 1000, 2),
        f"register_{count}_more_max_ms": round(max(times) * 1000, 2),
        # the rest of a registration's time is waiting: for its fsyncs, and for a core
        f"register_{count}_more_cpu_median_ms": round(statistics.median(cpu) * 1000, 2),
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


class PagingEc2:
    """What the AWS provider's Compute asks of EC2 for listing and tagging, answered as EC2
    pages: ``DescribeInstances`` with ``Filters`` (state, ``tag-key``, ``tag:K``),
    ``MaxResults`` counted in instances and an opaque ``NextToken``; ``CreateTags``. One
    instance per reservation, as most launches make. Not a test double of EC2's errors:
    a stand-in for moto, whose DescribeInstances does work in all N instances per page (at
    1,000 instances, 1.9 s a page here), so it cannot show the provider's own cost at 10,000.
    Each call is counted."""

    def __init__(self, count: int, tag: dict[str, str]) -> None:
        launched = datetime(2026, 12, 1, tzinfo=UTC)
        self.instances = [
            {
                "InstanceId": f"i-{i + 1:017x}",
                "InstanceType": "t3.micro",
                "ImageId": "ami-12345678",
                "State": {"Name": "running"},
                "LaunchTime": launched,
                "RootDeviceName": "/dev/xvda",
                "RootDeviceType": "ebs",
                "BlockDeviceMappings": [
                    {"DeviceName": "/dev/xvda", "Ebs": {"VolumeId": f"vol-{i + 1:017x}"}}
                ],
                "Placement": {"AvailabilityZone": "us-east-1a"},
                "Tags": [{"Key": "Name", "Value": f"nf-{i:05d}"}]
                + [{"Key": k, "Value": v} for k, v in tag.items()],
            }
            for i in range(count)
        ]
        self.by_id = {raw["InstanceId"]: raw for raw in self.instances}
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @staticmethod
    def _matches(raw: dict[str, Any], filters: list[dict[str, Any]]) -> bool:
        tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
        for f in filters:
            name, values = f["Name"], [v.replace("\\", "") for v in f["Values"]]
            if name == "instance-state-name":
                ok = raw["State"]["Name"] in values
            elif name == "tag-key":
                ok = any(v in tags for v in values)
            elif name.startswith("tag:"):
                ok = tags.get(name[4:]) in values
            else:
                raise ValueError(f"filter {name} not served by this stand-in")
            if not ok:
                return False
        return True

    def describe_instances(self, **kw: Any) -> dict[str, Any]:
        self._count("DescribeInstances")
        if "InstanceIds" in kw:
            found = [self.by_id[i] for i in kw["InstanceIds"]]
            return {"Reservations": [{"Instances": [raw]} for raw in found]}
        start = int(kw.get("NextToken") or 0)
        wanted, filters = int(kw["MaxResults"]), kw.get("Filters", [])
        page: list[dict[str, Any]] = []
        at = start
        while at < len(self.instances) and len(page) < wanted:
            if self._matches(self.instances[at], filters):
                page.append(self.instances[at])
            at += 1
        answer: dict[str, Any] = {"Reservations": [{"Instances": [raw]} for raw in page]}
        if at < len(self.instances):
            answer["NextToken"] = str(at)
        return answer

    def create_tags(self, *, Resources: list[str], Tags: list[dict[str, str]]) -> None:
        self._count("CreateTags")
        for instance_id in Resources:
            raw = self.by_id[instance_id]
            kept = [t for t in raw["Tags"] if t["Key"] not in {n["Key"] for n in Tags}]
            raw["Tags"] = kept + list(Tags)


class _FakeClients:
    def __init__(self, ec2: PagingEc2) -> None:
        self.ec2 = ec2

    def client(self, settings: Any, service: str) -> Any:
        if service != "ec2":
            raise ValueError(f"{service}: not served by this stand-in")
        return self.ec2


def aws_listing(root: Path, instances: int) -> dict[str, Any]:
    """The AWS provider's Compute over :class:`PagingEc2` holding ``instances`` instances,
    half of them tagged: a listing, a tagger pass (tagging the other half, then again with
    nothing to tag) and a scheduler pass, in this process, each timed with its EC2 calls."""
    from regionvault.core.config import RegionConfig, ServiceConfig
    from regionvault.core.pipeline.scheduler import due_instances
    from regionvault.core.pipeline.tagger import tag_region
    from regionvault.core.types import RegionId
    from regionvault.providers.aws.provider import AwsProvider

    provider = AwsProvider()
    settings = {"kms_key": "alias/bench", "bucket": "bench-bucket"}
    region = RegionConfig(
        id=RegionId("aws", "us-east-1"),
        settings=settings,
        services={svc: ServiceConfig("aws", settings) for svc in ("compute", "keys", "vault")},
        base_dir=root,
        source="benchmark",
    )
    compute = provider.compute(region)
    half = PagingEc2(instances, {})
    for raw in half.instances[::2]:
        raw["Tags"].append({"Key": "backup", "Value": "1-7"})
    compute._clients = _FakeClients(half)  # type: ignore[assignment]
    out: dict[str, Any] = {"aws_instances": instances}
    with open_site(root / "site.toml") as site:
        cfg = site.config
        steps = {
            "list": lambda: sum(1 for _ in compute.list_instances()),
            "tag": lambda: len(tag_region(compute, cfg).tagged),
            "tag_again": lambda: len(tag_region(compute, cfg).tagged),
            "schedule": lambda: len(
                due_instances(compute, lambda i: None, cfg, datetime.now(UTC)).due
            ),
        }
        for name, step in steps.items():
            half.calls.clear()
            start = time.perf_counter()
            cpu = time.process_time()
            answer = step()
            out[f"aws_{name}_s"] = round(time.perf_counter() - start, 2)
            out[f"aws_{name}_cpu_s"] = round(time.process_time() - cpu, 2)
            out[f"aws_{name}_result"] = answer
            out[f"aws_{name}_calls"] = dict(half.calls)
    return out


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
        "--aws", action="store_true", help="also the AWS provider over an EC2-paging stand-in"
    )
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
        if args.aws:
            result.update(aws_listing(work, args.instances))
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
