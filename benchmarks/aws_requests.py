"""What the AWS provider asks of AWS per GiB: KMS calls, S3 requests and EBS direct API calls
for a full backup, a copy to another region, an unchanged re-backup and its copy, a backup
after a change (a sixteenth of the written blocks rewritten) and its copy, and a restore with
launch, counted with ``AwsProvider.metrics`` against a moto server this script
starts (on 127.0.0.1, stopped by its PID at the end). Not a test: request counts, not times.

    .venv/bin/python benchmarks/aws_requests.py [--sizes 64,256] [--seed 1] [--json PATH]

The disk is ``mixed_disk_blocks`` (regionvault.providers.aws.testing): per 4 MiB, 1.5 MiB of
random bytes, 1 MiB of log text, 0.5 MiB half random and half zeros, 0.5 MiB repeating an
earlier random block and 0.5 MiB never written. It is seeded as an EBS snapshot through the
EBS direct APIs (uncounted: a raw client) and captured from it. The site is us-east-1
replicating to eu-west-1, each with its KMS key and an Object Lock bucket, eu-west-1's inbox
a bucket of its own. Keys, buckets and repositories are made first by a throwaway engine
with ``create = true``; the measured engine is a fresh process's view with ``create =
false``, as in production, so its counts include each region's first-use calls (DescribeKey,
GetBucketVersioning, reading the repository config) once per run.

Two disk sizes separate what each run costs whatever its size (the fixed part) from what
grows with the data (the part per GiB): count = fixed + per_GiB x size, fitted through the
two sizes; "1 GiB run" is fixed + per_GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.metrics import MetricsSnapshot
from regionvault.providers.aws.provider import AwsProvider
from regionvault.providers.aws.testing import (
    MotoServer,
    dummy_credentials,
    mixed_disk_blocks,
    seed_snapshot,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
EAST, WEST = "us-east-1", "eu-west-1"
A, B = f"aws:{EAST}", f"aws:{WEST}"
PHASES = (
    "backup",
    "copy",
    "backup again (unchanged)",
    "copy again",
    "backup (1/16 changed)",
    "copy (1/16 changed)",
    "restore + launch",
)
#: every CHANGE_EVERY-th written block is rewritten for the "changed" phases
CHANGE_EVERY = 16
SERVICES = ("kms", "s3", "ebs", "ec2")


def _site(tmp: Path, endpoint: str, tag: str, *, create: bool) -> Path:
    def region(aws_region: str, **extra: Any) -> dict[str, Any]:
        return {
            "kms_key": f"alias/rv-bench-{tag}",
            "bucket": f"rv-bench-{tag}-{aws_region}",
            "object_lock": True,
            "create": create,
            "endpoint_url": endpoint,
            **extra,
        }

    doc = {
        "site": {"name": "aws-requests", "state_dir": str(tmp / "state")},
        "regions": {
            A: region(EAST),
            B: region(WEST, inbox_bucket=f"rv-bench-{tag}-{WEST}-inbox"),
        },
        "replication": [{"from": A, "to": B}],
    }
    path = tmp / ("setup.toml" if create else "site.toml")
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def _open(path: Path) -> tuple[Site, AwsProvider]:
    pm = make_plugin_manager()
    site = Site.load(path, registry=registry_from(pm), plugin_manager=pm)
    provider = site.registry.get("aws")
    assert isinstance(provider, AwsProvider)
    return site, provider


@contextlib.contextmanager
def _measure(provider: AwsProvider, into: dict[str, MetricsSnapshot], phase: str) -> Iterator[None]:
    before = provider.metrics.snapshot()
    yield
    into[phase] = provider.metrics.since(before)


def run_size(server: MotoServer, size: int, seed: int) -> dict[str, Any]:
    """Every phase's request counts for a ``size``-byte disk, on a freshly reset moto."""
    import boto3

    server.reset()
    tag = uuid.uuid4().hex[:8]
    blocks = mixed_disk_blocks(size, seed=seed)

    def raw(service: str, aws_region: str) -> Any:
        return boto3.session.Session().client(
            service, region_name=aws_region, endpoint_url=server.endpoint
        )

    snapshot = seed_snapshot(
        raw("ebs", EAST), blocks, volume_size_gib=max(1, math.ceil(size / GiB))
    )
    ec2 = raw("ec2", EAST)
    image = ec2.register_image(
        Name=f"rv-bench-{tag}", RootDeviceName="/dev/xvda", Architecture="x86_64"
    )["ImageId"]
    instance_id = ec2.run_instances(
        ImageId=image,
        InstanceType="m5.large",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "backup", "Value": "1-7"},
                    {"Key": "Name", "Value": "vcu-1"},
                    {"Key": CAPTURE_SNAPSHOT_TAG, "Value": snapshot},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]

    # the same disk a while later: a sixteenth of its written blocks rewritten
    changed = dict(blocks)
    rng = random.Random(seed + 1)
    for index in sorted(blocks)[::CHANGE_EVERY]:
        changed[index] = rng.randbytes(len(blocks[index]))
    snapshot2 = seed_snapshot(
        raw("ebs", EAST), changed, volume_size_gib=max(1, math.ceil(size / GiB))
    )

    counts: dict[str, MetricsSnapshot] = {}
    with tempfile.TemporaryDirectory(prefix="rv-aws-requests-") as scratch:
        tmp = Path(scratch)
        setup, _ = _open(_site(tmp, server.endpoint, tag, create=True))
        with setup:
            setup_engine = Engine(setup)
            for region in (A, B):
                setup_engine.repository(region)
            # eu-west-1's inbox bucket is made on first use of the link into it
            next(iter(setup.transit(A, B).inbox()), None)
        site, provider = _open(_site(tmp, server.endpoint, tag, create=False))
        now = datetime.now(UTC)
        with site:
            engine = Engine(site, clock=lambda: now)
            with _measure(provider, counts, PHASES[0]):
                point = engine.backup(instance_id, region=A)
            with _measure(provider, counts, PHASES[1]):
                copied = engine.copy(point.id, to=B)
            with _measure(provider, counts, PHASES[2]):
                point2 = engine.backup(instance_id, region=A)
            with _measure(provider, counts, PHASES[3]):
                copied2 = engine.copy(point2.id, to=B)
            ec2.create_tags(
                Resources=[instance_id], Tags=[{"Key": CAPTURE_SNAPSHOT_TAG, "Value": snapshot2}]
            )
            with _measure(provider, counts, PHASES[4]):
                point3 = engine.backup(instance_id, region=A)
            with _measure(provider, counts, PHASES[5]):
                copied3 = engine.copy(point3.id, to=B)
            with _measure(provider, counts, PHASES[6]):
                restored = engine.restore(copied.point.id, region=B, launch=True)
            assert restored.healthy and copied2.chunks_sent == 0 < copied3.chunks_sent
            stats = engine.repository(A).load_manifest(point.id).stats
    return {
        "size": size,
        "blocks_written": len(blocks),
        "stored_bytes": stats.get("bytes_stored"),
        "copy_bytes_forward": copied.bytes_forward,
        "phases": {
            phase: {
                "by_operation": snap.by_operation(),
                **{svc: snap.count(service=svc) for svc in SERVICES},
                "s3_bytes_sent": snap.bytes_sent(service="s3"),
            }
            for phase, snap in counts.items()
        },
    }


