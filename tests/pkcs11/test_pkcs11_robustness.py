"""The pkcs11 KeyService where processes, sessions and tokens misbehave (review rpk, issue
#17): two processes rotating at once, a seal pair left without ids, a session lost under it,
errors of each class injected, two regions on one token, a token that makes its own GCM IVs,
a rotation by another process, a fork, a second SoftHSM configuration, a constructor that
fails, the key templates, and PIN hygiene. Each test failed on the provider before the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from pkcs11_world import TOKENS, Hsm
from regionvault.core.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyServiceError,
    TransientError,
)
from regionvault.providers.pkcs11 import keys as keys_module
from regionvault.providers.pkcs11.keys import Pkcs11KeyService, _SharedSession
from regionvault.providers.pkcs11.provider import Pkcs11Provider
from regionvault.providers.pkcs11.softhsm import SoftHsm

CTX = {"vault": "v-1", "kind": "pack", "name": "packs/00/abc"}

#: a child python that builds a KeyService from JSON settings; the test's code follows
_CHILD_HEAD = """
import json, os, sys, time
from pathlib import Path
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.pkcs11.provider import Pkcs11Provider

def keys(settings, name="child"):
    config = RegionConfig(id=RegionId("pkcs11", name), settings=settings,
                          services={"keys": ServiceConfig("pkcs11", settings)},
                          base_dir=Path("."))
    return Pkcs11Provider().key_service(config)

settings = json.loads(sys.argv[1])
work = Path(sys.argv[2])

