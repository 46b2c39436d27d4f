"""What a Cloud KMS test sees: two KMS fakes (regions east and west, each its own gRPC
server on 127.0.0.1), region configs whose key ring is unique to the test, and KeyServices
and Sealers built by a fresh GcpProvider (imported by tests/gcp/test_gcp_kms.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from regionvault.core.config import SERVICES
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.gcp.fakes.kms import KmsFake
from regionvault.providers.gcp.kms import GcpKeyService, GcpSealer
from regionvault.providers.gcp.provider import GcpProvider

EAST = "east"
WEST = "west"
PROJECT = "rv-kms-test"
LOCATIONS = {EAST: "europe-west1", WEST: "us-east1"}


def two_fakes() -> Iterator[dict[str, KmsFake]]:
    """One KMS fake per region (a module fixture's body: each test has its own key ring)."""
    with KmsFake() as east, KmsFake() as west:
        yield {EAST: east, WEST: west}


def region_config(settings: Mapping[str, Any], name: str, base_dir: Path) -> RegionConfig:
    return RegionConfig(
        id=RegionId("gcp", name),
        settings=dict(settings),
        services={svc: ServiceConfig("gcp", dict(settings)) for svc in SERVICES},
        base_dir=base_dir,
        source="test-site.toml",
    )


class KmsWorld:
    """One test's regions on the fakes. Keys are made on first use (``create = true``) in a
    key ring named for the test; the SDK does not retry (``sdk_retries = 0``) unless a test
    says so. Every KeyService and Sealer made is closed after the test, and the fakes' faults and
    restrictions are cleared."""

    def __init__(self, fakes: dict[str, KmsFake], base_dir: Path) -> None:
        self.fakes = fakes
        self.base_dir = base_dir
        self.key_ring = f"rv-{uuid.uuid4().hex[:12]}"
        self.provider = GcpProvider()
        self._services: list[GcpKeyService] = []
        self._sealers: list[GcpSealer] = []

    def settings(self, name: str, **extra: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "project": PROJECT,
            "location": LOCATIONS[name],
            "credentials": "anonymous",
            "kms_endpoint": self.fakes[name].address,
            "kms_plaintext": True,
            "create": True,
            "key_ring": self.key_ring,
            "sdk_retries": 0,
            "poll_interval": 0.01,
            "timeout": 10,
        }
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, name: str, **extra: Any) -> RegionConfig:
        return region_config(self.settings(name, **extra), name, self.base_dir)

    def keys(self, name: str, **extra: Any) -> GcpKeyService:
        service = self.provider.key_service(self.region(name, **extra))
        self._services.append(service)
        return service

    def sealer(self, name: str, **extra: Any) -> GcpSealer:
        sealer = self.provider.sealer(self.region(name, **extra))
        self._sealers.append(sealer)
        return sealer

    def key_path(self, name: str, key: str = "regionvault") -> str:
        return (
            f"projects/{PROJECT}/locations/{LOCATIONS[name]}/keyRings/{self.key_ring}"
            f"/cryptoKeys/{key}"
        )

    def close(self) -> None:
        for fake in self.fakes.values():
            fake.clear()
        for service in self._services:
            service.close()
        for sealer in self._sealers:
            sealer.close()


def world_on(fakes: dict[str, KmsFake], base_dir: Path) -> Iterator[KmsWorld]:
    """A test's world on ``fakes``, closed after it (a fixture's body)."""
    world = KmsWorld(fakes, base_dir)
    try:
        yield world
    finally:
        world.close()


class LiveKmsWorld(KmsWorld):
    """The same regions on real Cloud KMS (``REGIONVAULT_GCP_LIVE=1``, see
    providers/gcp/testing.py): the live key ring of each location and its two keys
    ``regionvault-conformance`` and ``-seal``, made on first use and kept (GCP never deletes
    a key; every rotation test adds a version of each)."""

    def __init__(self, live: Any, base_dir: Path) -> None:
        super().__init__({}, base_dir)
        self.live = live
        self.key_ring = live.region("A").key_ring

    def settings(self, name: str, **extra: Any) -> dict[str, Any]:
        letter = "A" if name == EAST else "B"
        full = self.live.region_settings(letter, tag="kms")
        settings = {
            key: full[key]
            for key in (
                "project",
                "location",
                "key_ring",
                "key_name",
                "seal_key_name",
                "create",
                "credentials",
                "credentials_file",
            )
            if key in full
        }
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}


_SEAL_SCRIPT = """
import json, sys
from pathlib import Path
from regionvault.core.config import SERVICES
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.gcp.provider import GcpProvider
settings, name, secret, context = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
region = RegionConfig(id=RegionId("gcp", name), settings=settings,
                      services={s: ServiceConfig("gcp", settings) for s in SERVICES},
                      base_dir=Path("."), source="another-process")
sealer = GcpProvider().sealer(region)
print(sealer.seal(bytes.fromhex(secret), json.loads(context)).hex())
"""


def seal_in_another_process(
    settings: Mapping[str, Any], name: str, secret: bytes, context: Mapping[str, str]
) -> bytes:
    """Seal in a separate Python process that has only the region's settings, through
    ``GcpProvider.sealer``, as another region's backup service would."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SEAL_SCRIPT,
            json.dumps(dict(settings)),
            name,
            secret.hex(),
            json.dumps(dict(context)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return bytes.fromhex(result.stdout.strip())
