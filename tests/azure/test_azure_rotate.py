"""Key rotation on Azure Key Vault (the fake Key Vault, a local vault): ``rotate-keys`` wraps
the keyring and config under the new key version, and a KeyService that read the current
version before another process rotated follows the rotation within ``CURRENT_SECONDS``
(review H3), never moving back to an older version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from regionvault.core.repository import ChunkerParams, Repository
from regionvault.core.repository import _format as fmt
from regionvault.providers.azure import keyvault
from regionvault.providers.azure.fakes.keyvault import FakeKeyVault
from regionvault.providers.local.provider import LocalProvider
from regionvault.providers.local.vault import LocalVault
from repository_support import SMALL, capture, snapshot
from test_azure_keyvault import World, fakes  # noqa: F401  (its module-scoped fixture)

CHUNKER = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)


class Clock:
    """A monotonic clock the test moves (no test waits or asserts on real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def azure(fakes: dict[str, FakeKeyVault], tmp_path: Path) -> Iterator[World]:  # noqa: F811
    w = World(fakes, tmp_path)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(keyvault.time, "monotonic", c)
    return c


def wrapped_version(data: bytes, name: str, kind: fmt.ObjectKind) -> str:
    """The key version an object's wrapped key names (``RVAZK1 | u8 n | version``)."""
    wrapped = fmt.EnvelopeHeader.parse(name, data, kind).wrapped_key
    assert wrapped.startswith(keyvault.MAGIC)
    n = wrapped[len(keyvault.MAGIC)]
    return wrapped[len(keyvault.MAGIC) + 1 : len(keyvault.MAGIC) + 1 + n].decode()


def test_a_key_service_follows_another_process_rotation_within_its_bound(
    azure: World, clock: Clock
) -> None:
    daemon = azure.keys("east")
    operator = azure.keys("east")
    old = daemon.generate_data_key({"k": "v"}).key_id
    new = operator.rotate()
    assert new != old
    assert azure.keys("east").generate_data_key({"k": "v"}).key_id == new  # a new process
    clock.now += keyvault.CURRENT_SECONDS / 2
    assert daemon.generate_data_key({"k": "v"}).key_id == old  # within the bound: no call
    clock.now += keyvault.CURRENT_SECONDS
    assert daemon.generate_data_key({"k": "v"}).key_id == new
    assert daemon.key_id == new


def test_rotate_keys_on_key_vault(azure: World, clock: Clock, tmp_path: Path) -> None:
    keys = azure.keys("east")
    vault = LocalVault(
        root=tmp_path / "v",
        provider="local",
        region="east",
        capabilities=LocalProvider.capabilities,
    )
    repo = Repository.init_or_open(
        vault, keys, region="azure:east", chunker=CHUNKER, settings=SMALL
    )
    data = tmp_path / "d"
    data.mkdir()
    (data / "f").write_bytes(bytes(range(256)) * 400)
    point = repo.backup(capture(data)).id
    old = keys.key_id
    report = repo.rotate_keys()
    assert report.old_key_id == old and report.new_key_id == keys.key_id != old
    new_version = report.new_key_id.rpartition("/")[2]
    ring = fmt.keyring_name(report.generation)
    assert wrapped_version(vault.get(ring), ring, fmt.ObjectKind.KEYRING) == new_version
    config = vault.get(fmt.CONFIG_NAME)
    assert wrapped_version(config, fmt.CONFIG_NAME, fmt.ObjectKind.CONFIG) == new_version
    fresh = Repository.open(vault, azure.keys("east"), region="azure:east", settings=SMALL)
    fresh.restore(point, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(data)
    verified = fresh.verify(read_data=True)
    assert verified.ok and verified.warnings == [], (verified.errors, verified.warnings)
