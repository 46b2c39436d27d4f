"""The pkcs11 provider's site.toml settings for one region, checked without loading the
PKCS#11 module. docs/edge-keys.md describes every key.

The PIN is never a setting: ``pin_env`` names an environment variable that holds it, or
``pin_file`` a file whose first line is it, readable by its owner only (mode 0600: a file open
to its group or others is refused); a key ``pin`` is refused with that advice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = ["OPTIONAL_SETTINGS", "REQUIRED_SETTINGS", "Pkcs11Settings"]

REQUIRED_SETTINGS: frozenset[str] = frozenset({"token_label"})
OPTIONAL_SETTINGS: frozenset[str] = frozenset(
    {
        "module",
        "pin_env",
        "pin_file",
        "pin",  # refused with advice, so that a PIN in site.toml is named, not "unknown key"
        "key_label_prefix",
        "create",
        "public_key",
        "softhsm_conf",
    }
)
#: key labels are ``<prefix>-<n>``; the prefix is what a token label may hold, less odd bytes
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Pkcs11Settings:
    region: str
    token_label: str
    module: Path | None
    pin_env: str | None
    pin_file: Path | None
    key_label_prefix: str
    create: bool
    public_key: Path | None
    softhsm_conf: Path | None

    @classmethod
    def from_region(cls, region: RegionConfig) -> Pkcs11Settings:
        s = region.settings
        if "pin" in s:
            raise region.error(
                "pin",
                "a PIN is never kept in site.toml: name an environment variable that holds it "
                "(pin_env) or a file (pin_file)",
            )
        token = region.get_str("token_label")
        if not token or len(token.encode()) > 32:
            raise region.error("token_label", "must be 1 to 32 bytes (a PKCS#11 token label)")
        pin_env = s.get("pin_env")
        if pin_env is not None and (not isinstance(pin_env, str) or not _ENV.match(pin_env)):
            raise region.error("pin_env", "must be the name of an environment variable")
        pin_file = region.path("pin_file") if "pin_file" in s else None
        if (pin_env is None) == (pin_file is None):
            raise region.error("pin_env", "give exactly one of pin_env and pin_file")
        prefix = region.get_str("key_label_prefix", "regionvault")
        if not _PREFIX.match(prefix):
            raise region.error(
                "key_label_prefix", "must be letters, digits, '_', '.', '-' (at most 41)"
            )
        create = s.get("create", False)
        if not isinstance(create, bool):
            raise region.error("create", f"must be true or false, got {create!r}")
        return cls(
            region=region.name,
            token_label=token,
            module=region.path("module") if "module" in s else None,
            pin_env=pin_env,
            pin_file=pin_file,
            key_label_prefix=prefix,
            create=create,
            public_key=region.path("public_key") if "public_key" in s else None,
            softhsm_conf=region.path("softhsm_conf") if "softhsm_conf" in s else None,
        )

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(
            message, key=f'regions."{self.region}".{key}', provider="pkcs11", region=self.region
        )

    def pin(self) -> str:
        """The user PIN, from the environment variable or the file the settings name."""
        if self.pin_env is not None:
            value = os.environ.get(self.pin_env)
            if not value:
                raise self.error("pin_env", f"the environment variable {self.pin_env} is not set")
            return value
        assert self.pin_file is not None
        try:
            with self.pin_file.open(encoding="utf-8") as file:
                mode = os.fstat(file.fileno()).st_mode
                lines = file.read().splitlines()
        except OSError as exc:
            raise self.error("pin_file", f"cannot read {self.pin_file}: {exc.strerror}") from None
        if mode & 0o077:
            raise self.error(
                "pin_file",
                f"{self.pin_file} is open to its group or others (mode {mode & 0o777:04o}): "
                "a PIN file is readable by its owner only (chmod 600)",
            )
        if not lines or not lines[0].strip():
            raise self.error("pin_file", f"{self.pin_file} is empty")
        return lines[0].strip()
