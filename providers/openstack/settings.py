"""The openstack provider's site.toml settings for one region, checked without touching the
cloud or importing apache-libcloud (docs/edge-compute.md describes every key).

The password is never in site.toml: ``password_env`` names the environment variable that
holds it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = ["OPTIONAL_SETTINGS", "REQUIRED_SETTINGS", "OpenStackSettings", "is_loopback"]

REQUIRED_SETTINGS: frozenset[str] = frozenset({"auth_url", "username", "project", "password_env"})
OPTIONAL_SETTINGS = frozenset(
    {
        "domain",
        "service_region",
        "flavor",
        "timeout",
        "wait_timeout",
        "wait_per_gib",
        "poll_interval",
        "max_poll_interval",
        "scratch_dir",
    }
)

_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (``localhost`` or a loopback address)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OpenStackSettings:
    """One region's openstack settings."""

    region: str
    #: keystone v3's URL (``https://keystone.example:5000``; plain http only on loopback)
    auth_url: str
    username: str
    project: str
    #: the environment variable holding the user's password
    password_env: str
    #: the user's and the project's keystone domain
    domain: str = "Default"
    #: the catalog's region whose endpoints are used
    service_region: str = "RegionOne"
    #: the flavor a restore boots when the point does not name the original one
    flavor: str | None = None
    #: seconds one request may take
    timeout: int = 120
    #: seconds to wait for a snapshot, a volume, an image or a server to become ready (or
    #: gone), plus ``wait_per_gib`` for each GiB of the volume or image it holds
    wait_timeout: float = 600.0
    #: seconds more per GiB (30 s: a copy at about 34 MiB/s, LVM-thick or an upload to glance)
    wait_per_gib: float = 30.0
    #: seconds between the first two looks at something not ready yet; each later wait is
    #: half as long again, up to ``max_poll_interval``
    poll_interval: float = 0.2
    max_poll_interval: float = 10.0
    #: the directory where a restore writes each disk before uploading it to glance: the
    #: decrypted disk, whole (sparse); swept of a dead process's files at each restore
    scratch_dir: str = field(default_factory=tempfile.gettempdir)

    @property
    def secure(self) -> bool:
        """https, unless the endpoint is plain http on a loopback address (a local fake)."""
        return urlsplit(self.auth_url).scheme != "http"

    def password(self, region: RegionConfig) -> str:
        value = os.environ.get(self.password_env)
        if not value:
            raise ConfigError(
                f"the environment variable {self.password_env} it names is not set",
                file=region.source,
                key=region.key("password_env"),
                provider="openstack",
                region=region.name,
            )
        return value

    @classmethod
    def from_region(cls, region: RegionConfig) -> OpenStackSettings:
        """Parse and check ``region.settings``; :class:`ConfigError` names the bad key."""
        s = region.settings

        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(
                message, file=region.source, key=region.key(key), provider="openstack",
                region=region.name,
            )  # fmt: skip

        values: dict[str, Any] = {"region": region.name}
        for key in [*sorted(REQUIRED_SETTINGS), "domain", "service_region", "flavor"]:
            value = s.get(key)
            if value is None:
                if key in REQUIRED_SETTINGS:
                    raise bad(key, "missing (the openstack provider needs it)")
                continue
            if not isinstance(value, str) or not value:
                raise bad(key, f"must be a non-empty string, not {value!r}")
            values[key] = value
        if "password" in s:
            raise bad(
                "password", "never in site.toml: name its environment variable in password_env"
            )
        if not _ENV.match(values["password_env"]):
            raise bad("password_env", f"{values['password_env']!r} is not a variable's name")
        url = urlsplit(values["auth_url"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise bad("auth_url", f"{values['auth_url']!r} is not an http(s) URL")
        if url.scheme == "http" and not is_loopback(url.hostname):
            raise bad("auth_url", "plain http only to a loopback address; use https")
        scratch = s.get("scratch_dir")
        if scratch is not None:
            if not isinstance(scratch, str) or not scratch:
                raise bad("scratch_dir", f"must be a directory's path, not {scratch!r}")
            if not Path(scratch).is_absolute():
                raise bad("scratch_dir", f"{scratch!r} is not an absolute path")
            values["scratch_dir"] = scratch
        numbers = (
            ("timeout", int),
            ("wait_timeout", float),
            ("wait_per_gib", float),
            ("poll_interval", float),
            ("max_poll_interval", float),
        )
        for key, kind in numbers:
            value = s.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise bad(key, f"must be a positive number, not {value!r}")
            if kind is int and not isinstance(value, int):
                raise bad(key, f"must be a whole number, not {value!r}")
            values[key] = kind(value)
        return cls(**values)
