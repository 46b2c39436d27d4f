"""The KeyService suite: envelope data keys bound to their context, sealing from elsewhere,
rotation, and key isolation between regions both ways (security invariant 1)."""

from __future__ import annotations

import os

import pytest
from regionvault.core.conformance.checks import (
    expect_refusal,
    expect_unsupported,
    fail,
    require,
    require_not,
    who,
)
from regionvault.core.conformance.fixtures import SealElsewhere, SuiteBase
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.interfaces import KeyService, Sealer

__all__ = ["KeyServiceSuite"]

#: which region owns the material and which one tries to open it
DIRECTIONS = pytest.mark.parametrize(
    ("owner", "other"), [("a", "b"), ("b", "a")], ids=["A-to-B", "B-to-A"]
)


def _context(uid: str, **extra: str) -> dict[str, str]:
    return {"vault": f"conformance-{uid}", "kind": "test", "name": f"{uid}/object", **extra}


class KeyServiceSuite(SuiteBase):
    """Fixtures: ``keys_a``, ``keys_b`` (KeyServices of regions A and B), ``sealer_a``,
    ``sealer_b`` (their seal-only handles, from configuration alone), ``seal_elsewhere``
    (``(region, secret, context) -> sealed``, sealing in another process)."""

    @pytest.fixture
    def keys(self, request: pytest.FixtureRequest) -> dict[str, KeyService]:
        return {"a": request.getfixturevalue("keys_a"), "b": request.getfixturevalue("keys_b")}

    @pytest.fixture
    def sealers(self, request: pytest.FixtureRequest) -> dict[str, Sealer]:
        return {
            "a": request.getfixturevalue("sealer_a"),
            "b": request.getfixturevalue("sealer_b"),
        }

    # data keys -----------------------------------------------------------------------

    def test_data_key_round_trips_with_its_context(self, keys_a: KeyService, uid: str) -> None:
        context = _context(uid)
        key = keys_a.generate_data_key(context)
        assert len(key.plaintext) == 32, (
            f"{who(keys_a)} made a data key of {len(key.plaintext)} bytes, not 32 (256 bits)"
        )
        assert key.plaintext not in key.wrapped, (
            f"{who(keys_a)} returned a wrapped data key that contains its plaintext"
        )
        assert key.key_id == keys_a.key_id, (
            f"{who(keys_a)} wrapped a new data key under {key.key_id!r}, but its current "
            f"master key is {keys_a.key_id!r}"
        )
        assert keys_a.unwrap(key.wrapped, dict(context)) == key.plaintext, (
            f"{who(keys_a)} unwrapped its own data key to different bytes"
        )

    def test_data_keys_are_fresh(self, keys_a: KeyService, uid: str) -> None:
        context = _context(uid)
        first, second = keys_a.generate_data_key(context), keys_a.generate_data_key(context)
        assert first.plaintext != second.plaintext, (
            f"{who(keys_a)} returned the same data key twice"
        )
        assert first.wrapped != second.wrapped, (
            f"{who(keys_a)} returned the same wrapped data key twice"
        )

    @pytest.mark.parametrize(
        "change",
        ["changed value", "extra entry", "missing entry", "empty"],
    )
    def test_unwrap_with_another_context_is_denied(
        self, keys_a: KeyService, uid: str, change: str
    ) -> None:
        context = _context(uid)
        key = keys_a.generate_data_key(context)
        other: dict[str, str] = {
            "changed value": {**context, "name": f"{uid}/another-object"},
            "extra entry": {**context, "extra": "1"},
            "missing entry": {k: v for k, v in context.items() if k != "kind"},
            "empty": {},
        }[change]
        expect_refusal(
            lambda: keys_a.unwrap(key.wrapped, other),
            KeyAccessDenied,
            broken=(
                f"{who(keys_a)} unwrapped a data key under another encryption context "
                f"({change}: {other} instead of {context}): the context is not bound to the wrap"
            ),
            asked=f"{who(keys_a)}, asked to unwrap a data key under another context ({change}),",
        )

    def test_unwrap_of_altered_bytes_is_denied(self, keys_a: KeyService, uid: str) -> None:
        context = _context(uid)
        wrapped = bytearray(keys_a.generate_data_key(context).wrapped)
        wrapped[-1] ^= 0x01
        expect_refusal(
            lambda: keys_a.unwrap(bytes(wrapped), context),
            KeyAccessDenied,
            broken=f"{who(keys_a)} unwrapped a wrapped data key whose last byte was flipped",
            asked=f"{who(keys_a)}, asked to unwrap an altered data key,",
        )

    @DIRECTIONS
    def test_isolation_no_region_unwraps_another_regions_data_key(
        self, keys: dict[str, KeyService], owner: str, other: str, uid: str
    ) -> None:
        mine, theirs = keys[owner], keys[other]
        context = _context(uid)
        key = mine.generate_data_key(context)
        expect_refusal(
            lambda: theirs.unwrap(key.wrapped, context),
            KeyAccessDenied,
            broken=(
                f"KeyService of region {theirs.region} unwrapped a data key wrapped by region "
                f"{mine.region}: key isolation is broken"
            ),
            asked=(
                f"KeyService of region {theirs.region}, asked to unwrap a data key wrapped by "
                f"region {mine.region},"
            ),
        )

    # sealing -------------------------------------------------------------------------

    @DIRECTIONS
    def test_isolation_sealed_for_one_region_unseals_only_there(
        self,
        keys: dict[str, KeyService],
        sealers: dict[str, Sealer],
        owner: str,
        other: str,
        uid: str,
    ) -> None:
        mine, theirs, sealer = keys[owner], keys[other], sealers[owner]
        secret, context = os.urandom(32), _context(uid)
        sealed = sealer.seal(secret, context)
        assert secret not in sealed, f"the Sealer for region {mine.region} left the secret readable"
        assert mine.unseal(sealed, context) == secret, (
            f"{who(mine)} did not unseal what its own Sealer sealed to the same secret"
        )
        expect_refusal(
            lambda: theirs.unseal(sealed, context),
            KeyAccessDenied,
            broken=(
                f"KeyService of region {theirs.region} unsealed a secret sealed for region "
                f"{mine.region}: key isolation is broken"
            ),
            asked=(
                f"KeyService of region {theirs.region}, asked to unseal a secret sealed for "
                f"region {mine.region},"
            ),
        )

    def test_unseal_with_another_context_is_denied(
        self, keys_a: KeyService, sealer_a: Sealer, uid: str
    ) -> None:
        context = _context(uid)
        sealed = sealer_a.seal(os.urandom(32), context)
        other = {**context, "name": f"{uid}/another-object"}
        expect_refusal(
            lambda: keys_a.unseal(sealed, other),
            KeyAccessDenied,
            broken=(
                f"{who(keys_a)} unsealed a secret under another encryption context: the "
                "context is not bound to the seal"
            ),
            asked=f"{who(keys_a)}, asked to unseal under another context,",
        )

    def test_a_sealer_can_only_seal(self, sealer_a: Sealer, keys_a: KeyService) -> None:
        if isinstance(sealer_a, KeyService) or callable(getattr(sealer_a, "unseal", None)):
            fail(
                f"the Sealer for region {keys_a.region} ({type(sealer_a).__name__}) can unseal: "
                "the handle other regions get must seal only"
            )
        assert sealer_a.region == keys_a.region, (
            f"the Sealer for region {keys_a.region} says it seals for {sealer_a.region}"
        )

    def test_sealed_in_another_process_unseals_only_here(
        self, keys_a: KeyService, keys_b: KeyService, seal_elsewhere: SealElsewhere, uid: str
    ) -> None:
        secret, context = os.urandom(32), _context(uid, sealed_by="another process")
        sealed = seal_elsewhere(keys_a.region, secret, context)
        assert keys_a.unseal(sealed, context) == secret, (
            f"{who(keys_a)} did not unseal what a Sealer built from configuration in another "
            "process sealed for it"
        )
        expect_refusal(
            lambda: keys_b.unseal(sealed, context),
            KeyAccessDenied,
            broken=(
                f"KeyService of region {keys_b.region} unsealed a secret sealed for region "
                f"{keys_a.region}: key isolation is broken"
            ),
            asked=f"KeyService of region {keys_b.region}, asked to unseal A's secret,",
        )

    # rotation ------------------------------------------------------------------------

    def test_rotation_keeps_old_material_readable(
        self, keys_a: KeyService, sealer_a: Sealer, uid: str
    ) -> None:
        require(keys_a, "key_rotation")
        context = _context(uid)
        old_key = keys_a.generate_data_key(context)
        old_secret = os.urandom(32)
        old_sealed = sealer_a.seal(old_secret, context)
        before = keys_a.key_id
        new_id = keys_a.rotate()
        assert new_id != before, f"{who(keys_a)}.rotate() kept the master key {before!r}"
        assert keys_a.key_id == new_id, (
            f"{who(keys_a)}.rotate() returned {new_id!r} but key_id is now {keys_a.key_id!r}"
        )
        assert keys_a.unwrap(old_key.wrapped, context) == old_key.plaintext, (
            f"{who(keys_a)} cannot unwrap a data key wrapped before rotation"
        )
        assert keys_a.unseal(old_sealed, context) == old_secret, (
            f"{who(keys_a)} cannot unseal a secret sealed before rotation"
        )
        new_key = keys_a.generate_data_key(context)
        assert new_key.key_id == new_id, (
            f"{who(keys_a)} wraps new data keys under {new_key.key_id!r} after rotating to "
            f"{new_id!r}"
        )
        assert keys_a.unwrap(new_key.wrapped, context) == new_key.plaintext

    def test_undeclared_rotation_is_refused(self, keys_a: KeyService) -> None:
        require_not(keys_a, "key_rotation")
        expect_unsupported(keys_a, "rotate()", keys_a.rotate)
