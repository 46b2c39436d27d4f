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

import base64
import contextlib
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from azure_compute_world import LOCATION, RESOURCE_GROUP, ArmWorld
from regionvault.core.interfaces import KeyService, Vault
from regionvault.core.repository import open_payload
from regionvault.core.types import DataKey
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


@dataclass(frozen=True)
class InboxObject:
    """One payload as it lay in an inbox container just before its destination discarded
    it (a copy discards every payload it took in)."""

    container: str
    name: str
    source: str
    destination: str
    data: bytes


@dataclass
class Recorded:
    """Every plaintext key the Azure provider handed out, opened or sealed, by the region
    whose KeyService or Sealer handled it; and every inbox payload."""

    keys: dict[str, set[bytes]] = field(default_factory=dict)
    inbox: list[InboxObject] = field(default_factory=list)

    def add(self, region: str, key: bytes) -> None:
        self.keys.setdefault(region, set()).add(bytes(key))

    def every_key(self) -> set[bytes]:
        return set().union(*self.keys.values()) if self.keys else set()

    def needles(self) -> dict[str, bytes]:
        """Each key raw, in hex and in base64: none may be found at rest."""
        out: dict[str, bytes] = {}
        for n, key in enumerate(sorted(self.every_key())):
            out[f"key {n} (raw)"] = key
            out[f"key {n} (hex)"] = key.hex().encode()
            out[f"key {n} (base64)"] = base64.b64encode(key)
        return out


def record(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    """Wrap the Azure KeyService, Sealer and Transit for the test so that what they handle
    is recorded (:class:`Recorded`)."""
    recorded = Recorded()
    generate, unwrap = AzureKeyService.generate_data_key, AzureKeyService.unwrap
    seal, sealer_seal = AzureKeyService.seal, AzureSealer.seal
    discard = AzureTransit.discard

    def recording_generate(self: AzureKeyService, context: Any) -> DataKey:
        key = generate(self, context)
        recorded.add(self.region, key.plaintext)
        return key

    def recording_unwrap(self: AzureKeyService, wrapped: bytes, context: Any) -> bytes:
        plain = unwrap(self, wrapped, context)
        recorded.add(self.region, plain)
        return plain

    def recording_seal(self: AzureKeyService, secret: bytes, context: Any) -> bytes:
        recorded.add(self.region, secret)
        return seal(self, secret, context)

    def recording_sealer_seal(self: AzureSealer, secret: bytes, context: Any) -> bytes:
        recorded.add("sealer", secret)
        return sealer_seal(self, secret, context)

    def recording_discard(self: AzureTransit, name: str) -> None:
        data = self._ready_recv().get(self._key(name), name)
        recorded.inbox.append(
            InboxObject(self.container_name, name, self.source, self.region, data)
        )
        discard(self, name)

    monkeypatch.setattr(AzureKeyService, "generate_data_key", recording_generate)
    monkeypatch.setattr(AzureKeyService, "unwrap", recording_unwrap)
    monkeypatch.setattr(AzureKeyService, "seal", recording_seal)
    monkeypatch.setattr(AzureSealer, "seal", recording_sealer_seal)
    monkeypatch.setattr(AzureTransit, "discard", recording_discard)
    return recorded


def payload_kind(name: str) -> str:
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


def open_inbox_object(keys: KeyService, item: InboxObject) -> bytes:
    return open_payload(
        keys,
        item.name,
        item.data,
        kind=payload_kind(item.name),
        source=item.source,
        destination=item.destination,
    )


# --------------------------------------------------------------------------- vault objects

# docs/format.md sections 3 and 5: the cleartext headers of sealed objects and packs
_ENVELOPE = struct.Struct(">4sBBBB32s32sH")
_PACK = struct.Struct(">4sB3s16s32s32sH")
#: the Azure KeyService's envelope (providers/azure/keyvault.py): magic, key version
_AZURE_MAGIC = b"RVAZK1"


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped by a region's KeyService, as one vault object carries it, with the
    encryption context the format binds it to."""

    object_name: str
    wrapped: bytes
    context: dict[str, str]

    @property
    def key_version(self) -> str:
        """The Key Vault key version the Azure envelope names."""
        assert self.wrapped.startswith(_AZURE_MAGIC), f"{self.object_name}: not an Azure wrap"
        n = self.wrapped[len(_AZURE_MAGIC)]
        return self.wrapped[len(_AZURE_MAGIC) + 1 : len(_AZURE_MAGIC) + 1 + n].decode("ascii")

    @property
    def rsa_wrapped(self) -> bytes:
        """The RSA-OAEP-256 part: what Key Vault's unwrapKey is asked to open."""
        at = len(_AZURE_MAGIC) + 1 + self.wrapped[len(_AZURE_MAGIC)]
        (m,) = struct.unpack_from(">H", self.wrapped, at)
        return self.wrapped[at + 2 : at + 2 + m]


def wrapped_keys(vault: Vault, *, repository_id: str) -> list[WrappedKey]:
    """Every wrapped data key in ``vault``'s objects: the config's and each pack's run key.
    Every other object is sealed under the repository's master key (inside the config)."""
    out: list[WrappedKey] = []
    for info in vault.list(""):
        if info.name.startswith(".regionvault/"):
            continue  # the vault's random id, not data
        data = vault.get(info.name)
        if data[:4] == b"RVPK":
            *_, run_id, _salt, _commitment, w = _PACK.unpack_from(data)
            context = {
                "vault": vault.vault_id,
                "kind": "pack",
                "repository": repository_id,
                "run": run_id.hex(),
            }
            out.append(WrappedKey(info.name, data[_PACK.size : _PACK.size + w], context))
            continue
        assert data[:4] == b"RVLT", f"{info.name} is neither a sealed object nor a pack"
        _magic, _version, kind, source, _flags, _salt, _commitment, w = _ENVELOPE.unpack_from(data)
        if info.name == "config":
            assert (kind, source, w > 0) == (1, 1, True), f"{info.name}: not a wrapped-key config"
            context = {
                "vault": vault.vault_id,
                "kind": "config",
                "purpose": "regionvault-repository",
            }
            out.append(WrappedKey(info.name, data[_ENVELOPE.size : _ENVELOPE.size + w], context))
        else:
            assert (source, w) == (0, 0), f"{info.name}: expected a master-key object"
    return out


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


def leaks(scanned: Mapping[str, bytes], needles: Mapping[str, bytes]) -> list[str]:
    return [
        f"{what} in {where}"
        for where, data in scanned.items()
        for what, needle in needles.items()
        if needle in data
    ]


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
    "leaks",
    "open_inbox_object",
    "payload_kind",
    "record",
    "wrapped_keys",
]
