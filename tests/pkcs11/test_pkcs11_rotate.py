"""``rotate-keys`` on PKCS#11 (SoftHSM, a local vault): the keyring and the config are
wrapped under the new key object, a fresh session restores and verifies every point with
them, and a KeyService of another session follows within ``RESCAN_SECONDS`` (its rescan;
tests/pkcs11/test_pkcs11_robustness.py checks that bound)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from pkcs11_world import Hsm
from regionvault.core.repository import ChunkerParams, Repository
from regionvault.core.repository import _format as fmt
from regionvault.providers.local.provider import LocalProvider
from regionvault.providers.local.vault import LocalVault
from repository_support import SMALL, capture, snapshot

CHUNKER = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)


def wrapped_under(data: bytes, name: str, kind: fmt.ObjectKind, prefix: str) -> str:
    """``<prefix>-<version>#<id>`` of the key object that wrapped an object's key (the
    wrapped form: magic, u8 + one digit version, u8 + 16-byte key id, ...)."""
    wrapped = fmt.EnvelopeHeader.parse(name, data, kind).wrapped_key
    return f"{prefix}-{wrapped[6] - 48}#{wrapped[8:24][:8].hex()}"


def test_rotate_keys_on_softhsm(hsm: Hsm, tmp_path: Path) -> None:
    # keys of this test's own on the east token (the other tests' keys are left alone)
    prefix = f"rot-{uuid.uuid4().hex[:8]}"
    keys = hsm.keys("east", key_label_prefix=prefix)
    fresh_keys = None
    try:
        vault = LocalVault(
            root=tmp_path / "v",
            provider="local",
            region="east",
            capabilities=LocalProvider.capabilities,
        )
        repo = Repository.init_or_open(
            vault, keys, region="pkcs11:east", chunker=CHUNKER, settings=SMALL
        )
        data = tmp_path / "d"
        data.mkdir()
        (data / "f").write_bytes(bytes(range(256)) * 400)
        point = repo.backup(capture(data)).id
        old = keys.key_id
        report = repo.rotate_keys()
        assert report.old_key_id == old and report.new_key_id == keys.key_id != old
        assert f"/{prefix}-2#" in report.new_key_id
        fresh_keys = hsm.keys("east", key_label_prefix=prefix, create=False)
        fresh = Repository.open(vault, fresh_keys, region="pkcs11:east", settings=SMALL)
        fresh.restore(point, tmp_path / "out")
        assert snapshot(tmp_path / "out") == snapshot(data)
        verified = fresh.verify(read_data=True)
        assert verified.ok and verified.warnings == [], (verified.errors, verified.warnings)
        ring = fmt.keyring_name(report.generation)
        under = wrapped_under(vault.get(ring), ring, fmt.ObjectKind.KEYRING, prefix)
        assert report.new_key_id.endswith("/" + under)
        config = vault.get(fmt.CONFIG_NAME)
        assert wrapped_under(config, fmt.CONFIG_NAME, fmt.ObjectKind.CONFIG, prefix) == under
    finally:
        keys._run("remove the test's keys", lambda session: remove_keys(session, prefix))
        keys.close()
        if fresh_keys is not None:
            fresh_keys.close()


def remove_keys(session: Any, prefix: str) -> None:
    """Destroy this test's objects: the token's other tests audit every key on it."""
    for obj in list(session.get_objects()):
        if str(obj.label).startswith(prefix + "-"):
            obj.destroy()