def wait_for(name):
    deadline = time.monotonic() + 30
    while not (work / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for {name}")
        time.sleep(0.05)
"""


def child(code: str, settings: dict[str, Any], work: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("SOFTHSM2_CONF", None)
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_HEAD + code, json.dumps(settings), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def on_session(keys: Pkcs11KeyService, call: Any) -> Any:
    """``call(session)`` on the KeyService's token session, as an auditor of the token would."""
    return keys._run("audit", call)


def objects(keys: Pkcs11KeyService, kind: ObjectClass) -> list[Any]:
    return on_session(keys, lambda s: list(s.get_objects({Attribute.CLASS: kind})))


@pytest.fixture
def inject(hsm: Hsm) -> Iterator[Pkcs11KeyService]:
    keys = hsm.keys("inject")
    yield keys
    keys.close()


# ------------------------------------------------------------- 1: two processes rotate at once

_ROTATE = """
from regionvault.providers.pkcs11 import keys as K
who = sys.argv[3]
ks = keys(settings, "race")
if who == "A":  # held between its scan and its key generation until B has rotated
    made = K.Pkcs11KeyService._make_aes
    def held(self, *args):
        (work / "A-scanned").touch()
        wait_for("B-done")
        return made(self, *args)
    K.Pkcs11KeyService._make_aes = held
else:
    wait_for("A-scanned")
ks.rotate()
if who == "B":
    (work / "B-done").touch()
dk = ks.generate_data_key({"vault": "v", "kind": "pack"})
(work / f"{who}.json").write_text(json.dumps({"pt": dk.plaintext.hex(), "w": dk.wrapped.hex()}))
ks.close()
"""


def test_two_processes_rotating_at_once_lose_no_data_key(hsm: Hsm, tmp_path: Path) -> None:
    hsm.keys("race").close()  # version 1 and the seal pair
    settings = hsm.settings("race")
    code = _ROTATE
    a = child(code.replace("sys.argv[3]", '"A"'), settings, tmp_path)
    b = child(code.replace("sys.argv[3]", '"B"'), settings, tmp_path)
    outs = [p.communicate(timeout=120)[0] for p in (a, b)]
    assert a.returncode == b.returncode == 0, outs
    restarted = hsm.keys("race", create=False)  # a restart: a new process's view
    try:
        for who in ("A", "B"):
            done = json.loads((tmp_path / f"{who}.json").read_text())
            wrapped = bytes.fromhex(done["w"])
            assert restarted.unwrap(wrapped, {"vault": "v", "kind": "pack"}).hex() == done["pt"]
        twos = [k for k in objects(restarted, ObjectClass.SECRET_KEY) if k.label.endswith("-2")]
        ids = {bytes(k[Attribute.ID]) for k in twos}
        assert len(twos) == 2 and len(ids) == 2  # the race happened, and each has its id
        # every process that sees both picks the same: the lower id
        lowest = min(ids)
        assert restarted.key_id.endswith(f"-2#{lowest[:8].hex()}")
    finally:
        restarted.close()


# ------------------------------------------------------------- 2: a seal pair without ids


def test_a_seal_pair_left_without_ids_still_unseals_and_is_repaired(hsm: Hsm) -> None:
    keys = hsm.keys("noid")

    def replace_pair(session: Any) -> None:
        # what a kill -9 between C_GenerateKeyPair and C_SetAttributeValue(CKA_ID) left
        for kind in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in session.get_objects({Attribute.CLASS: kind}):
                obj.destroy()
        session.generate_keypair(KeyType.RSA, 2048, label="regionvault-seal", store=True)

    on_session(keys, replace_pair)
    keys.close()
    again = hsm.keys("noid")  # the re-run
    try:
        sealed = again.sealer().seal(b"secret", CTX)
        assert again.unseal(sealed, CTX) == b"secret"
        private = objects(again, ObjectClass.PRIVATE_KEY)
        public = objects(again, ObjectClass.PUBLIC_KEY)
        assert len(private) == len(public) == 1
        assert len(private[0][Attribute.ID]) == 16
        assert public[0][Attribute.ID] == private[0][Attribute.ID]
    finally:
        again.close()


# ------------------------------------------------------------- 3: sessions and errors


# python-pkcs11's object search on a dead session raises, then raises again from its
# finaliser (C_FindObjectsFinal on the same dead handle): that second one is only reported
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_lost_session_is_reopened_once(hsm: Hsm) -> None:
    keys = hsm.keys("lost")
    try:
        dk = keys.generate_data_key(CTX)
        sealed = keys.sealer().seal(b"s", CTX)
        for call in (
            lambda: keys.unwrap(dk.wrapped, CTX),
            lambda: keys.unseal(sealed, CTX),
            lambda: keys.generate_data_key(CTX),
            lambda: keys.rotate(),
        ):
            assert keys._shared is not None
            keys._shared.session.close()  # as after an HSM restart or failover
            call()
        assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    finally:
        keys.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_a_session_lost_again_after_reopening_is_transient(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = hsm.keys("lost")
    try:
        login = _SharedSession._login

        def dead(self: _SharedSession, *args: Any) -> Any:
            session = login(self, *args)
            session.close()
            return session

        monkeypatch.setattr(_SharedSession, "_login", dead)
        assert keys._shared is not None
        keys._shared.session.close()
        with pytest.raises(
            TransientError, match=r"rv-t-lost.*wrap a data key.*SessionHandleInvalid"
        ):
            keys.generate_data_key(CTX)
        monkeypatch.setattr(_SharedSession, "_login", login)
        keys.generate_data_key(CTX)  # the HSM is back: the next call reopens
    finally:
        keys.close()


def test_a_token_that_is_away_at_start_is_transient(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    def away(self: _SharedSession, *args: Any) -> Any:
        raise p11.DeviceRemoved()

    monkeypatch.setattr(_SharedSession, "_login", away)
    with pytest.raises(TransientError, match=r"rv-t-lost.*DeviceRemoved"):
        hsm.keys("lost")
    assert not [k for k in _SharedSession._open if k[1] == TOKENS["lost"][0]]


class _Failing:
    """A key object whose calls raise ``error`` (an injected token answer)."""

    def __init__(self, real: Any, error: type[p11.PKCS11Error], *, encrypt: bool = False) -> None:
        self.real, self.error, self.fail_encrypt = real, error, encrypt

    def __getitem__(self, item: Any) -> Any:
        return self.real[item]

    def decrypt(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    def encrypt(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_encrypt:
            raise self.error()
        return self.real.encrypt(*args, **kwargs)


def _inject_wrapping(keys: Pkcs11KeyService, make: Any) -> None:
    wrap_key = keys_module._WrapKey
    keys._wrapping = [wrap_key(k.version, k.key_id, make(k.obj)) for k in keys._wrapping]


@pytest.mark.parametrize("error", [p11.EncryptedDataInvalid, p11.EncryptedDataLenRange])
def test_a_refused_ciphertext_is_access_denied(
    inject: Pkcs11KeyService, error: type[p11.PKCS11Error]
) -> None:
    dk = inject.generate_data_key(CTX)
    sealed = inject.sealer().seal(b"s", CTX)
    _inject_wrapping(inject, lambda obj: _Failing(obj, error))
    with pytest.raises(KeyAccessDenied, match="does not open this data key"):
        inject.unwrap(dk.wrapped, CTX)
    inject._seal_keys = {k: _Failing(v, error) for k, v in inject._seal_keys.items()}
    with pytest.raises(KeyAccessDenied, match="refused the envelope"):
        inject.unseal(sealed, CTX)


def test_a_general_error_from_a_token_in_trouble_is_not_access_denied(
    inject: Pkcs11KeyService,
) -> None:
    # SoftHSM says CKR_GENERAL_ERROR for a GCM tag that does not verify; a token that also
    # fails the probe right after is in trouble: a KeyServiceError, never "altered data"
    dk = inject.generate_data_key(CTX)
    _inject_wrapping(inject, lambda obj: _Failing(obj, p11.GeneralError, encrypt=True))
    with pytest.raises(KeyServiceError) as caught:
        inject.unwrap(dk.wrapped, CTX)
    assert not isinstance(caught.value, KeyAccessDenied)
    assert "rv-t-inject" in str(caught.value) and "unwrap a data key" in str(caught.value)


def test_a_general_error_for_an_altered_tag_is_access_denied(inject: Pkcs11KeyService) -> None:
    dk = inject.generate_data_key(CTX)
    altered = dk.wrapped[:-1] + bytes([dk.wrapped[-1] ^ 1])
    with pytest.raises(KeyAccessDenied):  # SoftHSM's real CKR_GENERAL_ERROR, probe passes
        inject.unwrap(altered, CTX)


def test_any_other_token_error_names_the_token_and_the_operation(
    inject: Pkcs11KeyService,
) -> None:
    _inject_wrapping(inject, lambda obj: _Failing(obj, p11.FunctionFailed, encrypt=True))
    with pytest.raises(
        KeyServiceError, match=r"'rv-t-inject': wrap a data key failed \(FunctionFailed"
    ):
        inject.generate_data_key(CTX)


# ------------------------------------------------------------- 4: two regions, one token


def test_two_regions_on_one_token_and_prefix_are_refused_in_a_process(hsm: Hsm) -> None:
    a = Pkcs11Provider().key_service(hsm.region("shared", name="edge-a"))
    try:
        with pytest.raises(ConfigError) as caught:
            Pkcs11Provider().key_service(hsm.region("shared", name="edge-b"))
        assert caught.value.key == 'regions."pkcs11:edge-b".key_label_prefix'
        assert "must not share a token and prefix" in str(caught.value)
        # the same region twice (two sites loaded) is one region
        Pkcs11Provider().key_service(hsm.region("shared", name="edge-a")).close()
    finally:
        a.close()


def test_a_second_region_with_another_pin_is_refused(hsm: Hsm) -> None:
    a = Pkcs11Provider().key_service(hsm.region("shared", name="edge-a"))
    try:
        region = hsm.region("shared", name="edge-c", key_label_prefix="other")
        Path(region.settings["pin_file"]).write_text("not-the-pin\n", encoding="utf-8")
        with pytest.raises(KeyAccessDenied, match="another PIN"):
            Pkcs11Provider().key_service(region)
    finally:
        hsm.settings("shared")  # the right PIN back
        a.close()


def test_a_region_cannot_open_another_regions_wraps_or_seals_on_a_shared_key(hsm: Hsm) -> None:
    # two regions on one token and prefix, one after the other (as two processes would)
    a = Pkcs11Provider().key_service(hsm.region("shared", name="edge-a"))
    dk = a.generate_data_key(CTX)
    sealed = a.sealer().seal(b"for a", CTX)
    a.close()
    b = Pkcs11Provider().key_service(hsm.region("shared", name="edge-b"))
    try:
        with pytest.raises(KeyAccessDenied):
            b.unwrap(dk.wrapped, CTX)
        with pytest.raises(KeyAccessDenied):
            b.unseal(sealed, CTX)
    finally:
        b.close()


# ------------------------------------------------------------- 5: a token that makes its own IV


class _OwnIv:
    """A token that ignores the caller's GCM IV (Luna in FIPS mode, CloudHSM) and either uses
    its own, or appends it to the output."""

    def __init__(self, real: Any, append: bool) -> None:
        self.real, self.append = real, append

    def __getitem__(self, item: Any) -> Any:
        return self.real[item]

    def encrypt(self, data: bytes, *, mechanism: Any, mechanism_param: GCMParams) -> bytes:
        iv = os.urandom(12)
        out = bytes(
            self.real.encrypt(
                data, mechanism=mechanism, mechanism_param=GCMParams(iv, mechanism_param.aad, 128)
            )
        )
        return out + iv + bytes(4) if self.append else out

    def decrypt(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.decrypt(*args, **kwargs)


@pytest.mark.parametrize("append", [False, True], ids=["own-iv", "iv-appended"])
def test_a_wrap_that_does_not_unwrap_in_the_token_is_never_returned(
    inject: Pkcs11KeyService, append: bool
) -> None:
    _inject_wrapping(inject, lambda obj: _OwnIv(obj, append))
    with pytest.raises(KeyServiceError, match="does not unwrap in the token"):
        inject.generate_data_key(CTX)


# ------------------------------------------------------------- 6: a rotation by another process

_ROTATE_ONCE = """
ks = keys(settings, "stale")
print(ks.rotate())
ks.close()
"""


def test_a_rotation_by_another_process_is_used(
    hsm: Hsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = Pkcs11Provider().key_service(hsm.region("stale"))
    try:
        before = daemon.key_id
        monkeypatch.setattr(keys_module, "RESCAN_SECONDS", 0.0, raising=False)  # the view is old
        rotated = finish(child(_ROTATE_ONCE, hsm.settings("stale"), tmp_path)).strip()
        assert rotated != before
        assert daemon.generate_data_key(CTX).key_id == rotated == daemon.key_id
        monkeypatch.setattr(keys_module, "RESCAN_SECONDS", 3600.0)  # and on demand
        again = finish(child(_ROTATE_ONCE, hsm.settings("stale"), tmp_path)).strip()
        assert daemon.generate_data_key(CTX).key_id == rotated  # within the bound
        assert daemon.refresh() == again == daemon.generate_data_key(CTX).key_id
    finally:
        daemon.close()


# ------------------------------------------------------------- 7: fork


def test_a_forked_child_initialises_the_module_and_logs_in_again(hsm: Hsm) -> None:
    keys = hsm.keys("fork")
    try:
        dk = keys.generate_data_key(CTX)
        assert keys._shared is not None
        parent_session = keys._shared.session
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through the pipe)
            report: dict[str, Any] = {}
            try:
                report["opened"] = keys.unwrap(dk.wrapped, CTX) == dk.plaintext
                shared = keys._shared
                report["own_session"] = shared is not None and shared.session is not parent_session
                report["generated"] = bool(keys.generate_data_key(CTX).plaintext)
            except BaseException as exc:
                report["error"] = repr(exc)
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = json.loads(pipe.read() or b"{}")
        os.waitpid(pid, 0)
        assert report == {"opened": True, "own_session": True, "generated": True}
        assert keys._shared is not None and keys._shared.session is parent_session
        assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext  # the parent's session still works
    finally:
        keys.close()


# ------------------------------------------------------------- 8: a second SoftHSM configuration

_TWO_CONFS = """
os.environ["SOFTHSM2_CONF"] = settings["softhsm_conf"]  # the host's SoftHSM
first = dict(settings); del first["softhsm_conf"]
keys(first, "one").close()
other = {**settings, "softhsm_conf": str(work / "other.conf")}
try:
    keys(other, "two")
except Exception as exc:
    print(type(exc).__name__, getattr(exc, "key", None), os.environ["SOFTHSM2_CONF"])
"""


def test_a_softhsm_conf_after_the_module_loaded_is_refused_naming_it(
    hsm: Hsm, tmp_path: Path
) -> None:
    SoftHsm(tmp_path)  # writes tmp_path/softhsm2.conf
    (tmp_path / "softhsm2.conf").rename(tmp_path / "other.conf")
    out = finish(child(_TWO_CONFS, hsm.settings("made"), tmp_path)).split()
    assert out == ["ConfigError", 'regions."pkcs11:two".softhsm_conf', str(hsm.soft.conf)]


# ------------------------------------------------------------- 9: leaks and key templates


def test_a_constructor_that_fails_after_login_leaves_no_session(hsm: Hsm) -> None:
    with pytest.raises(ConfigError, match="set create = true"):
        hsm.keys("empty", create=False)
    assert not [k for k in _SharedSession._open if k[1] == TOKENS["empty"][0]]


def test_the_keys_can_do_their_one_job_only(east: Pkcs11KeyService) -> None:
    for key in objects(east, ObjectClass.SECRET_KEY):
        assert key[Attribute.ENCRYPT] is True and key[Attribute.DECRYPT] is True
        for attr in (
            Attribute.SIGN,
            Attribute.VERIFY,
            Attribute.WRAP,
            Attribute.UNWRAP,
            Attribute.DERIVE,
        ):
            assert key[attr] is False, attr
        assert key[Attribute.ALLOWED_MECHANISMS] == [Mechanism.AES_GCM]
        with pytest.raises(KeyServiceError, match="MechanismInvalid"):  # no ECB oracle of it
            east._run("audit", lambda s, k=key: k.encrypt(bytes(16), mechanism=Mechanism.AES_ECB))
    (private,) = objects(east, ObjectClass.PRIVATE_KEY)
    assert private[Attribute.DECRYPT] is True
    for attr in (Attribute.SIGN, Attribute.SIGN_RECOVER, Attribute.UNWRAP, Attribute.DERIVE):
        assert private[attr] is False, attr
    assert private[Attribute.ALLOWED_MECHANISMS] == [Mechanism.RSA_PKCS_OAEP]
    (public,) = objects(east, ObjectClass.PUBLIC_KEY)
    assert public[Attribute.ENCRYPT] is True
    assert public[Attribute.VERIFY] is False and public[Attribute.WRAP] is False


def test_a_token_that_does_not_know_allowed_mechanisms_still_gets_its_keys() -> None:
    asked: list[dict[Any, Any]] = []

    def generate(extra: dict[Any, Any]) -> str:
        asked.append(extra)
        if extra:
            raise p11.AttributeTypeInvalid()
        return "key"

    assert Pkcs11KeyService._restricted(generate, Mechanism.AES_GCM) == "key"
    assert asked == [{Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]}, {}]


# ------------------------------------------------------------- 10: PINs


def test_a_pin_file_open_to_others_is_refused(hsm: Hsm) -> None:
    region = hsm.region("east")
    pin_file = Path(region.settings["pin_file"])
    assert pin_file.stat().st_mode & 0o777 == 0o600
    pin_file.chmod(0o644)
    try:
        with pytest.raises(ConfigError, match=r"chmod 600") as caught:
            Pkcs11Provider().key_service(region)
        assert caught.value.key == 'regions."pkcs11:east".pin_file'
    finally:
        pin_file.chmod(0o600)


def test_a_failed_token_init_does_not_print_the_pin(tmp_path: Path) -> None:
    soft = SoftHsm(tmp_path)
    pin = "secret-pin-4711" * 20  # over softhsm2-util's 255 characters: it fails
    with pytest.raises(RuntimeError) as caught:
        soft.init_token("rv-t-fails", pin)
    assert "secret-pin-4711" not in str(caught.value) and "so-pin" not in str(caught.value)
    assert "rv-t-fails" in str(caught.value)


def test_a_pin_file_is_written_owner_only(tmp_path: Path) -> None:
    from regionvault.providers.pkcs11.conformance import write_pin_file

    path = tmp_path / "a.pin"
    old = os.umask(0)  # the most open umask there is
    try:
        write_pin_file(path, "1234")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text(encoding="utf-8") == "1234\n"
