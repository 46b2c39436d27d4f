"""The pkcs11 KeyService against SoftHSMv2 tokens: the conformance KeyServiceSuite on two
tokens, what the token holds (a non-extractable AES-256 key per version, an RSA pair whose
private half never leaves), the envelopes, rotation across sessions, the seal-only Sealer from
a PEM alone in a process without python-pkcs11, and the errors that name what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11_world import TOKENS, Hsm
from regionvault.core.conformance.fixtures import SealElsewhere
from regionvault.core.conformance.keys import KeyServiceSuite
from regionvault.core.errors import ConfigError, KeyAccessDenied, UnsupportedOperation
from regionvault.core.interfaces import KeyService, Sealer
from regionvault.providers.pkcs11.keys import DATA_KEY_MAGIC, Pkcs11KeyService
from regionvault.providers.pkcs11.provider import Pkcs11Provider
from regionvault.providers.pkcs11.sealing import SEAL_MAGIC, Pkcs11Sealer

CTX = {"vault": "v-1", "kind": "pack", "name": "packs/00/abc"}

#: seals for a region from its PEM alone, in a process where python-pkcs11 cannot be imported
_SEAL_SCRIPT = """
import json, sys
sys.modules["pkcs11"] = None  # the sealer must not need python-pkcs11 (nor a token, nor a PIN)
from regionvault.providers.pkcs11.sealing import Pkcs11Sealer
region, pem, secret, context = sys.argv[1:5]
with open(pem, "rb") as f:
    sealer = Pkcs11Sealer.from_pem(region, f.read())
sys.stdout.write(sealer.seal(bytes.fromhex(secret), json.loads(context)).hex())
"""


def export_pem(keys: Pkcs11KeyService, path: Path) -> Path:
    path.write_bytes(keys.public_key_pem())
    return path


def seal_in_another_process(region: str, pem: Path, secret: bytes, ctx: Mapping[str, str]) -> bytes:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", _SEAL_SCRIPT, region, str(pem), secret.hex(), json.dumps(dict(ctx))],
        capture_output=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return bytes.fromhex(done.stdout.decode())


class TestSoftHsmKeyService(KeyServiceSuite):
    """core/conformance's KeyService suite: region A on one SoftHSM token, B on another."""

    @pytest.fixture
    def keys_a(self, east: Pkcs11KeyService) -> KeyService:
        return east

    @pytest.fixture
    def keys_b(self, west: Pkcs11KeyService) -> KeyService:
        return west

    @pytest.fixture
    def sealer_a(self, hsm: Hsm, east: Pkcs11KeyService, tmp_path: Path) -> Sealer:
        pem = export_pem(east, tmp_path / "east.pem")
        return Pkcs11Provider().sealer(hsm.region("east", public_key=pem.as_posix()))

    @pytest.fixture
    def sealer_b(self, hsm: Hsm, west: Pkcs11KeyService, tmp_path: Path) -> Sealer:
        pem = export_pem(west, tmp_path / "west.pem")
        return Pkcs11Provider().sealer(hsm.region("west", public_key=pem.as_posix()))

    @pytest.fixture
    def seal_elsewhere(
        self, east: Pkcs11KeyService, west: Pkcs11KeyService, tmp_path: Path
    ) -> SealElsewhere:
        pems = {k.region: export_pem(k, tmp_path / f"{k.region}.pem") for k in (east, west)}

        def seal(region: str, secret: bytes, context: Mapping[str, str]) -> bytes:
            return seal_in_another_process(region, pems[region], secret, context)

        return seal


# ---------------------------------------------------------------------- what the token holds


def test_the_wrapping_key_is_aes_256_sensitive_and_never_extractable(
    east: Pkcs11KeyService,
) -> None:
    def audit(session: Any) -> None:  # a session on the token, as an auditor of it would open
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        labels = sorted(k.label for k in found)
        assert labels and all(label.startswith("regionvault-") for label in labels), labels
        for key in found:
            assert key[Attribute.KEY_TYPE] == KeyType.AES
            assert key[Attribute.VALUE_LEN] == 32
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert len(key[Attribute.ID]) == 16
            with pytest.raises(pkcs11.exceptions.PKCS11Error):
                key[Attribute.VALUE]
        private = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        assert [k.label for k in private] == ["regionvault-seal"]
        assert private[0][Attribute.EXTRACTABLE] is False
        assert private[0][Attribute.SENSITIVE] is True

    east._run("audit", audit)