def fit(small: dict[str, Any], large: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per phase and service: fixed per run, per GiB, and a 1 GiB run's count."""
    span = (large["size"] - small["size"]) / GiB
    out: dict[str, dict[str, dict[str, float]]] = {}
    for phase in PHASES:
        out[phase] = {}
        for svc in SERVICES:
            c1 = small["phases"][phase][svc]
            c2 = large["phases"][phase][svc]
            per_gib = (c2 - c1) / span
            fixed = c1 - per_gib * small["size"] / GiB
            out[phase][svc] = {"fixed": fixed, "per_gib": per_gib, "one_gib": fixed + per_gib}
    return out


def markdown(results: list[dict[str, Any]], fitted: dict[str, Any] | None) -> str:
    lines = []
    sizes = ", ".join(f"{r['size'] // MiB} MiB" for r in results)
    lines.append(f"Measured counts ({sizes} disks):\n")
    for r in results:
        lines.append(
            f"- {r['size'] // MiB} MiB disk: {r['blocks_written']} blocks written, "
            f"{(r['stored_bytes'] or 0) / MiB:.1f} MiB stored after compression, "
            f"{r['copy_bytes_forward'] / MiB:.1f} MiB sent by the copy"
        )
    lines.append("")
    lines.append("| phase | disk | KMS | S3 | EBS direct | EC2 |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        for phase in PHASES:
            p = r["phases"][phase]
            lines.append(
                f"| {phase} | {r['size'] // MiB} MiB | {p['kms']} | {p['s3']} | {p['ebs']} "
                f"| {p['ec2']} |"
            )
    if fitted is not None:
        lines.append("\nPer run and per GiB (count = fixed + per GiB x size):\n")
        lines.append("| phase | KMS fixed + per GiB | S3 fixed + per GiB | EBS fixed + per GiB |")
        lines.append("|---|---|---|---|")
        for phase in PHASES:
            f = fitted[phase]
            cells = [f"{f[svc]['fixed']:.0f} + {f[svc]['per_gib']:.0f}" for svc in SERVICES[:3]]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("\nBy operation, largest disk:\n")
    for phase in PHASES:
        ops = results[-1]["phases"][phase]["by_operation"]
        shown = ", ".join(f"{k} {v}" for k, v in ops.items() if not k.startswith("ec2."))
        lines.append(f"- {phase}: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="64,256", help="disk sizes in MiB, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) * MiB for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s <= 0 or s % (4 * MiB) for s in sizes):
        parser.error("--sizes: positive multiples of 4 MiB")
    results = []
    started = time.monotonic()
    with dummy_credentials(), MotoServer() as server:
        for size in sizes:
            print(f"aws_requests: {size // MiB} MiB ...", file=sys.stderr)
            results.append(run_size(server, size, args.seed))
    fitted = fit(results[0], results[-1]) if len(results) >= 2 else None
    print(markdown(results, fitted))
    print(f"\n({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json is not None:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "benchmarks/aws_requests.py " + " ".join(argv or sys.argv[1:]),
            "results": results,
            "fit": fitted,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
