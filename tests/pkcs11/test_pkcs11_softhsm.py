"""The SoftHSM launcher (providers/pkcs11/softhsm.py): what ``install`` says when it cannot
install, and that ``install`` is a no-op where SoftHSM is present; and a composed site whose
region takes its keys from pkcs11 and the rest from the local provider."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pkcs11_world import TOKENS, Hsm
from regionvault.core.site import Site
from regionvault.providers.pkcs11 import softhsm
from regionvault.providers.pkcs11.__main__ import main as export_main
from regionvault.providers.pkcs11.keys import Pkcs11KeyService
from regionvault.providers.pkcs11.sealing import Pkcs11Sealer


def test_install_without_apt_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softhsm, "find_util", lambda: None)
    monkeypatch.setattr(softhsm.shutil, "which", lambda name: None)
    line = softhsm.install()
    assert line == "SoftHSMv2 is missing and there is no apt-get here: install softhsm2 by hand"
    assert "softhsm2" in (softhsm.missing() or "")


def test_install_without_root_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softhsm, "find_util", lambda: None)
    monkeypatch.setattr(softhsm.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(softhsm.os, "geteuid", lambda: 1000)
    assert "needs root" in softhsm.install()


def test_install_where_softhsm_is_present_names_it(hsm: Hsm) -> None:
    line = softhsm.install()
    assert line.startswith("SoftHSMv2: ") and "libsofthsm2.so" in line


def test_a_composed_site_takes_keys_from_pkcs11_and_the_rest_from_local(
    hsm: Hsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label, pin = TOKENS["east"]
    monkeypatch.setenv("RV_EDGE_PIN", pin)
    keys = hsm.keys("east")
    pem = tmp_path / "edge.pub.pem"
    pem.write_bytes(keys.public_key_pem())
    keys.close()
    site_file = tmp_path / "site.toml"
    site_file.write_text(
        f"""[site]
name = "edge"

[regions."pkcs11:edge"]
token_label = "{label}"
pin_env = "RV_EDGE_PIN"
softhsm_conf = "{hsm.soft.conf}"
public_key = "edge.pub.pem"

[regions."pkcs11:edge".vault]
provider = "local"
root = "local"

[regions."pkcs11:edge".compute]
provider = "local"
root = "local"
""",
        encoding="utf-8",
    )
    # the operator's export of the public key, through the site (main of __main__.py)
    out = tmp_path / "exported.pem"
    assert export_main(["export-public-key", str(site_file), "pkcs11:edge", str(out)]) == 0
    assert out.read_bytes() == pem.read_bytes()
    with Site.load(site_file) as site:
        region = site.region("pkcs11:edge")
        assert isinstance(region.keys, Pkcs11KeyService)
        assert region.vault.provider == "local" and region.compute.provider == "local"
        sealer = region.sealer()
        assert isinstance(sealer, Pkcs11Sealer)
        context = {"vault": "v", "kind": "k", "name": "n"}
        assert region.keys.unseal(sealer.seal(b"edge", context), context) == b"edge"
    assert "RV_EDGE_PIN" in os.environ and pin not in site_file.read_text(encoding="utf-8")


def test_threads_share_the_token_session(east: Pkcs11KeyService) -> None:
    context = {"vault": "v", "kind": "k", "name": "threads"}
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                key = east.generate_data_key(context)
                assert east.unwrap(key.wrapped, context) == key.plaintext
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
