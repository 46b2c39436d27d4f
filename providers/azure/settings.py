"""The Azure provider's site.toml settings for one region's storage, checked without touching
Azure.

This module parses the Blob Storage keys (the vault and the transit inbox). The Key Vault and
identity keys are parsed by keyvault.py and identity.py and only named here
(:data:`KEY_SETTINGS`); the compute keys are parsed by compute.py and named here
(:data:`COMPUTE_SETTINGS`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.interfaces import ComputeScope
    from regionvault.core.types import RegionConfig

__all__ = [
    "COMPUTE_SETTINGS",
    "KEY_SETTINGS",
    "OPTIONAL_SETTINGS",
    "REQUIRED_SETTINGS",
    "BlobSettings",
    "availability_zone",
    "compute_scope",
    "exclusive_spaces",
]

MiB = 1024 * 1024

#: None is required of every service: the storage keys are needed by the vault and the
#: transit, the Key Vault ones by the keys and the sealer; each service checks its own when
#: it is built.
REQUIRED_SETTINGS: frozenset[str] = frozenset()
#: the keys of keyvault.py (KEY_VAULT_SETTINGS) and identity.py (CREDENTIAL_SETTINGS), named
#: here so that the provider validates a site without importing the SDK (a test checks the
#: lists agree)
KEY_SETTINGS = frozenset(
    {
        "key_vault_url",
        "key_name",
        "key_size",
        "hardware_protected",
        "verify_challenge_resource",
        "credential",
        "tenant_id",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "federated_token_file",
        "authority",
        "instance_discovery",
        "ca_file",
    }
)
#: the keys of compute.py (COMPUTE_SETTINGS): subscription_id, resource_group and location
#: are required by the compute (checked when it is built), the others optional
COMPUTE_SETTINGS = frozenset(
    {
        "subscription_id",
        "resource_group",
        "location",
        "availability_zone",
        "arm_endpoint",
        "vm_size",
        "subnet_id",
        "disk_sku",
        "compute_concurrency",
        "poll_interval",
        "start_timeout",
    }
)
OPTIONAL_SETTINGS = (
    KEY_SETTINGS
    | COMPUTE_SETTINGS
    | frozenset(
        {
            "storage_account",
            "account_url",
            "account_key_env",
            "container",
            "prefix",
            "inbox_container",
            "inbox_sas_env",
            "inbox_sas_lifetime",
            "create",
            "immutability",
            "single_put_limit",
            "block_size",
            "upload_concurrency",
            "list_page_size",
            "sdk_retries",
            "connect_timeout",
            "read_timeout",
        }
    )
)

# storage account names: 3-24 lower-case letters and digits
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
# container names: 3-63 of lower-case letters, digits and single '-', starting and ending alnum
_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL = re.compile(r"^https?://[^/\s?#]+(/[a-z0-9]{3,24})?/?$")


@dataclass(frozen=True)
class BlobSettings:
    """One region's Blob Storage settings (see docs/azure.md for each key)."""

    region: str
    storage_account: str | None = None
    #: the blob endpoint; by default ``https://<storage_account>.blob.core.windows.net``.
    #: Azurite's is ``http://127.0.0.1:<port>/<account>`` (path-style)
    account_url: str | None = None
    #: the environment variable holding the account's shared key; without it the provider's
    #: token credential is used (Azure RBAC)
    account_key_env: str | None = None
    container: str = "regionvault"
    prefix: str = ""
    inbox_container: str = "regionvault-inbox"
    #: the environment variable holding a SAS (create + write on the inbox container) that a
    #: sender uses when it cannot mint one with this region's own credential
    inbox_sas_env: str | None = None
    inbox_sas_lifetime: int = 3600
    create: bool = False
    #: the container has version-level immutability support: WORM retention and legal holds
    immutability: bool = False
    single_put_limit: int = 16 * MiB
    block_size: int = 8 * MiB
    upload_concurrency: int = 4
    list_page_size: int = 5000
    #: azure-core's own retries of one call before it fails; a failure still transient then
    #: fails the job as transient, and the executor retries the job
    sdk_retries: int = 3
    connect_timeout: int = 10
    read_timeout: int = 120
    #: a PEM bundle to trust for the blob endpoint (identity.py's ``ca_file``, which the
    #: login trusts too): a TLS-inspecting proxy, or a test's HTTPS Azurite
    ca_file: str | None = None

    @property
    def url(self) -> str:
        """The blob endpoint of the storage account."""
        if self.account_url is not None:
            return self.account_url
        return f"https://{self.storage_account}.blob.core.windows.net"

    @property
    def account_name(self) -> str:
        """The account's name: ``storage_account``, else the last segment of a path-style
        ``account_url`` (Azurite), else the first label of its host."""
        if self.storage_account:
            return self.storage_account
        url = (self.account_url or "").rstrip("/")
        rest = url.split("://", 1)[-1]
        host, _, path = rest.partition("/")
        return path or host.split(".", 1)[0]

    def account_key(self) -> str | None:
        """The shared key from ``account_key_env``, or None when none is configured."""
        if self.account_key_env is None:
            return None
        value = os.environ.get(self.account_key_env, "")
        if not value:
            raise ConfigError(
                f"the environment variable {self.account_key_env} (account_key_env) is not set",
                key=f'regions."{self.region}".account_key_env',
                provider="azure",
                region=self.region,
            )
        return value

    def inbox_sas(self) -> str | None:
        """The sender's SAS from ``inbox_sas_env``, or None when none is configured."""
        if self.inbox_sas_env is None:
            return None
        value = os.environ.get(self.inbox_sas_env, "").lstrip("?")
        if not value:
            raise ConfigError(
                f"the environment variable {self.inbox_sas_env} (inbox_sas_env) is not set",
                key=f'regions."{self.region}".inbox_sas_env',
                provider="azure",
                region=self.region,
            )
        return value

    @classmethod
    def from_region(cls, region: RegionConfig) -> BlobSettings:
        """Parse and check ``region.settings``; :class:`ConfigError` names the bad key."""
        s = region.settings

        def string(key: str) -> str | None:
            value = s.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise region.error(key, f"must be a non-empty string, got {value!r}")
            return value

        def boolean(key: str, default: bool) -> bool:
            value = s.get(key, default)
            if not isinstance(value, bool):
                raise region.error(key, f"must be true or false, got {value!r}")
            return value

        def integer(key: str, default: int, low: int, high: int) -> int:
            value = s.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise region.error(key, f"must be an integer, got {value!r}")
            if not low <= value <= high:
                raise region.error(key, f"must be between {low} and {high}, got {value}")
            return value

        account = string("storage_account")
        if account is not None and not _ACCOUNT.match(account):
            raise region.error(
                "storage_account", f"{account!r} is not a storage account name (3-24 a-z, 0-9)"
            )
        url = string("account_url")
        if url is not None and not _URL.match(url):
            raise region.error(
                "account_url",
                f"{url!r} is not a blob endpoint like https://<account>.blob.core.windows.net "
                "or http://127.0.0.1:10000/<account>",
            )
        containers: dict[str, str] = {}
        for key, default in (
            ("container", "regionvault"),
            ("inbox_container", "regionvault-inbox"),
        ):
            name = string(key) or default
            if not _CONTAINER.match(name):
                raise region.error(key, f"{name!r} is not a valid blob container name")
            containers[key] = name
        if containers["container"] == containers["inbox_container"]:
            raise region.error("inbox_container", "must differ from container")
        for key in ("account_key_env", "inbox_sas_env"):
            variable = string(key)
            if variable is not None and not _ENV.match(variable):
                raise region.error(key, f"{variable!r} is not an environment variable name")
        prefix = s.get("prefix", "")
        if not isinstance(prefix, str) or prefix.startswith("/"):
            raise region.error(
                "prefix", f"must be a name prefix without a leading '/', got {prefix!r}"
            )
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        block = integer("block_size", 8 * MiB, 1 * MiB, 4000 * MiB)
        single = integer("single_put_limit", 16 * MiB, 1 * MiB, 5000 * MiB)
        return cls(
            region=region.name,
            storage_account=account,
            account_url=url.rstrip("/") if url else None,
            account_key_env=string("account_key_env"),
            container=containers["container"],
            prefix=prefix,
            inbox_container=containers["inbox_container"],
            inbox_sas_env=string("inbox_sas_env"),
            inbox_sas_lifetime=integer("inbox_sas_lifetime", 3600, 300, 7 * 24 * 3600),
            create=boolean("create", False),
            immutability=boolean("immutability", False),
            single_put_limit=single,
            block_size=block,
            upload_concurrency=integer("upload_concurrency", 4, 1, 64),
            list_page_size=integer("list_page_size", 5000, 1, 5000),
            sdk_retries=integer("sdk_retries", 3, 0, 20),
            connect_timeout=integer("connect_timeout", 10, 1, 600),
            read_timeout=integer("read_timeout", 120, 1, 3600),
            ca_file=str(region.path("ca_file")) if s.get("ca_file") is not None else None,
        )

    def need_account(self, region: RegionConfig, service: str) -> None:
        """:class:`ConfigError` unless the storage account is configured."""
        if self.storage_account is None and self.account_url is None:
            raise ConfigError(
                "missing (the azure provider needs storage_account or account_url for the "
                f"{service})",
                file=region.source,
                key=region.key("storage_account"),
                region=region.name,
            )


