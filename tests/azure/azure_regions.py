"""Whole Azure regions for the end-to-end tests (imported by tests/azure): each region's vault
and inbox are containers of one storage account of the session's Azurite, its keys a fake Key
Vault (its own tenant and CA) and its compute an ARM fake over the same account that shares
the Key Vault fake's tenant and CA, as the provider's conformance support builds them
(providers/azure/conformance.py), but with containers unique to the test so that the
session's Azurite can be shared.

Also here: what the tests record while the pipeline runs (every plaintext key the provider
handles, every inbox payload before the destination discards it), the wrapped keys a vault
object carries (docs/format.md), and a scan of every blob of a test's containers.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import at_rest
import pytest
from at_rest import (
    InboxObject,
    Recorded,
    WrappedKey,
    leaks,
    open_inbox_object,
    payload_kind,
    wrapped_keys,
)
from azure.storage.blob import BlobServiceClient
from azure_compute_world import LOCATION, RESOURCE_GROUP, ArmWorld
from regionvault.providers.azure.azurite import AzuriteServer
from regionvault.providers.azure.conformance import key_variable
from regionvault.providers.azure.fakes.arm import ArmFake
from regionvault.providers.azure.fakes.keyvault import FakeKeyVault, fake_key_vaults
from regionvault.providers.azure.keyvault import AzureKeyService, AzureSealer
from regionvault.providers.azure.transit import AzureTransit

#: the VM size a launch takes when neither its spec nor its point names one: never the test
#: VMs' own, so a launch "of the original's size" shows it came from the point
DEFAULT_VM_SIZE = "Standard_B1s"
KEY_NAME = "regionvault"


@dataclass
class AzureRegion:
    """One offline Azure region of a test: its name, settings (a site.toml region table),
    its fakes and a plain-SDK view of its compute (:class:`ArmWorld`) for seeding VMs and
    reading disks beside the provider."""

    name: str
    account: str
    settings: dict[str, Any]
    key_vault: FakeKeyVault
    arm: ArmFake
    world: ArmWorld

    @property
    def containers(self) -> tuple[str, str]:
        """(vault container, inbox container) of this region."""
        return str(self.settings["container"]), str(self.settings["inbox_container"])


@contextlib.contextmanager
def azure_regions(
    server: AzuriteServer, workdir: Path, accounts: Sequence[str]
) -> Iterator[dict[str, AzureRegion]]:
    """One :class:`AzureRegion` per account of ``server`` (``azure:<account>``), keyed by
    region name; the fakes are stopped on exit. The accounts' keys must be in the
    environment under :func:`key_variable` (the ``azure`` fixture puts them there)."""
    tag = uuid.uuid4().hex[:10]
    with contextlib.ExitStack() as stack:
        vaults = stack.enter_context(fake_key_vaults(workdir / "keyvault", accounts))
        regions: dict[str, AzureRegion] = {}
        for account in accounts:
            vault = vaults[account]
            url = server.account_url(account)
            arm = stack.enter_context(
                ArmFake(
                    blob_endpoint=url,
                    account=account,
                    account_key=server.accounts[account],
                    workdir=workdir / "arm" / account,
                    container=f"arm-{tag}",
                    tenant=vault.tenant,
                    ca=vault.ca,
                )
            )
            world = ArmWorld(arm, url, region=f"azure:{account}")
            stack.callback(world.close)
            settings: dict[str, Any] = {
                "account_url": url,
                "account_key_env": key_variable(account),
                "container": f"rv-{tag}",
                "inbox_container": f"rv-{tag}-inbox",
                "create": True,
                **vault.region_settings(key_name=KEY_NAME),
                "subscription_id": arm.subscription,
                "resource_group": RESOURCE_GROUP,
                "location": LOCATION,
                "arm_endpoint": arm.endpoint,
                "vm_size": DEFAULT_VM_SIZE,
                # the fake answers Retry-After: 0, which the SDK takes as "none given"
                "poll_interval": 0,
            }
            name = f"azure:{account}"
            regions[name] = AzureRegion(name, account, settings, vault, arm, world)
        yield regions


# --------------------------------------------------------------------------- recording


def record(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    """Wrap the Azure KeyService, Sealer and Transit for the test so that what they handle
    is recorded (tests/at_rest.py)."""

    def read_inbox(transit: AzureTransit, name: str) -> tuple[str, bytes]:
        return transit.container_name, transit._ready_recv().get(transit._key(name), name)

    return at_rest.record(
        monkeypatch,
        keys=AzureKeyService,
        sealer=AzureSealer,
        transit=AzureTransit,
        read_inbox=read_inbox,
    )


#: the Azure KeyService's envelope (providers/azure/keyvault.py): magic, key version
_AZURE_MAGIC = b"RVAZK1"


def key_version(wrapped: WrappedKey) -> str:
    """The Key Vault key version the Azure envelope of ``wrapped`` names."""
    data = wrapped.wrapped
    assert data.startswith(_AZURE_MAGIC), f"{wrapped.object_name}: not an Azure wrap"
    n = data[len(_AZURE_MAGIC)]
    return data[len(_AZURE_MAGIC) + 1 : len(_AZURE_MAGIC) + 1 + n].decode("ascii")


def rsa_wrapped(wrapped: WrappedKey) -> bytes:
    """The RSA-OAEP-256 part of ``wrapped``: what Key Vault's unwrapKey is asked to open."""
    data = wrapped.wrapped
    at = len(_AZURE_MAGIC) + 1 + data[len(_AZURE_MAGIC)]
    (m,) = struct.unpack_from(">H", data, at)
    return data[at + 2 : at + 2 + m]


# --------------------------------------------------------------------------- blobs


def every_blob(server: AzuriteServer, account: str, containers: Sequence[str]) -> dict[str, bytes]:
    """``<account>/<container>/<blob>`` -> bytes of every blob (and blob snapshot) in
    ``containers`` of ``account``, read with the account key beside the provider."""
    out: dict[str, bytes] = {}
    service = BlobServiceClient(
        server.account_url(account),
        credential={"account_name": account, "account_key": server.accounts[account]},
    )
    with service:
        for container in containers:
            client = service.get_container_client(container)
            for blob in client.list_blobs(include=["snapshots"]):
                reader = client.get_blob_client(blob.name, snapshot=blob.snapshot)
                where = f"{account}/{container}/{blob.name}"
                if blob.snapshot:
                    where += f"@{blob.snapshot}"
                out[where] = bytes(reader.download_blob().readall())
    return out


def containers_of(server: AzuriteServer, account: str, fragment: str) -> set[str]:
    """The names of ``account``'s containers that contain ``fragment``."""
    service = BlobServiceClient(
        server.account_url(account),
        credential={"account_name": account, "account_key": server.accounts[account]},
    )
    with service:
        return {c.name for c in service.list_containers(name_starts_with="") if fragment in c.name}


__all__ = [
    "DEFAULT_VM_SIZE",
    "RESOURCE_GROUP",
    "AzureRegion",
    "InboxObject",
    "Recorded",
    "WrappedKey",
    "azure_regions",
    "containers_of",
    "every_blob",
    "key_version",
    "leaks",
    "open_inbox_object",
    "payload_kind",
    "record",
    "rsa_wrapped",
    "wrapped_keys",
]
