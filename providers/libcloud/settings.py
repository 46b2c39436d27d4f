"""The libcloud provider's site.toml settings for one region, checked without touching the
store or importing apache-libcloud (docs/edge-vault.md describes every key).

The credentials are never in site.toml: ``key_env`` and ``secret_env`` name the environment
variables that hold them (the access key and secret of S3, MinIO and Ceph RGW; the account
name and its base64 account key of Azure Blobs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = ["DRIVERS", "OPTIONAL_SETTINGS", "REQUIRED_SETTINGS", "LibcloudSettings"]

MiB = 1024 * 1024

#: the drivers offered: name -> (the libcloud driver, conditional puts by default). MinIO
#: and Ceph RGW speak S3 and are reached through the S3 driver with a ``host``; AWS S3 and
#: MinIO honour ``If-None-Match: *`` on PUT, Azure Blob Storage (and Azurite) too; Ceph RGW
#: releases differ, so a ceph region claims it only with ``conditional_put = true``.
DRIVERS: dict[str, tuple[str, bool]] = {
    "s3": ("s3", True),
    "minio": ("s3", True),
    "ceph": ("s3", False),
    "azure_blobs": ("azure_blobs", True),
}

#: the largest single PUT each protocol takes: S3's 5 GiB; Azure's Put Blob at the API
#: version libcloud speaks (2018-11-09), 256 MiB. An if-absent put is always one PUT.
SINGLE_PUT_MOST = {"s3": 5 * 1024 * MiB, "azure_blobs": 256 * MiB}

REQUIRED_SETTINGS: frozenset[str] = frozenset({"driver"})
OPTIONAL_SETTINGS = frozenset(
    {
        "container",
        "prefix",
        "inbox_container",
        "inbox_prefix",
        "host",
        "port",
        "secure",
        "s3_region",
        "key_env",
        "secret_env",
        "create",
        "conditional_put",
        "single_put_limit",
        "timeout",
    }
)

# S3 bucket names (3-63, lower case, digits, '.', '-') and Azure container names (3-63,
# lower case, digits, '-'): the stricter of the two is checked per driver
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AZURE_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:.]+\]$")


@dataclass(frozen=True)
class LibcloudSettings:
    """One region's libcloud settings."""

    region: str
    #: s3, minio, ceph or azure_blobs
    driver: str
    #: the container (bucket) of the vault
    container: str | None = None
    #: the vault's objects are ``prefix + name`` in the container ("" allowed when the inbox
    #: has a container of its own)
    prefix: str = "vault/"
    #: the container of the transit inbox; the vault's container when not set
    inbox_container: str | None = None
    #: the inbox's payloads are ``inbox_prefix + <source provider>/<source name>/ + name``
    inbox_prefix: str = "inbox/"
    host: str | None = None
    port: int | None = None
    secure: bool = True
    #: the AWS region of an S3 bucket reached without ``host``
    s3_region: str = "us-east-1"
    #: environment variables holding the access key (Azure: the account name) and secret
    key_env: str | None = None
    secret_env: str | None = None
    #: make the containers when missing (tests, first set-up)
    create: bool = False
    #: whether the store honours ``If-None-Match: *`` on PUT (default: the driver's)
    conditional_put: bool = True
    #: objects larger than this are uploaded streamed in parts (S3 multipart, Azure blocks)
    single_put_limit: int = 16 * MiB
    #: seconds one request may take
    timeout: int = 120

    @property
    def libcloud_driver(self) -> str:
        return DRIVERS[self.driver][0]

    @property
    def inbox(self) -> str | None:
        return self.inbox_container or self.container

    def need(self, region: RegionConfig, service: str, *keys: str) -> None:
        """:class:`ConfigError` naming the first of ``keys`` not set and who needs it."""
        for key in keys:
            if getattr(self, key) is None:
                raise ConfigError(
                    f"missing (the libcloud provider needs {key} for the {service})",
                    file=region.source,
                    key=region.key(key),
                    provider="libcloud",
                    region=region.name,
                )

    def credentials(self, region: RegionConfig) -> tuple[str, str]:
        """(key, secret) from the environment variables ``key_env`` and ``secret_env``."""
        self.need(region, "vault", "key_env", "secret_env")
        values = []
        for key in ("key_env", "secret_env"):
            name = getattr(self, key)
            value = os.environ.get(name)
            if not value:
                raise ConfigError(
                    f"the environment variable {name} it names is not set",
                    file=region.source,
                    key=region.key(key),
                    provider="libcloud",
                    region=region.name,
                )
            values.append(value)
        return values[0], values[1]

    @classmethod
    def from_region(cls, region: RegionConfig) -> LibcloudSettings:
        """Parse and check ``region.settings``; :class:`ConfigError` names the bad key."""
        s = region.settings

        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(
                message, file=region.source, key=region.key(key), provider="libcloud",
                region=region.name,
            )  # fmt: skip

        def typed(key: str, kind: type, what: str) -> Any:
            value = s.get(key)
            if value is None:
                return None
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(key, f"must be {what}, not {value!r}")
            if not isinstance(value, kind):
                raise bad(key, f"must be {what}, not {value!r}")
            return value

        driver = typed("driver", str, "a string")
        if driver not in DRIVERS:
            raise bad("driver", f"must be one of {', '.join(DRIVERS)}, not {driver!r}")
        values: dict[str, Any] = {"region": region.name, "driver": driver}
        pattern = _AZURE_CONTAINER if driver == "azure_blobs" else _S3_BUCKET
        for key in ("container", "inbox_container"):
            name = typed(key, str, "a string")
            if name is not None:
                if not pattern.match(name):
                    raise bad(key, f"{name!r} is not a valid {driver} container name")
                values[key] = name
        for key in ("prefix", "inbox_prefix"):
            text = typed(key, str, "a string")
            if text is not None:
                if text and (text.startswith(("/", ".")) or not text.endswith("/")):
                    raise bad(key, f"{text!r} must end with '/' and not start with '/' or '.'")
                values[key] = text
        host = typed("host", str, "a host name or address")
        if host is not None:
            if not _HOST.match(host):
                raise bad("host", f"{host!r} is a host name or address, not a URL")
            values["host"] = host
        port = typed("port", int, "a port number")
        if port is not None:
            if not 0 < port < 65536:
                raise bad("port", f"{port} is not a port number")
            values["port"] = port
        for key in ("secure", "create", "conditional_put"):
            flag = typed(key, bool, "true or false")
            if flag is not None:
                values[key] = flag
        values.setdefault("conditional_put", DRIVERS[driver][1])
        region_name = typed("s3_region", str, "a string")
        if region_name is not None:
            values["s3_region"] = region_name
        for key in ("key_env", "secret_env"):
            env = typed(key, str, "an environment variable's name")
            if env is not None:
                if not _ENV.match(env):
                    raise bad(key, f"{env!r} is not an environment variable's name")
                values[key] = env
        for key, low in (("single_put_limit", 1), ("timeout", 1)):
            number = typed(key, int, "a whole number")
            if number is not None:
                if number < low:
                    raise bad(key, f"must be at least {low}")
                values[key] = number
        limit = values.get("single_put_limit")
        most = SINGLE_PUT_MOST[DRIVERS[driver][0]]
        if limit is not None and limit > most:
            raise bad("single_put_limit", f"is at most {most} bytes with the {driver} driver")
        if driver in ("minio", "ceph") and "host" not in values:
            raise bad("host", f"missing (the {driver} driver reaches the store at a host)")
        settings = cls(**values)
        if settings.inbox == settings.container and settings.container is not None:
            a, b = settings.prefix, settings.inbox_prefix
            if a.startswith(b) or b.startswith(a):
                raise bad(
                    "inbox_prefix",
                    f"{b!r} and the vault's prefix {a!r} overlap in container "
                    f"{settings.container}: give the inbox a container or a prefix of its own",
                )
        return settings
