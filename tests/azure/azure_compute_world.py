"""The offline stack of the Azure Compute tests: Azurite (the real blob server disk bytes travel
through; the provider's launcher), the ARM fake in front of it (HTTPS, the shared local CA),
the unmodified ``ClientSecretCredential`` logging in at the fake's tenant, and the unmodified
``ComputeManagementClient``.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from regionvault.core.types import Instance
from regionvault.providers.azure.azurite import AzuriteServer, new_account_key
from regionvault.providers.azure.compute import (
    NAME_TAG,
    AzureCompute,
    AzureComputeSettings,
    MiB,
    compute_client,
)
from regionvault.providers.azure.fakes.arm import ArmFake, seed_disk, seed_vm

RESOURCE_GROUP = "rv-test"
LOCATION = "eastus"
ACCOUNT = "armdisks"


@contextlib.contextmanager
def azurite(workdir: Path) -> Iterator[tuple[AzuriteServer, str, str]]:
    """An Azurite of one account (the provider's launcher): yields (server, account, key)."""
    key = new_account_key()
    with AzuriteServer({ACCOUNT: key}, log=workdir / "azurite.log", workdir=workdir) as server:
        yield server, ACCOUNT, key


def tar_image(data: Mapping[str, bytes]) -> bytes:
    """A disk image in which each file's bytes lie contiguous (a tar archive), whole MiB."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(data.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    image = out.getvalue()
    return image + bytes(-len(image) % MiB)


class ArmWorld:
    """One region's offline Azure compute: the fake, a logged-in client, an AzureCompute."""

    def __init__(self, fake: ArmFake, blob_endpoint: str, *, region: str = "azure:east") -> None:
        self.fake = fake
        self.blob_endpoint = blob_endpoint
        self.region = region
        self.credential = ClientSecretCredential(
            fake.tenant,
            fake.client_id,
            fake.client_secret,
            authority=fake.endpoint,
            disable_instance_discovery=True,
            connection_verify=str(fake.ca_path),
        )
        self.settings = AzureComputeSettings(
            subscription_id=fake.subscription,
            resource_group=RESOURCE_GROUP,
            location=LOCATION,
            arm_endpoint=fake.endpoint,
            ca_bundle=str(fake.ca_path),
            vm_size="Standard_B1s",
        )
        self.client: ComputeManagementClient = compute_client(
            self.settings,
            self.credential,
            retry_total=2,
            retry_backoff_factor=0.01,
            polling_interval=0,
        )
        self._computes: list[AzureCompute] = []

    def compute(self, **kwargs: Any) -> AzureCompute:
        settings = kwargs.pop("settings", self.settings)
        client = compute_client(
            settings, self.credential, retry_total=2, retry_backoff_factor=0.01, polling_interval=0
        )
        compute = AzureCompute(region=self.region, settings=settings, client=client, **kwargs)
        self._computes.append(compute)
        return compute

    def close(self) -> None:
        for compute in self._computes:
            compute.close()
        self.client.close()
        self.credential.close()

    # ------------------------------------------------------------------ seeding, raw SDK

    def seed_disk(
        self, name: str, image: bytes | Mapping[int, bytes], *, size: int | None = None
    ) -> str:
        """An upload disk holding ``image``, made with the plain SDK; its resource id."""
        pieces = image if isinstance(image, bytes) else dict(image)
        return seed_disk(self.client, RESOURCE_GROUP, LOCATION, name, pieces, size=size)

    def seed_vm(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        image: bytes | Mapping[int, bytes] = b"",
        vm_size: str = "Standard_D2s_v5",
        data_disks: Sequence[bytes | Mapping[int, bytes]] = (),
    ) -> str:
        """A VM whose OS disk holds ``image`` and whose data disks (LUN 0, 1, ...) hold
        ``data_disks``; returns its resource id."""
        pieces = image if isinstance(image, bytes) else dict(image)
        return seed_vm(
            self.client,
            RESOURCE_GROUP,
            LOCATION,
            name,
            tags=dict(tags or {}),
            image=pieces,
            vm_size=vm_size,
            data_disks=[d if isinstance(d, bytes) else dict(d) for d in data_disks],
        )

    def disk_bytes(self, disk_id: str, length: int) -> bytes:
        """The first ``length`` bytes of a disk, read beside the provider (account key)."""
        blob = self.fake.blob_client(disk_id)
        return bytes(blob.download_blob(offset=0, length=length).readall())


def instance_named(instances: list[Instance], name: str) -> Instance:
    return next(i for i in instances if i.name == name or i.extra.get("vm_name") == name)


__all__ = [
    "ACCOUNT",
    "LOCATION",
    "NAME_TAG",
    "RESOURCE_GROUP",
    "ArmWorld",
    "azurite",
    "instance_named",
    "tar_image",
]
