"""Fixtures of the pkcs11 provider's tests: python-pkcs11 against SoftHSMv2 tokens.

SoftHSM reads its configuration (``SOFTHSM2_CONF``) and lists its tokens once, when a process
first loads it: so this session makes one SoftHSM configuration in a temporary directory and
every token its tests use, all before any test loads the module (the conformance run, in a
child process, makes its own). Without SoftHSM every test here skips with the one line of
``softhsm.missing()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "pkcs11", reason="the pkcs11 tests need python-pkcs11: pip install -e '.[test]'"
)

from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.pkcs11.conformance import write_pin_file
from regionvault.providers.pkcs11.keys import Pkcs11KeyService
from regionvault.providers.pkcs11.provider import Pkcs11Provider
from regionvault.providers.pkcs11.softhsm import SoftHsm, missing

#: token name -> (label, PIN); "empty" never gets keys; the others below "made" are each one
#: test's of test_pkcs11_robustness.py (SoftHSM lists its tokens once a process: all made here)
TOKENS = {
    "east": ("rv-t-east", "1234-east"),
    "west": ("rv-t-west", "1234-west"),
    "empty": ("rv-t-empty", "1234-empty"),
    "made": ("rv-t-made", "1234-made"),
    "race": ("rv-t-race", "1234-race"),
    "noid": ("rv-t-noid", "1234-noid"),
    "lost": ("rv-t-lost", "1234-lost"),
    "shared": ("rv-t-shared", "1234-shared"),
    "stale": ("rv-t-stale", "1234-stale"),
    "fork": ("rv-t-fork", "1234-fork"),
    "inject": ("rv-t-inject", "1234-inject"),
}


@dataclass
class Hsm:
    """The session's SoftHSM: its configuration and directory."""

    soft: SoftHsm
    workdir: Path

    def settings(self, token: str, **extra: Any) -> dict[str, Any]:
        """pkcs11 settings for ``token`` (a name of :data:`TOKENS`), its PIN in a file."""
        label, pin = TOKENS[token]
        pin_file = self.workdir / f"{token}.pin"
        write_pin_file(pin_file, pin)
        return {
            "token_label": label,
            "pin_file": pin_file.as_posix(),
            "softhsm_conf": self.soft.conf.as_posix(),
            "create": True,
            **extra,
        }

    def region(self, token: str, name: str | None = None, **extra: Any) -> RegionConfig:
        settings = self.settings(token, **extra)
        return RegionConfig(
            id=RegionId("pkcs11", name or token),
            settings=settings,
            services={"keys": ServiceConfig("pkcs11", settings)},
            base_dir=self.workdir,
        )

    def keys(self, token: str, **extra: Any) -> Pkcs11KeyService:
        return Pkcs11Provider().key_service(self.region(token, **extra))


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("softhsm")
    soft = SoftHsm(workdir)
    for label, pin in TOKENS.values():
        soft.init_token(label, pin)
    return Hsm(soft, workdir)


@pytest.fixture
def east(hsm: Hsm) -> Iterator[Pkcs11KeyService]:
    keys = hsm.keys("east")
    yield keys
    keys.close()


@pytest.fixture
def west(hsm: Hsm) -> Iterator[Pkcs11KeyService]:
    keys = hsm.keys("west")
    yield keys
    keys.close()
