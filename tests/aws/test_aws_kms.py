"""The KMS KeyService and Sealer against the KeyService contract, over boto3 and HTTP."""

from __future__ import annotations

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.errors import ConfigError, KeyAccessDenied, KeyServiceError

CTX = {"vault": "v-1", "kind": "pack", "name": "packs/00/abc"}


def test_data_key_round_trip_and_key_id(aws: AwsWorld) -> None:
    keys = aws.track(aws.provider.key_service(aws.region(EAST)))
    dk = keys.generate_data_key(CTX)
    assert len(dk.plaintext) == 32
    assert dk.plaintext not in dk.wrapped
    assert dk.key_id == keys.key_id
    assert keys.key_id.startswith(f"arn:aws:kms:{EAST}:")
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    # a second KeyService on the same alias finds the same key instead of making another
    again = aws.track(aws.provider.key_service(aws.region(EAST)))
    assert again.key_id == keys.key_id
    assert again.unwrap(dk.wrapped, CTX) == dk.plaintext


def test_regions_cannot_open_each_others_material(aws: AwsWorld) -> None:
    east_cfg, west_cfg = aws.region(EAST), aws.region(WEST)
    east = aws.track(aws.provider.key_service(east_cfg))
    west = aws.track(aws.provider.key_service(west_cfg))
    east_key, west_key = east.generate_data_key(CTX), west.generate_data_key(CTX)
    assert east.key_id.split(":")[3] == EAST and west.key_id.split(":")[3] == WEST

    with pytest.raises(KeyAccessDenied) as denied:
        east.unwrap(west_key.wrapped, CTX)
    assert f"aws:{EAST}" in str(denied.value)
    with pytest.raises(KeyAccessDenied) as denied:
        west.unwrap(east_key.wrapped, CTX)
    assert f"aws:{WEST}" in str(denied.value)

    # east seals for west with west's sealer (KMS Encrypt on west's key): only west unseals
    sealed_for_west = aws.provider.sealer(west_cfg).seal(b"chunk-id key", CTX)
    assert west.unseal(sealed_for_west, CTX) == b"chunk-id key"
    with pytest.raises(KeyAccessDenied):
        east.unseal(sealed_for_west, CTX)
    sealed_for_east = east.seal(b"secret", CTX)
    with pytest.raises(KeyAccessDenied):
        west.unseal(sealed_for_east, CTX)
    assert east.unseal(sealed_for_east, CTX) == b"secret"


def test_context_binds_every_wrap_and_seal(aws: AwsWorld) -> None:
    keys = aws.track(aws.provider.key_service(aws.region(EAST)))
    dk = keys.generate_data_key(CTX)
    for other in ({**CTX, "name": "packs/00/abd"}, {}, {**CTX, "extra": "x"}):
        with pytest.raises(KeyAccessDenied):
            keys.unwrap(dk.wrapped, other)
    sealed = keys.seal(b"s" * 32, CTX)
    with pytest.raises(KeyAccessDenied):
        keys.unseal(sealed, {**CTX, "kind": "index"})
    # a wrapped data key is not a sealed secret, nor the reverse, even under one context
    with pytest.raises(KeyAccessDenied):
        keys.unseal(dk.wrapped, CTX)
    with pytest.raises(KeyAccessDenied):
        keys.unwrap(sealed, CTX)
    forged = bytearray(dk.wrapped)
    forged[-1] ^= 1
    with pytest.raises(KeyAccessDenied):
        keys.unwrap(bytes(forged), CTX)
    with pytest.raises(KeyServiceError, match="reserved"):
        keys.generate_data_key({"regionvault:purpose": "seal"})
    with pytest.raises(KeyServiceError, match="1024-byte"):
        keys.seal(b"x" * 1025, CTX)


def test_rotation_keeps_old_material_readable(aws: AwsWorld) -> None:
    keys = aws.track(aws.provider.key_service(aws.region(EAST)))
    before = keys.generate_data_key(CTX)
    sealed = keys.seal(b"before rotation", CTX)
    old_id = keys.key_id
    new_id = keys.rotate()
    assert new_id != old_id
    assert keys.key_id == new_id
    after = keys.generate_data_key(CTX)
    assert after.key_id == new_id
    assert keys.unwrap(before.wrapped, CTX) == before.plaintext
    assert keys.unwrap(after.wrapped, CTX) == after.plaintext
    assert keys.unseal(sealed, CTX) == b"before rotation"
    # a fresh KeyService learns the rotation from KMS itself
    fresh = aws.track(aws.provider.key_service(aws.region(EAST)))
    assert fresh.key_id == new_id


def test_sealer_uses_kms_encrypt_only(aws: AwsWorld) -> None:
    """A sealer built from configuration alone (the key exists, create = false) asks KMS
    for nothing but Encrypt: the other region's role needs kms:Encrypt only."""
    west_keys = aws.track(aws.provider.key_service(aws.region(WEST)))
    west_keys.key_id  # noqa: B018 - creates the key
    before = aws.provider.metrics.snapshot()
    sealer = aws.provider.sealer(aws.region(WEST, create=False))
    sealer.seal(b"k" * 32, CTX)
    sealed = sealer.seal(b"k" * 32, CTX)
    assert aws.provider.metrics.since(before).by_operation() == {"kms.Encrypt": 2}
    assert sealer.region == f"aws:{WEST}"
    assert west_keys.unseal(sealed, CTX) == b"k" * 32


def test_sealing_for_a_fresh_dev_region_makes_its_key(aws: AwsWorld) -> None:
    """With create = true (tests, dev), a region whose KeyService never ran gets its key
    when another region first seals for it, as the local provider does."""
    west_cfg = aws.region(WEST)
    sealed = aws.provider.sealer(west_cfg).seal(b"chunk-id key", CTX)
    assert aws.track(aws.provider.key_service(west_cfg)).unseal(sealed, CTX) == b"chunk-id key"


def test_kms_calls_per_operation(aws: AwsWorld) -> None:
    keys = aws.track(aws.provider.key_service(aws.region(EAST)))
    dk = keys.generate_data_key(CTX)  # the first call also resolves the key
    before = aws.provider.metrics.snapshot()
    for _ in range(3):
        keys.generate_data_key(CTX)
    keys.unwrap(dk.wrapped, CTX)
    used = aws.provider.metrics.since(before)
    assert used.by_operation() == {"kms.Decrypt": 1, "kms.GenerateDataKey": 3}


def test_missing_or_wrong_key_settings_name_the_key(aws: AwsWorld) -> None:
    with pytest.raises(ConfigError, match="kms_key"):
        aws.provider.key_service(aws.region(EAST, kms_key=None))
    with pytest.raises(ConfigError, match="kms_key"):
        aws.provider.key_service(
            aws.region(EAST, kms_key="arn:aws:kms:eu-west-1:123456789012:key/abc")
        )
    absent = aws.track(aws.provider.key_service(aws.region(EAST, create=False)))
    with pytest.raises(KeyAccessDenied, match="cannot find the region's key"):
        absent.generate_data_key(CTX)
