"""What the Azure provider's KeyService asks of Key Vault per GiB: the calls a backup, an
unchanged re-backup and a restore make, counted by the fake Key Vault
(regionvault.providers.azure.fakes.keyvault, started here on 127.0.0.1 and stopped at the
end), with the repository on an in-memory vault. Not a test: call counts, not times.

    .venv/bin/python benchmarks/azure_keyvault_calls.py [--sizes 64,256] [--seed 1]

Each phase runs with a fresh KeyService (a new process's view: its first keys/get is
counted) and a fresh login. The disk is random bytes in 4 MiB extents with holes between.
Also printed: the mean time of one unwrap (one keys/unwrapKey over HTTPS) against the fake.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regionvault.core import (
    BlockCapture,
    BlockSink,
    Capabilities,
    Instance,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Vault,
)
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.azure.fakes.keyvault import FakeKeyVault
from regionvault.providers.azure.identity import CredentialSource
from regionvault.providers.azure.keyvault import AzureKeyService

MiB = 1024 * 1024
INSTANCE = Instance(id="vm-bench", name="bench", region="azure:east")


class MemoryVault(Vault):
    def __init__(self) -> None:
        super().__init__(provider="memory", region="azure:east", capabilities=Capabilities())
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @property
    def vault_id(self) -> str:
        return "bench-vault"

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        with self._lock:
            if if_absent and name in self._objects:
                raise ObjectExists(name)
            self._objects[name] = bytes(data)
        return self.head(name)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            if name not in self._objects:
                raise ObjectNotFound(name)
            data = self._objects[name]
        return data[offset:] if length is None else data[offset : offset + length]

    def head(self, name: str) -> ObjectInfo:
        with self._lock:
            if name not in self._objects:
                raise ObjectNotFound(name)
            return ObjectInfo(name=name, size=len(self._objects[name]), modified=datetime.now(UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            names = sorted(n for n in self._objects if n.startswith(prefix))
        for name in names:
            yield self.head(name)

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        with self._lock:
            self._objects.pop(name, None)


class Disk(BlockCapture):
    def __init__(self, size: int, seed: int) -> None:
        super().__init__(INSTANCE, datetime.now(UTC), size=size, block_size=4096)
        self.seed = seed

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        rng = random.Random(self.seed)
        for offset in range(0, self.size, 8 * MiB):  # 4 MiB written, 4 MiB hole
            yield offset, rng.randbytes(4 * MiB)


class NullSink(BlockSink):
    def write(self, offset: int, data: bytes) -> None:
        pass

    def commit(self) -> None:
        pass


def run(fake: FakeKeyVault, size_mib: int, seed: int, base: Path) -> dict[str, dict[str, int]]:
    settings: dict[str, Any] = fake.region_settings(key_name=f"bench-{size_mib}")
    region = RegionConfig(
        id=RegionId("azure", "east"),
        settings=settings,
        services={s: ServiceConfig("azure", settings) for s in ("compute", "keys", "vault")},
        base_dir=base,
    )
    vault = MemoryVault()
    counts: dict[str, dict[str, int]] = {}

    def phase(name: str, work: Any) -> None:
        credentials = CredentialSource()
        keys = AzureKeyService(region=region, credentials=credentials, capabilities=Capabilities())
        before = len(fake.requests)
        try:
            work(keys)
        finally:
            keys.close()
            credentials.close()
        seen = collections.Counter(r.operation for r in fake.requests[before:])
        counts[name] = dict(sorted(seen.items()))

    def open_repo(keys: AzureKeyService) -> Repository:
        return Repository.init_or_open(
            vault, keys, region="azure:east", settings=RepositorySettings(workers=2)
        )

    points: list[str] = []
    phase("backup", lambda k: points.append(open_repo(k).backup(Disk(size_mib * MiB, seed)).id))
    phase("backup again (unchanged)", lambda k: open_repo(k).backup(Disk(size_mib * MiB, seed)))
    phase("restore", lambda k: open_repo(k).restore(points[0], NullSink(size_mib * MiB, 4096)))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="disk sizes in MiB")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeKeyVault(Path(tmp) / "kv") as fake:
        for size in (int(s) for s in args.sizes.split(",")):
            for phase, seen in run(fake, size, args.seed, Path(tmp)).items():
                calls = {k: v for k, v in seen.items() if k.startswith("keys/")}
                logins = {k: v for k, v in seen.items() if not k.startswith("keys/")}
                print(f"{size:5d} MiB  {phase:26s} key vault {calls}  login {logins}")
        # latency of one remote unwrap
        settings = fake.region_settings(key_name="bench-latency")
        region = RegionConfig(
            id=RegionId("azure", "east"),
            settings=settings,
            services={},
            base_dir=Path(tmp),
        )
        credentials = CredentialSource()
        keys = AzureKeyService(region=region, credentials=credentials, capabilities=Capabilities())
        context = {"vault": "v", "kind": "pack", "name": "n"}
        key = keys.generate_data_key(context)
        keys.unwrap(key.wrapped, context)
        rounds = 200
        start = time.perf_counter()
        for _ in range(rounds):
            keys.unwrap(key.wrapped, context)
        unwrap_ms = (time.perf_counter() - start) / rounds * 1000
        start = time.perf_counter()
        for _ in range(rounds):
            keys.generate_data_key(context)
        wrap_ms = (time.perf_counter() - start) / rounds * 1000
        print(
            f"unwrap (keys/unwrapKey over HTTPS, 3072-bit): {unwrap_ms:.2f} ms; "
            f"generate_data_key (local RSA-OAEP-256 wrap): {wrap_ms:.2f} ms"
        )
        keys.close()
        credentials.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
