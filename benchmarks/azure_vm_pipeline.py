"""What a backup and a copy of an Azure VM ask of Azure per GiB, with every service Azure's:
Blob Storage requests (the vault and inbox containers, and the disk and snapshot page blobs
read and written through SAS URLs), Key Vault calls and ARM requests, for a VM backed up in
azure:east, its point copied to azure:west, backed up again unchanged and copied again.

    .venv/bin/python benchmarks/azure_vm_pipeline.py [--sizes 64,256] [--seed 1]

Offline: Azurite (two accounts, started by the provider's launcher and stopped by its PID),
one fake Key Vault and one ARM fake per region (tests/azure/azure_regions.py, as the
end-to-end test builds them), all on 127.0.0.1. Not a test: request counts, not times.
Key Vault calls are counted by each region's fake, ARM requests by each ARM fake, blob
requests by the provider's metrics (the Compute's SAS clients are given the same counting
hook here). The disk is written in 1 MiB pieces cycling through random, log text, a hole,
half zeros and a repeat of an earlier piece. Containers, repositories and the inbox are
made first by a throwaway engine; the measured engine starts fresh. Two sizes separate the
part per run from the part per GiB: count = fixed + per_GiB x size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "azure"))

import tomli_w
from azure_regions import azure_regions
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.azure.azurite import AzuriteServer, environment
from regionvault.providers.azure.compute import AzureCompute
from regionvault.providers.azure.conformance import key_variable
from regionvault.providers.azure.provider import AzureProvider

MiB = 1024 * 1024
GiB = 1024 * MiB
ACCOUNTS = ("east", "west")
A, B = "azure:east", "azure:west"
PHASES = ("backup", "copy", "backup again (unchanged)", "copy again")
KINDS = ("blob", "disk blob", "key vault", "arm")


def disk_pieces(size: int, seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    pieces: dict[int, bytes] = {}
    earlier: list[bytes] = []
    for n in range(size // MiB):
        kind = n % 6
        if kind in (0, 1):
            data = rng.randbytes(MiB)
            earlier.append(data)
        elif kind == 2:
            data = b"".join(
                f"{n:05d} vcu[{rng.randrange(64)}]: ue {rng.getrandbits(40):010x} handover "
                f"cell {rng.randrange(4096)}\n".encode()
                for _ in range(MiB // 40)
            )[:MiB]
        elif kind == 3:
            continue
        elif kind == 4:
            data = rng.randbytes(MiB // 2) + bytes(MiB // 2)
        else:
            data = earlier[rng.randrange(len(earlier))]
        pieces[n * MiB] = data
    return pieces


def _arm_operation(path: str) -> str:
    """``snapshots``, ``snapshots/beginGetAccess``, ``operations``, ...: the resource type of
    an ARM path and the action it names, without names and ids."""
    parts = path.rstrip("/").split("/")
    lower = [p.lower() for p in parts]
    at = lower.index("microsoft.compute") + 1 if "microsoft.compute" in lower else 0
    rest = parts[at:]
    if rest[:1] == ["locations"]:
        return rest[2] if len(rest) > 2 else "locations"
    return "/".join(rest[0:1] + rest[2:3])


def _open(path: Path) -> tuple[Site, AzureProvider]:
    pm = make_plugin_manager()
    registry = registry_from(pm)
    site = Site.load(path, registry=registry, plugin_manager=pm)
    provider = registry.get("azure")
    assert isinstance(provider, AzureProvider)
    return site, provider


def run(size: int, seed: int) -> dict[str, Any]:
    counts: dict[str, dict[str, collections.Counter[str]]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rv-azure-vm-")))
        server = stack.enter_context(AzuriteServer(dict.fromkeys(ACCOUNTS), workdir=tmp / "az"))
        stack.enter_context(environment({key_variable(a): server.accounts[a] for a in ACCOUNTS}))
        regions = stack.enter_context(azure_regions(server, tmp / "fakes", ACCOUNTS))
        vm = regions[A].world.seed_vm(
            "vcu-1", tags={"backup": "1-7"}, image=disk_pieces(size, seed)
        )
        doc = {
            "site": {"name": "azure-vm-pipeline", "state_dir": str(tmp / "state")},
            "regions": {name: region.settings for name, region in regions.items()},
            "replication": [{"from": A, "to": B}],
        }
        path = tmp / "site.toml"
        path.write_bytes(tomli_w.dumps(doc).encode())
        setup, _ = _open(path)
        with setup:
            setup_engine = Engine(setup)
            for name in (A, B):
                setup_engine.repository(name)
            next(iter(setup.transit(A, B).inbox()), None)
            next(iter(setup.transit(B, A).inbox()), None)
        site, provider = _open(path)
        now = datetime.now(UTC)
        with site:
            for name in (A, B):
                compute = site.region(name).compute
                assert isinstance(compute, AzureCompute)

                def hook(request: Any, region: str = name) -> None:
                    http = request.http_request
                    length = http.headers.get("Content-Length")
                    size = int(length) if length and length.isdigit() else 0
                    provider.metrics.record(f"{region} disks", http.method, http.url, size)

                compute.blob_client_kwargs["raw_request_hook"] = hook
            engine = Engine(site, clock=lambda: now)
            points: list[Any] = []
            for phase in PHASES:
                blobs = provider.metrics.snapshot()
                vaults = {n: len(r.key_vault.requests) for n, r in regions.items()}
                arms = {n: len(r.arm.requests) for n, r in regions.items()}
                if phase.startswith("backup"):
                    points.append(engine.backup(vm, region=A))
                else:
                    engine.copy(points[-1].id, to=B)
                used = provider.metrics.since(blobs)
                seen: dict[str, collections.Counter[str]] = {
                    k: collections.Counter() for k in KINDS
                }
                for (region, operation), n in used.requests.items():
                    kind = "disk blob" if region.endswith(" disks") else "blob"
                    seen[kind][f"{region.split(':')[1]} {operation}"] += n
                for n, r in regions.items():
                    for request in r.key_vault.requests[vaults[n] :]:
                        seen["key vault"][f"{n.split(':')[1]} {request.operation}"] += 1
                    for method, arm_path, _query in r.arm.requests[arms[n] :]:
                        seen["arm"][f"{n.split(':')[1]} {method} {_arm_operation(arm_path)}"] += 1
                counts[phase] = seen
            stats = engine.repository(A).load_manifest(points[0].id).stats
    return {"size": size, "stored": stats.get("bytes_stored"), "phases": counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="disk sizes in MiB")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results = [run(int(s) * MiB, args.seed) for s in args.sizes.split(",")]
    for r in results:
        print(f"{r['size'] // MiB} MiB disk, {(r['stored'] or 0) / MiB:.1f} MiB stored:")
        for phase, seen in r["phases"].items():
            print(f"  {phase}:")
            for kind in KINDS:
                print(f"    {kind}: {sum(seen[kind].values())} {dict(sorted(seen[kind].items()))}")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        span = (large["size"] - small["size"]) / GiB
        print("fitted (fixed per run + per GiB):")
        for phase in PHASES:
            parts = []
            for kind in KINDS:
                c1 = sum(small["phases"][phase][kind].values())
                c2 = sum(large["phases"][phase][kind].values())
                per_gib = (c2 - c1) / span
                fixed = c1 - per_gib * small["size"] / GiB
                parts.append(f"{kind} {fixed:.0f} + {per_gib:.0f}/GiB")
            print(f"  {phase}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