def test_wrapped_data_key_names_its_version_and_id_and_hides_the_key(
    east: Pkcs11KeyService,
) -> None:
    key = east.generate_data_key(CTX)
    assert key.wrapped.startswith(DATA_KEY_MAGIC + b"\x01")
    assert key.plaintext not in key.wrapped
    # magic, u8 + one digit, u8 + 16-byte key id, u8 + 12-byte IV, 32 + 16
    assert len(key.wrapped) == len(DATA_KEY_MAGIC) + 2 + 17 + 13 + 32 + 16
    version, key_id = key.wrapped[6] - 48, key.wrapped[8:24]
    assert key.key_id == f"{TOKENS['east'][0]}/regionvault-{version}#{key_id[:8].hex()}"


def test_rotation_is_a_new_key_object_and_a_new_session_keeps_it(hsm: Hsm) -> None:
    first = hsm.keys("made")
    try:
        old = first.generate_data_key(CTX)
        before = first.key_id
        after = first.rotate()
        version = int(before.split("#")[0].rsplit("-", 1)[1])
        assert after != before and after.split("#")[0].endswith(f"-{version + 1}")
    finally:
        first.close()
    again = hsm.keys("made", create=False)
    try:
        assert again.key_id == after, "a new session did not take the newest version as current"
        assert again.unwrap(old.wrapped, CTX) == old.plaintext
    finally:
        again.close()


def test_unseal_refuses_an_envelope_for_another_seal_key(east: Pkcs11KeyService) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    sealed = Pkcs11Sealer(region=east.region, public_key=other).seal(b"s", CTX)
    assert sealed.startswith(SEAL_MAGIC)
    with pytest.raises(KeyAccessDenied, match="holds no seal key"):
        east.unseal(sealed, CTX)


# ---------------------------------------------------------------------- errors


def test_a_wrong_pin_is_access_denied(hsm: Hsm) -> None:
    region = hsm.region("west")
    Path(region.settings["pin_file"]).write_text("0000-wrong\n", encoding="utf-8")
    with pytest.raises(KeyAccessDenied, match="refused the PIN"):
        Pkcs11Provider().key_service(region)
    hsm.settings("west")  # the right PIN back for later tests


def test_a_pin_in_site_toml_is_refused(hsm: Hsm) -> None:
    region = hsm.region("east", pin="1234")
    with pytest.raises(ConfigError, match=r"never kept in site\.toml") as caught:
        Pkcs11Provider().validate(region)
    assert caught.value.key == 'regions."pkcs11:east".pin'


def test_a_pin_variable_that_is_not_set_is_named(hsm: Hsm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RV_TEST_PIN", raising=False)
    settings = {k: v for k, v in hsm.settings("east").items() if k != "pin_file"}
    region = hsm.region("east")
    region = type(region)(
        id=region.id,
        settings={**settings, "pin_env": "RV_TEST_PIN"},
        services={},
        base_dir=hsm.workdir,
    )
    with pytest.raises(ConfigError, match="RV_TEST_PIN is not set"):
        Pkcs11Provider().key_service(region)
    monkeypatch.setenv("RV_TEST_PIN", TOKENS["east"][1])
    Pkcs11Provider().key_service(region).close()


def test_an_empty_token_without_create_is_a_config_error(hsm: Hsm) -> None:
    with pytest.raises(ConfigError, match="set create = true"):
        hsm.keys("empty", create=False)


def test_an_unknown_token_is_named(hsm: Hsm) -> None:
    region = hsm.region("east", token_label="no-such-token")
    with pytest.raises(ConfigError, match="no-such-token"):
        Pkcs11Provider().key_service(region)


def test_a_sealer_needs_the_public_key_file(hsm: Hsm) -> None:
    with pytest.raises(ConfigError, match="public_key"):
        Pkcs11Provider().sealer(hsm.region("east"))


@pytest.mark.parametrize("service", ["compute", "vault", "transit"])
def test_services_it_does_not_offer_are_unsupported_naming_it(hsm: Hsm, service: str) -> None:
    provider, region = Pkcs11Provider(), hsm.region("east")
    with pytest.raises(UnsupportedOperation) as caught:
        if service == "transit":
            provider.transit(region, region)
        else:
            getattr(provider, service)(region)
    assert caught.value.provider == "pkcs11"
    assert f"the {service} service" in str(caught.value)
    assert "pkcs11" in str(caught.value)
