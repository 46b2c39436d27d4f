"""The local KeyService against the KeyService contract, and region key isolation."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from regionvault.core import (
    KeyAccessDenied,
    KeyServiceError,
    Region,
    Site,
)
from regionvault.providers.local import LocalKeyService, LocalProvider
from regionvault.providers.local.keys import MAX_SEALED_SECRET

CTX = {"vault": "v-0123", "kind": "pack", "name": "packs/ab/abcdef"}


def key_service(root: Path, region: str = "local:east") -> LocalKeyService:
    return LocalKeyService(
        root=root, provider="local", region=region, capabilities=LocalProvider.capabilities
    )


def east_root(site: Site) -> Path:
    return site.region("east").config.path("root")


# --------------------------------------------------------------------------- data keys


def test_data_key_roundtrip(east: Region) -> None:
    dk = east.keys.generate_data_key(CTX)
    assert len(dk.plaintext) == 32
    assert dk.key_id == east.keys.key_id
    assert dk.plaintext not in dk.wrapped
    assert dk.plaintext.hex() not in repr(dk)
    # the context is a mapping: its order does not matter
    assert east.keys.unwrap(dk.wrapped, dict(reversed(CTX.items()))) == dk.plaintext
    assert east.keys.generate_data_key(CTX).plaintext != dk.plaintext


@pytest.mark.parametrize(
    "other",
    [
        {**CTX, "name": "packs/ab/other"},
        {k: v for k, v in CTX.items() if k != "kind"},
        {**CTX, "extra": ""},
        {},
    ],
    ids=["changed-value", "missing-key", "extra-key", "empty"],
)
def test_unwrap_with_another_context_is_denied(east: Region, other: dict[str, str]) -> None:
    dk = east.keys.generate_data_key(CTX)
    with pytest.raises(KeyAccessDenied, match="context"):
        east.keys.unwrap(dk.wrapped, other)


def test_regions_cannot_unwrap_each_others_data_keys(east: Region, west: Region) -> None:
    from_east = east.keys.generate_data_key(CTX)
    from_west = west.keys.generate_data_key(CTX)
    with pytest.raises(KeyAccessDenied, match="does not hold") as denied:
        west.keys.unwrap(from_east.wrapped, CTX)
    assert denied.value.region == "local:west"
    with pytest.raises(KeyAccessDenied, match="does not hold"):
        east.keys.unwrap(from_west.wrapped, CTX)


def test_forged_key_id_does_not_help(east: Region, west: Region) -> None:
    """Relabelling east's blob with west's key id still fails: the key id is in the AAD and
    west's master key never wrapped it."""
    from_east = east.keys.generate_data_key(CTX).wrapped
    west_id = west.keys.key_id.encode()
    east_id_len = from_east[1]
    forged = bytes([1, len(west_id)]) + west_id + from_east[2 + east_id_len :]
    with pytest.raises(KeyAccessDenied, match="authentication"):
        west.keys.unwrap(forged, CTX)


def test_tampered_or_malformed_wrapped_key_is_denied(east: Region) -> None:
    wrapped = east.keys.generate_data_key(CTX).wrapped
    for position in range(len(wrapped)):
        tampered = bytearray(wrapped)
        tampered[position] ^= 0x01
        with pytest.raises(KeyAccessDenied):
            east.keys.unwrap(bytes(tampered), CTX)
    for bad in (b"", b"\x01", wrapped[:-1], wrapped + b"\0", b"\x07" + wrapped[1:]):
        with pytest.raises(KeyAccessDenied):
            east.keys.unwrap(bad, CTX)


def test_bad_context_is_a_named_error(east: Region) -> None:
    with pytest.raises(KeyServiceError, match="'kind'"):
        east.keys.generate_data_key({"kind": 7})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- sealing


def test_seal_for_another_region_and_only_it_unseals(
    site: Site, east: Region, west: Region
) -> None:
    secret = b"chunk-id key \x00\xff"
    # east holds only a Sealer for west (never west's KeyService) and seals for it
    for_west = site.region("west").sealer().seal(secret, CTX)
    assert secret not in for_west
    assert west.keys.unseal(for_west, CTX) == secret
    with pytest.raises(KeyAccessDenied, match="does not hold"):
        east.keys.unseal(for_west, CTX)
    # and the other direction
    for_east = site.region("east").sealer().seal(secret, CTX)
    assert east.keys.unseal(for_east, CTX) == secret
    with pytest.raises(KeyAccessDenied, match="does not hold"):
        west.keys.unseal(for_east, CTX)


def test_unseal_with_wrong_context_or_tampering_is_denied(west: Region) -> None:
    sealed = west.keys.seal(b"secret", CTX)
    with pytest.raises(KeyAccessDenied, match="context"):
        west.keys.unseal(sealed, {**CTX, "kind": "index"})
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x80
        with pytest.raises(KeyAccessDenied):
            west.keys.unseal(bytes(tampered), CTX)
    for bad in (b"", sealed[:30], b"\x02" + sealed[1:]):
        with pytest.raises(KeyAccessDenied):
            west.keys.unseal(bad, CTX)


def test_provider_sealer_reads_only_the_public_key(site: Site, west: Region) -> None:
    west.keys.key_id  # noqa: B018 - creates west's keystore
    keystore = west.config.path("root") / "keys" / "keystore.json"
    saved = keystore.read_bytes()
    keystore.write_bytes(b"not a keystore")  # a sealer that read it would fail
    try:
        sealer = site.region("west").sealer()
        sealed = sealer.seal(b"secret", CTX)
    finally:
        keystore.write_bytes(saved)
    assert not any(isinstance(v, X25519PrivateKey) for v in vars(sealer).values())
    assert west.keys.unseal(sealed, CTX) == b"secret"


