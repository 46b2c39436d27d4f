"""SoftHSMv2 for tests and trials: find ``softhsm2-util`` and the PKCS#11 module, install
Debian's ``softhsm2`` when missing, and make tokens in a directory of their own::

    python -m regionvault.providers.pkcs11.softhsm install

``install`` runs ``apt-get install softhsm2`` when the tools are missing and this is root
with apt-get; otherwise it prints one line saying why not, and the tests that need SoftHSM
skip with that line (:func:`missing`).

SoftHSM reads ``SOFTHSM2_CONF`` once, when a process first loads the module, so every token a
process uses lies under one configuration: :class:`SoftHsm` is one directory (its
``softhsm2.conf`` and its token directory) holding one token per region.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from regionvault.core.debian import apt_install

__all__ = ["MODULE_PATHS", "SoftHsm", "Token", "find_module", "find_util", "install", "missing"]

#: where Debian, Ubuntu, Fedora and Homebrew put SoftHSM's PKCS#11 module
MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
SO_PIN = "so-pin-0000"


def find_module() -> Path | None:
    """SoftHSM's PKCS#11 module, or None."""
    for path in MODULE_PATHS:
        if Path(path).is_file():
            return Path(path)
    return None


def find_util() -> Path | None:
    found = shutil.which("softhsm2-util")
    return Path(found) if found else None


def missing() -> str | None:
    """None when SoftHSM is here, else one line saying what is missing and how to get it."""
    if find_util() is None or find_module() is None:
        return (
            "SoftHSMv2 is not installed (softhsm2-util and libsofthsm2.so): "
            "python -m regionvault.providers.pkcs11.softhsm install, or apt-get install softhsm2"
        )
    return None


def install() -> str:
    """Install Debian's softhsm2 when it is missing; the one line to print."""
    if missing() is None:
        return f"SoftHSMv2: {find_util()} and {find_module()}"
    failed = apt_install("softhsm2", "SoftHSMv2")
    if failed is not None:
        return failed
    if missing() is not None:
        return f"SoftHSMv2: apt-get install softhsm2 finished, but {missing()}"
    return f"SoftHSMv2 installed: {find_util()} and {find_module()}"


class Token:
    """One initialised token: its label, user PIN and the configuration it lives under."""

    def __init__(self, hsm: SoftHsm, label: str, pin: str) -> None:
        self.hsm = hsm
        self.label = label
        self.pin = pin


class SoftHsm:
    """A SoftHSM configuration in ``directory``: ``softhsm2.conf`` and ``tokens/``."""

    def __init__(self, directory: Path) -> None:
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.directory = directory
        self.tokendir = directory / "tokens"
        self.tokendir.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n",
            encoding="utf-8",
        )
        module = find_module()
        assert module is not None
        self.module = module

    def init_token(self, label: str, pin: str) -> Token:
        util = find_util()
        assert util is not None
        # softhsm2-util reads PINs from the terminal only (not from a pipe), so they go on its
        # command line: test tokens' PINs, never printed (a failure names the label and
        # softhsm2-util's own message, not the command)
        done = subprocess.run(
            [
                str(util),
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                pin,
            ],
            check=False,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip()
            said = said.replace(pin, "***").replace(SO_PIN, "***")
            raise RuntimeError(
                f"softhsm2-util could not make token {label!r} (exit {done.returncode}): {said}"
            )
        return Token(self, label, pin)


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python -m regionvault.providers.pkcs11.softhsm install", file=sys.stderr)
        return 2
    print(install())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
