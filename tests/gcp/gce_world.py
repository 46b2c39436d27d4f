"""The offline stack of the GCE compute tests: the Compute Engine REST fake
(providers/gcp/fakes/compute.py, plain HTTP on 127.0.0.1, disk bytes as sparse files, the
backup worker's devices as symlinks) and the provider's own GceCompute built the way a site
builds it (``GcpProvider.compute``: anonymous login, allowed only because the endpoint is on
the loopback), over the unmodified google-cloud-compute REST clients.

Not a conftest (tests/gcp has none of its own): test modules import :func:`gce_world` and
wrap it in a fixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from regionvault.core.conformance.support import ConformanceSupport, tar_image
from regionvault.core.interfaces import BlockSink
from regionvault.core.types import (
    CaptureKind,
    Instance,
    LaunchSpec,
    RegionConfig,
    RegionId,
    ServiceConfig,
    Tags,
)
from regionvault.providers.gcp.compute import GceCompute
from regionvault.providers.gcp.fakes.compute import GceFake
from regionvault.providers.gcp.provider import GcpProvider

__all__ = [
    "PROJECT",
    "REGION",
    "WORKER",
    "ZONE",
    "GceWorld",
    "LaunchingSupport",
    "SeedingSupport",
    "gce_world",
    "tar_image",
]

PROJECT = "rv-test-project"
ZONE = "europe-west1-b"
WORKER = "rv-worker"
REGION = "gcp:east"


class GceWorld:
    """One region's offline Compute Engine: the fake and the computes made over it."""

    def __init__(self, fake: GceFake, base_dir: Path) -> None:
        self.fake = fake
        self.base_dir = base_dir
        self.provider = GcpProvider()
        self._computes: list[GceCompute] = []

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """site.toml settings of the test region (``overrides`` win; None removes a key)."""
        settings: dict[str, Any] = {
            # project, location, zone, no login, the endpoint, the worker and its devices
            **self.fake.compute_settings(),
            "poll_interval": 0.01,
            "operation_timeout": 60,
            "timeout": 10,
            "sdk_retries": 2,
        }
        settings.update(overrides)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, **overrides: Any) -> RegionConfig:
        settings = self.settings(**overrides)
        return RegionConfig(
            id=RegionId.parse(REGION),
            settings=settings,
            services={s: ServiceConfig("gcp", settings) for s in ("compute", "keys", "vault")},
            base_dir=self.base_dir,
            source="site.toml",
        )

    def compute(self, **overrides: Any) -> GceCompute:
        """A GceCompute as a site builds it (``GcpProvider.compute``), closed with the world."""
        compute = self.provider.compute(self.region(**overrides))
        compute.retry_pause = 0.0
        self._computes.append(compute)
        return compute

    def seed(
        self,
        name: str,
        *,
        disks: Sequence[bytes | dict[int, bytes]] = (b"",),
        labels: Mapping[str, str] | None = None,
        machine_type: str = "e2-standard-2",
    ) -> str:
        """A running instance of the fake (not through the API); its id (its name)."""
        self.fake.seed_instance(
            name, disks=list(disks), labels=dict(labels or {}), machine_type=machine_type
        )
        return name

    def disk_bytes(self, disk: str, length: int, offset: int = 0) -> bytes:
        """Bytes of a disk, read beside the provider (the fake's file)."""
        with self.fake.disk_path(disk).open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def worker_devices(self) -> list[str]:
        """The worker's device links (``google-*``) now present, its boot disk's included."""
        return sorted(p.name for p in self.fake.device_dir.iterdir())

    def leftovers(self) -> dict[str, list[str]]:
        """What the provider made and did not remove: snapshots, disks other than the
        instances' own (``<instance>-<i>``), the worker's extra disks and devices."""
        instances = set(self.fake.instance_names())
        worker_disks = self.fake.instance(WORKER)["disks"]
        own = {f"google-{worker_disks[0]['deviceName']}"}  # the worker's boot disk
        return {
            "snapshots": self.fake.snapshot_names(),
            "disks": [d for d in self.fake.disk_names() if d.rpartition("-")[0] not in instances],
            "worker disks": [str(d["deviceName"]) for d in self.fake.instance(WORKER)["disks"][1:]],
            "devices": [d for d in self.worker_devices() if d not in own],
        }

    def close(self) -> None:
        for compute in self._computes:
            compute.close()


@contextlib.contextmanager
def gce_world(workdir: Path, **fake_options: Any) -> Iterator[GceWorld]:
    """A started fake of project :data:`PROJECT`, zone :data:`ZONE` (state under
    ``workdir``) with its worker :data:`WORKER`; stopped at the end."""
    fake = GceFake(
        project=PROJECT,
        zone=ZONE,
        state_dir=workdir / "gce",
        worker_instance=WORKER,
        **fake_options,
    )
    with fake:
        world = GceWorld(fake, workdir)
        try:
            yield world
        finally:
            world.close()


class SeedingSupport(ConformanceSupport):
    """Test instances for the Compute suite: an instance of the fake whose boot disk holds
    the test data as a tar archive, seeded beside the API."""

    def __init__(self, world: GceWorld, compute: GceCompute) -> None:
        self.world = world
        self.compute = compute

    def make_instance(
        self,
        region: Any,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        self.world.seed(name, disks=[tar_image(data)], labels=tags)
        return self.compute.get_instance(name)

    def remove_instance(self, region: Any, instance: Instance) -> None:
        self.compute.terminate(instance.id)


class LaunchingSupport(SeedingSupport):
    """Test instances made through the API alone, as a conformance run whose fake is another
    process must make them: a restore of the tar image into a blank disk through the backup
    worker, then a launch from it (GceCompute's own open_restore_sink and launch)."""

    def make_instance(
        self,
        region: Any,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        image = tar_image(data)
        spec = LaunchSpec(name=name, tags=Tags(tags))
        sink = self.compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(image))
        assert isinstance(sink, BlockSink)
        try:
            for offset in range(0, len(image), sink.block_size):
                sink.write(offset, image[offset : offset + sink.block_size])
            sink.commit()
            return self.compute.launch(spec, sink)
        except BaseException:
            sink.discard()
            raise
