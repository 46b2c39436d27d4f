"""The pkcs11 provider's support for the conformance suite: a throwaway two-region site,
``pkcs11:east`` replicating to ``pkcs11:west``, whose keys are two SoftHSMv2 tokens (one per
region, under one SoftHSM configuration in the run's directory: SoftHSM reads its
configuration once a process) and whose compute and vault, which this provider does not
offer, come from the local provider::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=pkcs11

Each region's keys are made here first (``create``), and the PEM of its public key exported
from its token into a file that the region's ``public_key`` names: the Sealer other regions
(and the suite's other process) build from configuration alone reads only that file. The
PINs are in files (``pin_file``), never in site.toml.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.conformance.support import ConformanceSupport
from regionvault.core.errors import UnsupportedOperation
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig

__all__ = ["REGIONS", "Pkcs11ConformanceSupport", "make_tokens", "write_pin_file"]

#: the test regions: site name -> (token label, PIN)
REGIONS = {"east": ("rv-east", "4711-east"), "west": ("rv-west", "4711-west")}


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_pin_file(path: Path, pin: str) -> None:
    """A PIN file readable by its owner only from its first byte (``O_CREAT`` with 0600, not
    a chmod after the PIN is in it)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(pin + "\n")


def make_tokens(workdir: Path) -> dict[str, dict[str, str]]:
    """A SoftHSM configuration under ``workdir`` with a token per test region, its keys made
    and its public key exported: region name -> its pkcs11 settings."""
    from regionvault.providers.pkcs11.provider import Pkcs11Provider
    from regionvault.providers.pkcs11.softhsm import SoftHsm, missing

    reason = missing()
    if reason is not None:
        raise UnsupportedOperation(f"SoftHSM tokens ({reason})", provider="pkcs11")
    hsm = SoftHsm(workdir / "softhsm")
    provider = Pkcs11Provider()
    out: dict[str, dict[str, str]] = {}
    # every token first: SoftHSM lists the tokens it finds when a process loads it
    for label, pin in REGIONS.values():
        hsm.init_token(label, pin)
    for name, (label, pin) in REGIONS.items():
        pin_file = workdir / f"{name}.pin"
        write_pin_file(pin_file, pin)
        settings: dict[str, str] = {
            "token_label": label,
            "pin_file": pin_file.as_posix(),
            "softhsm_conf": hsm.conf.as_posix(),
            "public_key": (workdir / f"{name}.pub.pem").as_posix(),
        }
        config = RegionConfig(
            id=RegionId("pkcs11", name),
            settings={**settings, "create": True},
            services={"keys": ServiceConfig("pkcs11", {**settings, "create": True})},
            base_dir=workdir,
        )
        keys = provider.key_service(config)
        try:
            Path(settings["public_key"]).write_bytes(keys.public_key_pem())
        finally:
            keys.close()
        out[name] = settings
    return out


class Pkcs11ConformanceSupport(ConformanceSupport):
    """Two regions whose keys are SoftHSM tokens and whose compute and vault are local."""

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        regions = make_tokens(workdir)
        lines = ['[site]\nname = "conformance-pkcs11"\n']
        for name, settings in regions.items():
            lines.append(f'[regions."pkcs11:{name}"]')
            lines.extend(f"{k} = {_q(v)}" for k, v in settings.items())
            root = _q((workdir / "local" / name).as_posix())
            for service in ("compute", "vault"):
                lines.append(f'\n[regions."pkcs11:{name}".{service}]')
                lines.append(f'provider = "local"\nroot = {root}')
            lines.append("")
        lines.append('[[replication]]\nfrom = "pkcs11:east"\nto = "pkcs11:west"\n')
        path = workdir / "site.toml"
        path.write_text("\n".join(lines), encoding="utf-8")
        yield path
