"""The libcloud provider's site.toml settings for one region, checked without touching the
store or importing apache-libcloud (docs/edge-vault.md describes every key).

The credentials are never in site.toml: ``key_env`` and ``secret_env`` name the environment
variables that hold them (the access key and secret of S3, MinIO and Ceph RGW; the account
name and its base64 account key of Azure Blobs; the keystone user and password of Swift).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = [
    "AWS_S3_REGIONS",
    "DRIVERS",
    "NOT_OFFERED",
    "OPTIONAL_SETTINGS",
    "REQUIRED_SETTINGS",
    "LibcloudSettings",
]

MiB = 1024 * 1024

#: the drivers offered: name -> (the libcloud driver, conditional puts by default). MinIO
#: and Ceph RGW speak S3 and are reached through the S3 driver with a ``host``; AWS S3 and
#: MinIO honour ``If-None-Match: *`` on PUT, Azure Blob Storage (and Azurite) too; Ceph RGW
#: releases differ, so a ceph region claims it only with ``conditional_put = true``. Swift
#: checks ``If-None-Match: *`` when a PUT arrives, not when it lands (swift/obj/server.py,
#: ``_pre_create_checks``): two PUTs in flight at once both succeed, so a Swift region claims
#: it only with ``conditional_put = true`` (docs/edge-vault.md says when that is safe).
DRIVERS: dict[str, tuple[str, bool]] = {
    "s3": ("s3", True),
    "minio": ("s3", True),
    "ceph": ("s3", False),
    "azure_blobs": ("azure_blobs", True),
    "openstack_swift": ("openstack_swift", False),
}

_S3_ALIAS = 'an AWS S3 region alias: use driver = "s3" with s3_region'
_UNPROVEN = "conditional_put = false until the store is shown to answer 412 to If-None-Match: *"

#: every other name in libcloud's storage DRIVERS (3.9.1; its s3, minio, azure_blobs and
#: openstack_swift are offered, minio as the S3 driver with host): why it is not offered and
#: what to use instead. tests/libcloud/test_libcloud_settings.py fails when libcloud lists a name in
#: neither table, so a libcloud upgrade's new driver gets decided, not silently refused.
NOT_OFFERED: dict[str, str] = {
    **{
        name: _S3_ALIAS
        for name in (
            "s3_us_east_2",
            "s3_us_west",
            "s3_us_west_oregon",
            "s3_us_gov_west",
            "s3_cn_north",
            "s3_cn_northwest",
            "s3_eu_west",
            "s3_eu_west_2",
            "s3_eu_central",
            "s3_eu_north_1",
            "s3_ap_south",
            "s3_ap_southeast",
            "s3_ap_southeast2",
            "s3_ap_northeast",
            "s3_ap_northeast_1",
            "s3_ap_northeast_2",
            "s3_sa_east",
            "s3_ca_central",
        )
    },
    "s3_rgw": 'Ceph RGW\'s S3 API: use driver = "ceph" with host',
    "s3_rgw_outscale": (
        "Outscale's object storage through libcloud's RGW driver: use driver = \"s3\" with "
        f"host and s3_region, {_UNPROVEN}"
    ),
    "digitalocean_spaces": (
        f'Spaces speaks S3: use driver = "s3" with host = "<region>.digitaloceanspaces.com", '
        f"{_UNPROVEN}"
    ),
    "scaleway": (
        'Scaleway Object Storage speaks S3: use driver = "s3" with host = '
        f'"s3.<region>.scw.cloud", {_UNPROVEN}'
    ),
    "ovh": (
        f'OVHcloud Object Storage speaks S3: use driver = "s3" with its host, {_UNPROVEN}; or '
        'driver = "openstack_swift" against OVHcloud\'s Swift endpoint'
    ),
    "google_storage": (
        "Cloud Storage: use the gcp provider, which reaches it natively with generation "
        "preconditions (ifGenerationMatch=0 for an if-absent put)"
    ),
    "backblaze_b2": (
        "B2's native API has no conditional create: use B2's S3-compatible endpoint through "
        'driver = "s3" with host = "s3.<region>.backblazeb2.com" and s3_region, '
        f"{_UNPROVEN}"
    ),
    "aliyun_oss": (
        "Alibaba OSS's native API: its create-if-absent is a header of its own "
        "(x-oss-forbid-overwrite) that this provider does not send"
    ),
    "cloudfiles": (
        "Rackspace Cloud Files through Rackspace's own identity service: use "
        'driver = "openstack_swift" against a Swift endpoint with keystone v3'
    ),
    "ktucloud": (
        "KT ucloud storage (Swift behind KT's own identity service): use "
        'driver = "openstack_swift" against a Swift endpoint with keystone v3'
    ),
    "local": "a directory: use the local provider's vault",
    "dummy": "libcloud's in-memory test driver: nothing is stored",
    "ninefold": "Ninefold's Atmos storage, sunset in 2016",
    "nimbus": "Nimbus.io's own API: no conditional create known, and nothing to test it against",
    "auroraobjects": (
        "PCextreme AuroraObjects (S3 at o.auroraobjects.eu), most likely closed "
        '(apache/libcloud#2057); another S3 store: driver = "s3" with host'
    ),
}

#: the largest single PUT each protocol takes: S3's 5 GiB; Azure's Put Blob at the API
#: version libcloud speaks (2018-11-09), 256 MiB; Swift's default max_file_size (5 GiB + 2
#: bytes). An if-absent put is always one PUT; on Swift every put is (no segments).
SINGLE_PUT_MOST = {
    "s3": 5 * 1024 * MiB,
    "azure_blobs": 256 * MiB,
    "openstack_swift": 5 * 1024 * MiB,
}

#: the AWS regions libcloud 3.9.1's S3 driver knows a host of (its REGION_TO_HOST_MAP; a
#: test fails when libcloud's list changes): without ``host``, ``s3_region`` must be one
AWS_S3_REGIONS = frozenset(
    {
        "af-south-1",
        "ap-northeast-1",
        "ap-northeast-2",
        "ap-northeast-3",
        "ap-south-1",
        "ap-southeast-1",
        "ap-southeast-2",
        "ca-central-1",
        "cn-north-1",
        "cn-northwest-1",
        "eu-central-1",
        "eu-north-1",
        "eu-south-1",
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "me-central-1",
        "me-south-1",
        "sa-east-1",
        "sa-east-2",
        "us-east-1",
        "us-east-2",
        "us-gov-east-1",
        "us-gov-west-1",
        "us-west-1",
        "us-west-2",
    }
)
# a signing region's name as S3 stores take it (MinIO's MINIO_SITE_REGION, a Ceph zonegroup)
_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

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
        "auth_url",
        "project",
        "domain",
        "service_region",
    }
)

#: the settings only the openstack_swift driver takes, and the ones it does not (its endpoint
#: and scheme are the ones keystone's catalog lists)
SWIFT_ONLY = frozenset({"auth_url", "project", "domain", "service_region"})
NOT_SWIFT = frozenset({"host", "port", "secure", "s3_region"})

# S3 bucket names (3-63, lower case, digits, '.', '-') and Azure container names (3-63,
# lower case, digits, '-'): the stricter of the two is checked per driver
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AZURE_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
# Swift: a container name is at most 256 bytes, without '/' (swift/common/constraints.py)
_SWIFT_CONTAINER = re.compile(r"^[^/\x00-\x1f\x7f]{1,256}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:.]+\]$")


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LibcloudSettings:
    """One region's libcloud settings."""

    region: str
    #: s3, minio, ceph, azure_blobs or openstack_swift
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
    #: the region requests are signed for: an AWS region (which also gives the host when
    #: ``host`` is not set), or with ``host`` the store's own region name (MinIO, Ceph RGW)
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
    #: openstack_swift: keystone v3's URL (https; plain http only to a loopback address)
    auth_url: str | None = None
    #: openstack_swift: the keystone project (tenant) that owns the Swift account
    project: str | None = None
    #: openstack_swift: the keystone domain of the user and the project
    domain: str = "Default"
    #: openstack_swift: the catalog region of the Swift endpoint (any, when keystone lists one)
    service_region: str | None = None

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
        if driver in NOT_OFFERED:
            raise bad(
                "driver",
                f"libcloud's {driver!r} driver is not offered: {NOT_OFFERED[driver]} "
                f"(offered: {', '.join(DRIVERS)})",
            )
        if driver not in DRIVERS:
            raise bad("driver", f"must be one of {', '.join(DRIVERS)}, not {driver!r}")
        swift = driver == "openstack_swift"
        for key in sorted((NOT_SWIFT if swift else SWIFT_ONLY) & set(s)):
            why = (
                "keystone's catalog gives the Swift endpoint"
                if swift
                else "it is an openstack_swift setting"
            )
            raise bad(key, f"not a setting of the {driver} driver ({why})")
        values: dict[str, Any] = {"region": region.name, "driver": driver}
        pattern = {"azure_blobs": _AZURE_CONTAINER, "openstack_swift": _SWIFT_CONTAINER}.get(
            driver, _S3_BUCKET
        )
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
            if not _REGION_NAME.match(region_name):
                raise bad("s3_region", f"{region_name!r} is not a region name")
            if "host" not in values and region_name not in AWS_S3_REGIONS:
                raise bad(
                    "s3_region",
                    f"{region_name!r} is not an AWS region libcloud's S3 driver knows; a store "
                    "of its own (MinIO, Ceph RGW) with its own region name needs host",
                )
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
        for key in ("auth_url", "project", "domain", "service_region"):
            text = typed(key, str, "a string")
            if text is not None:
                if not text.strip():
                    raise bad(key, "must not be empty")
                values[key] = text
        if swift:
            for key in ("auth_url", "project"):
                if key not in values:
                    raise bad(key, "missing (the openstack_swift driver logs in to keystone v3)")
            url = urlsplit(values["auth_url"])
            if url.scheme not in ("http", "https") or not url.hostname:
                raise bad("auth_url", f"{values['auth_url']!r} is not an http(s) URL")
            if url.scheme == "http" and not _loopback(url.hostname):
                raise bad("auth_url", "plain http only to a loopback address; use https")
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
