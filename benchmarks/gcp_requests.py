"""What the GCP provider asks of Cloud Storage and Cloud KMS per GiB: requests and calls for
a full backup of a GCE instance, its copy to another region, an unchanged re-backup and its
copy, counted with ``GcpProvider.metrics`` against the provider's offline stack (one
gcp-storage-emulator, a Cloud KMS fake and a Compute Engine fake per region, all on
127.0.0.1, stopped at the end). Not a test: request counts, not times.

    .venv/bin/python benchmarks/gcp_requests.py [--sizes 64,256] [--seed 1]

The instance's boot disk holds ``size`` bytes of the AWS script's content mix (random, log
text, zeros, half-zero and repeated data) at the start of a 10 GB persistent disk; it is
captured as GCE captures it (a snapshot, a disk made from it and read through the worker).
Buckets, key rings and repositories are made first by a throwaway engine; the measured
engine starts fresh. Two sizes separate the part per run from the part per GiB:
count = fixed + per_GiB x size.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.gcp.conformance import offline_region, site_text
from regionvault.providers.gcp.emulator import GcsEmulator
from regionvault.providers.gcp.metrics import Usage
from regionvault.providers.gcp.provider import GcpProvider

MiB = 1024 * 1024
GiB = 1024 * MiB
A, B = "gcp:east", "gcp:west"
PHASES = ("backup", "copy", "backup again (unchanged)", "copy again")


def disk_data(size: int, seed: int) -> bytes:
    """``size`` bytes in 512 KiB blocks cycling through the AWS script's content kinds."""
    rng = random.Random(seed)
    block = 512 * 1024
    earlier: list[bytes] = []
    parts: list[bytes] = []
    for n in range(size // block):
        kind = n % 8
        if kind in (0, 1, 2):
            data = rng.randbytes(block)
            earlier.append(data)
        elif kind in (3, 4):
            data = b"".join(
                f"{n:05d} vcu[{rng.randrange(64)}]: ue {rng.getrandbits(40):010x} "
                f"handover cell {rng.randrange(4096)}\n".encode()
                for _ in range(block // 48)
            )[:block]
        elif kind == 5:
            data = bytes(block)
        elif kind == 6:
            data = rng.randbytes(block // 2) + bytes(block // 2)
        else:
            data = earlier[rng.randrange(len(earlier))]
        parts.append(data)
    return b"".join(parts)


def _open(path: Path) -> tuple[Site, GcpProvider]:
    pm = make_plugin_manager()
    registry = registry_from(pm)
    site = Site.load(path, registry=registry, plugin_manager=pm)
    provider = registry.get("gcp")
    assert isinstance(provider, GcpProvider)
    return site, provider


def _split(usage: Usage) -> dict[str, Any]:
    return {
        "storage": usage.count(service="storage"),
        "kms": usage.count(service="kms"),
        "sent": usage.bytes_sent(service="storage"),
        "ops": usage.by_operation(),
    }


def run(size: int, seed: int) -> dict[str, Any]:
    counts: dict[str, Usage] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rv-gcp-requests-")))
        storage = stack.enter_context(GcsEmulator(preconditions=True))
        regions = {
            name: stack.enter_context(
                offline_region(name, storage=storage.endpoint, workdir=tmp / "gce")
            )
            for name in ("east", "west")
        }
        path = tmp / "site.toml"
        path.write_text(
            site_text({n: r.settings for n, r in regions.items()}, name="gcp-requests"),
            encoding="utf-8",
        )
        regions["east"].gce.seed_instance(
            "vcu-1", disks=[disk_data(size, seed)], labels={"backup": "1-7"}
        )
        setup, _ = _open(path)
        with setup:
            setup_engine = Engine(setup)
            for region in (A, B):
                setup_engine.repository(region)
            next(iter(setup.transit(A, B).inbox()), None)
            (instance,) = [i for i in setup.region(A).compute.list_instances() if i.name == "vcu-1"]
        site, provider = _open(path)
        now = datetime.now(UTC)
        with site:
            engine = Engine(site, clock=lambda: now)
            points: list[Any] = []
            for phase in PHASES:
                before = provider.metrics.snapshot()
                if phase.startswith("backup"):
                    points.append(engine.backup(instance.id, region=A))
                else:
                    engine.copy(points[-1].id, to=B)
                counts[phase] = provider.metrics.since(before)
            stats = engine.repository(A).load_manifest(points[0].id).stats
    return {
        "size": size,
        "stored": stats.get("bytes_stored"),
        "phases": {p: _split(u) for p, u in counts.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="disk data sizes in MiB")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    results = [run(size, args.seed) for size in sizes]
    for r in results:
        print(f"{r['size'] // MiB} MiB of disk data, {(r['stored'] or 0) / MiB:.1f} MiB stored:")
        for phase, c in r["phases"].items():
            print(
                f"  {phase}: {c['storage']} storage requests "
                f"({c['sent'] / MiB:.1f} MiB sent), {c['kms']} KMS calls {c['ops']}"
            )
    if len(results) >= 2:
        small, large = results[0], results[-1]
        span = (large["size"] - small["size"]) / GiB
        print("fitted (fixed per run + per GiB):")
        for phase in PHASES:
            for service in ("storage", "kms"):
                c1, c2 = small["phases"][phase][service], large["phases"][phase][service]
                per_gib = (c2 - c1) / span
                fixed = c1 - per_gib * small["size"] / GiB
                print(f"  {phase}, {service}: {fixed:.0f} + {per_gib:.0f} per GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
