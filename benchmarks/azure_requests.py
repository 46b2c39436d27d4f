"""What the Azure provider asks of Blob Storage per GiB: requests for a full backup, a copy to
another region, an unchanged re-backup and its copy, counted with ``AzureProvider.metrics``
against an Azurite this script starts (two storage accounts on 127.0.0.1, stopped by its PID
at the end). Not a test: request counts, not times.

    .venv/bin/python benchmarks/azure_requests.py [--sizes 64,256] [--seed 1]

Only Blob Storage is Azure's here: the regions' keys and compute are the local provider's,
so the instance is a directory of files (the same content mix as the AWS script's disk:
random, log text, half-zero and repeated data) and no Key Vault calls are counted (Key Vault
calls: azure_keyvault_calls.py; disk captures and restores: azure_compute_requests.py).
The site is azure:east replicating to azure:west with ``immutability = true`` (so deletes
list versions, as in a versioned account). Containers and repositories are made first by a
throwaway engine; the measured engine starts fresh. Two sizes separate the part
per run from the part per GiB: count = fixed + per_GiB x size.
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
from regionvault.providers.azure.azurite import AzuriteServer, environment
from regionvault.providers.azure.conformance import ACCOUNTS, key_variable, region_lines
from regionvault.providers.azure.metrics import Usage
from regionvault.providers.azure.provider import AzureProvider

MiB = 1024 * 1024
GiB = 1024 * MiB
A, B = "azure:east", "azure:west"
PHASES = ("backup", "copy", "backup again (unchanged)", "copy again")


def write_data(root: Path, size: int, seed: int) -> None:
    """``size`` bytes in 4 MiB files cycling through the AWS script's content kinds."""
    rng = random.Random(seed)
    block = 512 * 1024
    earlier: list[bytes] = []
    for n in range(size // (4 * MiB)):
        parts = []
        for index in range(8):
            kind = (n * 8 + index) % 8
            if kind in (0, 1, 2):
                data = rng.randbytes(block)
                earlier.append(data)
            elif kind in (3, 4):
                data = b"".join(
                    f"{n:05d}.{index} vcu[{rng.randrange(64)}]: ue {rng.getrandbits(40):010x} "
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
        (root / f"file-{n:04d}.bin").write_bytes(b"".join(parts))


def _open(path: Path) -> tuple[Site, AzureProvider]:
    pm = make_plugin_manager()
    registry = registry_from(pm)
    site = Site.load(path, registry=registry, plugin_manager=pm)
    provider = registry.get("azure")
    assert isinstance(provider, AzureProvider)
    return site, provider


def run(size: int, seed: int) -> dict[str, Any]:
    counts: dict[str, Usage] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rv-azure-requests-")))
        server = stack.enter_context(AzuriteServer(dict.fromkeys(ACCOUNTS), workdir=tmp / "az"))
        stack.enter_context(environment({key_variable(a): server.accounts[a] for a in ACCOUNTS}))
        lines = ['[site]\nname = "azure-requests"\n']
        for account in ACCOUNTS:
            lines.extend(region_lines(account, server.account_url(account), tmp))
        lines.append(f'[[replication]]\nfrom = "{A}"\nto = "{B}"\n')
        path = tmp / "site.toml"
        path.write_text("\n".join(lines), encoding="utf-8")
        data = tmp / "instance"
        data.mkdir()
        write_data(data, size, seed)
        setup, _ = _open(path)
        with setup:
            setup_engine = Engine(setup)
            for region in (A, B):
                setup_engine.repository(region)
            next(iter(setup.transit(A, B).inbox()), None)
            instance = setup.region(A).compute.register_instance("vcu-1", data)
        site, provider = _open(path)
        now = datetime.now(UTC)
        with site:
            engine = Engine(site, clock=lambda: now)
            steps = (
                lambda: engine.backup(instance.id, region=A),
                None,
                lambda: engine.backup(instance.id, region=A),
                None,
            )
            points: list[Any] = []
            for phase, step in zip(PHASES, steps, strict=True):
                before = provider.metrics.snapshot()
                if step is not None:
                    points.append(step())
                else:
                    engine.copy(points[-1].id, to=B)
                counts[phase] = provider.metrics.since(before)
            stats = engine.repository(A).load_manifest(points[0].id).stats
    return {
        "size": size,
        "stored": stats.get("bytes_stored"),
        "phases": {p: (u.count(), u.by_operation()) for p, u in counts.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="instance sizes in MiB")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    results = [run(size, args.seed) for size in sizes]
    for r in results:
        print(f"{r['size'] // MiB} MiB instance, {(r['stored'] or 0) / MiB:.1f} MiB stored:")
        for phase, (count, ops) in r["phases"].items():
            print(f"  {phase}: {count} requests {ops}")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        span = (large["size"] - small["size"]) / GiB
        print("fitted (fixed per run + per GiB):")
        for phase in PHASES:
            c1, c2 = small["phases"][phase][0], large["phases"][phase][0]
            per_gib = (c2 - c1) / span
            fixed = c1 - per_gib * small["size"] / GiB
            print(f"  {phase}: {fixed:.0f} + {per_gib:.0f} per GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
