"""The GCP provider's support for the conformance suite: a throwaway two-region site
(gcp:east replicating to gcp:west) whose vaults and inboxes are four buckets of one
gcp-storage-emulator it starts (emulator.py), whose keys are two Cloud KMS fakes
(fakes/kms.py: gRPC on 127.0.0.1, the unmodified KeyManagementServiceClient against them)
and whose compute is two Compute Engine fakes (fakes/compute.py: REST on 127.0.0.1, the
unmodified compute_v1 clients against them), one per region, all stopped at the end::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=gcp

Each region has a backup worker instance (``rv-worker``) whose attached disks appear as
files under the fake's device directory, as ``/dev/disk/by-id/google-*`` do on a GCE VM.
Test instances are made through the plain compute_v1 clients the way an operator would give
a disk its bytes on GCE: a blank disk attached to the worker, written through its device,
detached, then an instance booting from it (:meth:`GcpConformanceSupport.make_instance`).

The emulator drops object retention and holds, so the tests of their enforcement are skipped
offline with that reason (:attr:`known_limits`); it ignores ``ifGenerationMatch`` too, so it
runs behind the launcher's precondition front (``GcsEmulator(preconditions=True)``), which
applies Cloud Storage's rule for if-absent puts.

Live: with ``REGIONVAULT_GCP_LIVE=1`` the throwaway site is two real regions the environment
describes (testing.py); ``REGIONVAULT_GCP_SITE`` names a site file of real regions to use as
it is instead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.conformance.support import ConformanceSupport, tar_image
from regionvault.providers.gcp.testing import LIVE_ENV, LiveSettings, live_mode

if TYPE_CHECKING:
    from regionvault.core.site import Region
    from regionvault.core.types import Instance
    from regionvault.providers.gcp.fakes.compute import GceFake
    from regionvault.providers.gcp.fakes.kms import KmsFake

__all__ = [
    "LIVE_ENV",
    "PROJECT",
    "REGIONS",
    "WORKER",
    "GcpConformanceSupport",
    "OfflineRegion",
    "live_mode",
    "offline_region",
    "region_settings",
]

#: a site file of real regions that a live run uses as it is
SITE_ENV = "REGIONVAULT_GCP_SITE"
#: the test regions: site name -> (location, zone)
REGIONS = {
    "east": ("europe-west1", "europe-west1-b"),
    "west": ("us-central1", "us-central1-a"),
}
PROJECT = "rv-conformance"
#: each test region's backup worker instance
WORKER = "rv-worker"
#: the machine type of launches whose point records none of GCE's
MACHINE_TYPE = "e2-small"

#: what the emulator cannot show: GCS enforces these, gcp-storage-emulator stores them only
WORM_OFFLINE = (
    "gcp-storage-emulator drops object retention and holds (it neither stores nor enforces "
    "them); the requests the real client sends and GCS's documented refusals are tested in "
    "tests/gcp/test_gcp_storage.py, enforcement only live (REGIONVAULT_GCP_LIVE=1)"
)
WORM_TESTS = (
    "test_governance_retention_refuses_early_delete",
    "test_compliance_retention_refuses_delete_and_shortening",
    "test_legal_hold_refuses_delete_until_lifted",
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def region_settings(
    name: str, *, storage: str, kms: str, compute: str, device_dir: Path
) -> dict[str, Any]:
    """The settings of offline test region ``gcp:<name>``: its buckets in the emulator at
    ``storage``, its keys in the KMS fake at ``kms``, its compute in the Compute Engine fake
    at ``compute`` whose worker sees attached disks under ``device_dir``."""
    location, zone = REGIONS[name]
    return {
        "project": PROJECT,
        "location": location,
        "zone": zone,
        "credentials": "anonymous",
        "storage_endpoint": storage,
        "kms_endpoint": kms,
        "kms_plaintext": True,
        "compute_endpoint": compute,
        "create": True,
        "bucket": f"rv-{name}-vault",
        "inbox_bucket": f"rv-{name}-inbox",
        "object_retention": True,
        "worker_instance": WORKER,
        "device_dir": device_dir.as_posix(),
        "machine_type": MACHINE_TYPE,
        "poll_interval": 0.02,
        "operation_timeout": 120,
    }


def site_text(settings: Mapping[str, Mapping[str, Any]], *, name: str) -> str:
    """A site.toml of regions ``gcp:<name>`` with ``settings``, the first replicating to the
    second."""
    lines = [f'[site]\nname = "{name}"\n']
    for region, values in settings.items():
        lines.append(f'[regions."gcp:{region}"]')
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
        lines.append("")
    first, second = list(settings)[:2]
    lines.append(f'[[replication]]\nfrom = "gcp:{first}"\nto = "gcp:{second}"\n')
    return "\n".join(lines)


@dataclass
class OfflineRegion:
    """One offline GCP region: its settings (a site.toml region table) and its fakes."""

    name: str
    settings: dict[str, Any]
    kms: KmsFake
    gce: GceFake

    @property
    def buckets(self) -> tuple[str, str]:
        """(vault bucket, inbox bucket) of this region."""
        return str(self.settings["bucket"]), str(self.settings["inbox_bucket"])


@contextlib.contextmanager
def offline_region(
    name: str, *, storage: str, workdir: Path, tag: str = ""
) -> Iterator[OfflineRegion]:
    """Region ``gcp:<name>`` (a name of :data:`REGIONS`) offline: a Cloud KMS fake and a
    Compute Engine fake (with the backup worker :data:`WORKER`) of its own, its buckets in
    the emulator at ``storage`` (named with ``tag`` when given, so that one emulator serves
    many tests); the fakes stop on exit."""
    from regionvault.providers.gcp.fakes.compute import GceFake
    from regionvault.providers.gcp.fakes.kms import KmsFake

    _location, zone = REGIONS[name]
    with (
        KmsFake() as kms,
        GceFake(
            project=PROJECT, zone=zone, state_dir=workdir / name, worker_instance=WORKER
        ) as gce,
    ):
        # as on GCE, where udev makes an attached disk's link a moment after the attach
        gce.device_link_delay = 0.02
        settings = region_settings(
            name, storage=storage, kms=kms.address, compute=gce.endpoint, device_dir=gce.device_dir
        )
        if tag:
            settings["bucket"] = f"rv-{tag}-{name}"
            settings["inbox_bucket"] = f"rv-{tag}-{name}-inbox"
        yield OfflineRegion(f"gcp:{name}", settings, kms, gce)


class GcpConformanceSupport(ConformanceSupport):
    def __init__(self) -> None:
        self.known_limits: Mapping[str, str] = (
            {} if live_mode() else dict.fromkeys(WORM_TESTS, WORM_OFFLINE)
        )

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        path = workdir / "site.toml"
        if live_mode():
            given = os.environ.get(SITE_ENV)
            if given:
                yield Path(given)
                return
            live = LiveSettings.from_environment()
            tag = uuid.uuid4().hex[:10]
            path.write_text(
                site_text(
                    {
                        n: live.region_settings(letter, tag=tag)
                        for letter, n in zip("AB", REGIONS, strict=True)
                    },
                    name="conformance-gcp-live",
                ),
                encoding="utf-8",
            )
            yield path
            return
        from regionvault.providers.gcp.emulator import GcsEmulator

        with contextlib.ExitStack() as stack:
            storage = stack.enter_context(GcsEmulator(preconditions=True))
            settings = {
                name: stack.enter_context(
                    offline_region(name, storage=storage.endpoint, workdir=workdir / "gce")
                ).settings
                for name in REGIONS
            }
            path.write_text(site_text(settings, name="conformance-gcp"), encoding="utf-8")
            yield path

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        """An instance named ``name`` with ``tags`` as labels, booting from a disk that holds
        ``data`` as a tar archive (each file's bytes contiguous), made through the plain
        compute_v1 clients, as on GCE: a blank disk attached to the region's worker, written
        through its device once udev has made the link, detached, then the instance; the disk
        is removed if a step fails (fakes/compute.py, ``seed_instance_over_api``)."""
        from regionvault.providers.gcp.auth import credentials_for
        from regionvault.providers.gcp.compute import GceCompute
        from regionvault.providers.gcp.fakes.compute import seed_instance_over_api

        compute = region.compute
        if not isinstance(compute, GceCompute):
            return super().make_instance(region, name, data=data, tags=tags, workdir=workdir)
        settings = compute.settings
        seed_instance_over_api(
            endpoint=settings.compute_endpoint,
            project=settings.project,
            zone=settings.zone or "",
            worker_instance=settings.worker_instance or WORKER,
            device_dir=Path(settings.device_dir),
            name=name,
            disks=[tar_image(data)],
            labels=dict(tags),
            machine_type=MACHINE_TYPE,
            credentials=credentials_for(compute.region_config, settings, "compute"),
            poll_interval=settings.poll_interval,
        )
        for instance in compute.list_instances(tag_filters=dict(tags)):
            if instance.name == name:
                return instance
        raise AssertionError(f"the instance {name} made for the test is not listed by its labels")
