"""``rotate-keys`` on Cloud KMS (its fake, a local vault): the keyring and the config are
wrapped under exactly the new primary version even while Encrypt by key name still uses the
previous one (Cloud KMS documents that a primary change propagates:
cloud.google.com/kms/docs/consistency; review H1), and with the old version disabled every
point restores and verifies. A KeyService never moves its primary back to an older version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud.kms_v1 import types
from kms_world import EAST, KmsWorld, two_fakes, world_on
from regionvault.core.repository import ChunkerParams, Repository
from regionvault.providers.gcp.fakes.kms import KmsFake
from regionvault.providers.gcp.kms import GcpKeyService
from regionvault.providers.local.provider import LocalProvider
from regionvault.providers.local.vault import LocalVault
from repository_support import SMALL, capture, snapshot

_State = types.CryptoKeyVersion.CryptoKeyVersionState
CHUNKER = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)


@pytest.fixture
def lag(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Key path -> the version an Encrypt by key name still uses (a lagging primary)."""
    lagging: dict[str, str] = {}
    real_encrypt = KmsFake._encrypt

    def encrypt(self: Any, request: Any) -> Any:
        if "/cryptoKeyVersions/" not in request.name and request.name in lagging:
            request.name = lagging[request.name]
        return real_encrypt(self, request)

    monkeypatch.setattr(KmsFake, "_encrypt", encrypt)
    return lagging


@pytest.fixture
def kms_world(lag: dict[str, str], tmp_path: Path) -> Iterator[KmsWorld]:
    """Fakes of this test's own, started after ``lag`` patched Encrypt (a fake binds its
    handlers when it starts)."""
    for fakes in two_fakes():
        yield from world_on(fakes, tmp_path)


def vault(root: Path) -> LocalVault:
    return LocalVault(
        root=root, provider="local", region="east", capabilities=LocalProvider.capabilities
    )


def test_rotate_keys_wraps_under_the_new_primary_while_encrypt_lags(
    kms_world: KmsWorld, lag: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = kms_world.keys(EAST)
    repo = Repository.init_or_open(
        vault(tmp_path / "v"), keys, region="gcp:east", chunker=CHUNKER, settings=SMALL
    )
    data = tmp_path / "d"
    data.mkdir()
    (data / "f").write_bytes(bytes(range(256)) * 400)
    point = repo.backup(capture(data)).id
    old = keys.key_id
    real_rotate = GcpKeyService.rotate

    def rotate(self: GcpKeyService) -> str:
        out = real_rotate(self)
        lag[self.key_path] = old  # Encrypt by name keeps using the old primary for now
        return out

    monkeypatch.setattr(GcpKeyService, "rotate", rotate)
    report = repo.rotate_keys()
    assert report.new_key_id != old and report.new_key_id == keys.key_id
    assert keys.generate_data_key({"k": "v"}).key_id == report.new_key_id  # never back
    # the old version disabled: a fresh process opens the config and keyring and restores
    keys.client.update_crypto_key_version(
        crypto_key_version=types.CryptoKeyVersion(name=old, state=_State.DISABLED),
        update_mask={"paths": ["state"]},
    )
    lag.clear()
    fresh = Repository.open(
        vault(tmp_path / "v"), kms_world.keys(EAST), region="gcp:east", settings=SMALL
    )
    fresh.restore(point, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(data)
    verified = fresh.verify(read_data=True)
    assert verified.ok and verified.warnings == [], (verified.errors, verified.warnings)