def test_sealer_for_a_fresh_region_creates_its_keys(site: Site, west: Region) -> None:
    keys_dir = west.config.path("root") / "keys"
    assert not keys_dir.exists()
    sealed = site.region("west").sealer().seal(b"secret", CTX)
    assert west.keys.unseal(sealed, CTX) == b"secret"


def test_seal_refuses_large_secrets(west: Region) -> None:
    with pytest.raises(KeyServiceError, match="at most"):
        west.keys.seal(b"x" * (MAX_SEALED_SECRET + 1), CTX)


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_keys_for_unwrap_and_unseal(site: Site, east: Region) -> None:
    before = east.keys.generate_data_key(CTX)
    sealed_before = site.region("east").sealer().seal(b"old secret", CTX)
    old_id = east.keys.key_id

    new_id = east.keys.rotate()
    assert new_id != old_id
    assert east.keys.key_id == new_id
    after = east.keys.generate_data_key(CTX)
    assert after.key_id == new_id
    assert east.keys.unwrap(before.wrapped, CTX) == before.plaintext
    assert east.keys.unwrap(after.wrapped, CTX) == after.plaintext
    assert east.keys.unseal(sealed_before, CTX) == b"old secret"
    # the sealing key rotated too, and both generations unseal
    new_sealer = site.region("east").sealer()
    assert new_sealer.seal(b"new", CTX) != sealed_before
    assert east.keys.unseal(new_sealer.seal(b"new", CTX), CTX) == b"new"

    # a KeyService made afresh from the same keystore (another process) agrees
    reopened = key_service(east_root(site))
    assert reopened.key_id == new_id
    assert reopened.unwrap(before.wrapped, CTX) == before.plaintext


def test_rotation_by_another_process_is_seen(tmp_path: Path) -> None:
    ours, theirs = key_service(tmp_path), key_service(tmp_path)
    ours.key_id  # noqa: B018 - loads and caches the keystore
    theirs.rotate()
    dk = theirs.generate_data_key(CTX)
    sealed = theirs.sealer().seal(b"s", CTX)
    assert ours.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert ours.unseal(sealed, CTX) == b"s"


def test_concurrent_rotations_lose_no_key(tmp_path: Path) -> None:
    services = [key_service(tmp_path) for _ in range(4)]
    services[0].key_id  # noqa: B018
    made: list[tuple[LocalKeyService, bytes, bytes]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(services))

    def rotate_and_wrap(ks: LocalKeyService) -> None:
        barrier.wait(timeout=10)
        ks.rotate()
        dk = ks.generate_data_key(CTX)
        with lock:
            made.append((ks, dk.wrapped, dk.plaintext))

    threads = [threading.Thread(target=rotate_and_wrap, args=(ks,)) for ks in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(made) == len(services)
    fresh = key_service(tmp_path)
    for _, wrapped, plaintext in made:
        assert fresh.unwrap(wrapped, CTX) == plaintext


# --------------------------------------------------------------------------- the keystore


def test_keystore_file_is_private(east: Region) -> None:
    east.keys.rotate()
    keys_dir = east.config.path("root") / "keys"
    assert stat.S_IMODE((keys_dir / "keystore.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    # no temporary copy of the keystore is left around
    assert sorted(p.name for p in keys_dir.iterdir()) == [
        "keystore.json",
        "keystore.lock",
        "sealing.pub",
    ]


def test_concurrent_first_use_agrees_on_one_keystore(tmp_path: Path) -> None:
    """Processes and threads that create the keystore at once all end up with the same
    keys: none clobbers another's."""
    code = (
        "import sys; from pathlib import Path;"
        "from regionvault.providers.local import LocalKeyService, LocalProvider;"
        "ks = LocalKeyService(root=Path(sys.argv[1]), provider='local', region='local:east',"
        " capabilities=LocalProvider.capabilities); print(ks.key_id)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    ids: list[str] = []
    barrier = threading.Barrier(4)
    lock = threading.Lock()

    def first_use() -> None:
        ks = key_service(tmp_path)
        barrier.wait(timeout=10)
        with lock:
            ids.append(ks.key_id)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        ids.append(out.strip())
    assert len(ids) == 7
    assert len(set(ids)) == 1


def test_damaged_keystore_is_a_named_error(tmp_path: Path) -> None:
    key_service(tmp_path).key_id  # noqa: B018
    (tmp_path / "keys" / "keystore.json").write_text('{"format": 1}')
    with pytest.raises(KeyServiceError, match=r"keystore .*keystore\.json is malformed"):
        key_service(tmp_path).key_id  # noqa: B018


def test_no_plaintext_data_key_reaches_the_vault(east: Region, west: Region) -> None:
    """Envelope use as the data plane does it: only wrapped keys and sealed secrets are
    stored; no plaintext key appears in any file of either region."""
    plaintexts: list[bytes] = []
    for i in range(5):
        ctx = {**CTX, "name": f"packs/{i}"}
        dk = east.keys.generate_data_key(ctx)
        plaintexts.append(dk.plaintext)
        east.vault.put(f"keys/{i}", dk.wrapped)
        west.vault.put(f"sealed/{i}", west.keys.seal(dk.plaintext, ctx))
    east.keys.rotate()
    for region in (east, west):
        for path in region.config.path("root").rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                for secret in plaintexts:
                    assert secret not in content, path
                    assert secret.hex().encode() not in content, path