# --------------------------------------------------------------------------- zones and claims

#: Azure's logical availability zones of a location
ZONES = ("1", "2", "3")


def availability_zone(region: RegionConfig) -> str | None:
    """The compute's ``availability_zone`` (``"1"``, ``"2"`` or ``"3"``; an integer is taken
    too), or None: every VM of the resource group."""
    value = region.settings.get("availability_zone")
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if text not in ZONES:
        raise region.error(
            "availability_zone", f"must be one of Azure's zones 1, 2 or 3, got {value!r}"
        )
    return str(text)


def location_name(location: str) -> str:
    """A location as ARM answers it (``East US`` and ``eastus`` are one)."""
    return location.replace(" ", "").lower()


def compute_scope(region: RegionConfig) -> ComputeScope | None:
    """What a region's compute lists: the VMs of its resource group, or (with
    ``availability_zone``) those of that zone of its location. None when the compute keys
    are missing (building the compute names them)."""
    from regionvault.core.interfaces import ComputeScope

    s = region.settings
    keys = ("subscription_id", "resource_group", "location")
    if not all(isinstance(s.get(k), str) and s.get(k) for k in keys):
        return None
    zone = availability_zone(region)
    where = f" at {s['arm_endpoint']}" if isinstance(s.get("arm_endpoint"), str) else ""
    account = (
        f"subscription {str(s['subscription_id']).lower()}, resource group "
        f"{str(s['resource_group']).lower()}{where}"
    )
    # a whole region lists its group's VMs of every location; a zone region those of one zone
    # of its location, which the zone names
    return ComputeScope(
        "azure",
        account,
        "any location",
        None if zone is None else f"{zone} of {location_name(str(s['location']))}",
    )


def exclusive_spaces(region: RegionConfig, service: str) -> dict[str, str]:
    """The blob spaces a region's vault and inbox hold alone (an inbox is its whole container:
    sources write under ``<provider>/<name>/`` of it), or its Key Vault key."""
    s = region.settings
    if service == "keys":
        url = s.get("key_vault_url")
        if not isinstance(url, str) or not url:
            return {}
        name = s.get("key_name", "regionvault")
        return {"key": f"{url.rstrip('/').lower()}/keys/{name}#"}
    settings = BlobSettings.from_region(region)
    if settings.storage_account is None and settings.account_url is None:
        return {}
    account = settings.url.rstrip("/").lower()
    return {
        "vault": f"{account}/{settings.container}/{settings.prefix}",
        "inbox": f"{account}/{settings.inbox_container}/",
    }
