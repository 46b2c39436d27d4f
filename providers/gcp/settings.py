"""The GCP provider's site.toml settings for one region, checked without touching GCP.

One region of the site is one GCP location (``location``, say ``europe-west1``): its Cloud
KMS key ring, its Cloud Storage buckets (the vault and the transit inbox) and, for the
compute, one zone of it (``zone``) with the region's backup worker. docs/gcp.md describes
every key.

Each service checks the keys it needs when it is built (:meth:`GcpSettings.need`): a region
used only as a vault needs no zone, one used only for its keys no bucket.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = [
    "CREDENTIAL_KINDS",
    "OPTIONAL_SETTINGS",
    "REQUIRED_SETTINGS",
    "GcpSettings",
    "is_loopback",
]

MiB = 1024 * 1024

#: ``project`` is needed by every service; the others are checked by the service needing them
REQUIRED_SETTINGS: frozenset[str] = frozenset({"project"})
OPTIONAL_SETTINGS = frozenset(
    {
        "location",
        "zone",
        "credentials",
        "credentials_file",
        "storage_endpoint",
        "kms_endpoint",
        "kms_plaintext",
        "compute_endpoint",
        "create",
        "key_ring",
        "key_name",
        "seal_key_name",
        "bucket",
        "prefix",
        "inbox_bucket",
        "object_retention",
        "single_put_limit",
        "upload_chunk_size",
        "list_page_size",
        "worker_instance",
        "device_dir",
        "machine_type",
        "network",
        "subnetwork",
        "disk_type",
        "poll_interval",
        "operation_timeout",
        "sdk_retries",
        "timeout",
    }
)

#: how the provider logs in: Application Default Credentials (the metadata server of a GCE
#: worker, ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login), a service account key file, or
#: no login at all (only against endpoints on the loopback: the emulator and the fakes)
CREDENTIAL_KINDS = ("application-default", "service-account", "anonymous")

# project ids: 6-30 of lower-case letters, digits and '-', starting with a letter
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
# locations (regions) such as europe-west1, us-central1; "global" is not a place for a vault
_LOCATION = re.compile(r"^[a-z]+(-[a-z]+)*\d{1,2}$")
_ZONE = re.compile(r"^[a-z]+(-[a-z]+)*\d{1,2}-[a-z]$")
# bucket names: 3-63 of lower-case letters, digits, '-', '_', '.', starting and ending alnum
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
# key ring and key ids: letters, digits, '_' and '-', at most 63
_KMS_ID = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
# Compute Engine resource names (RFC 1035): instances, networks, disk types, machine types
_RESOURCE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GcpSettings:
    """One region's GCP settings (docs/gcp.md describes each key)."""

    region: str
    project: str
    #: the GCP location of the key ring and the buckets
    location: str | None = None
    #: the zone of the region's instances, disks and backup worker
    zone: str | None = None
    credentials: str = "application-default"
    #: a service account's JSON key file (``credentials = "service-account"``), resolved
    #: against the site file's directory
    credentials_file: str | None = None
    #: ``http://127.0.0.1:P``: a Cloud Storage emulator instead of storage.googleapis.com
    storage_endpoint: str | None = None
    #: ``host:port`` of the Cloud KMS gRPC API instead of cloudkms.googleapis.com:443
    kms_endpoint: str | None = None
    #: talk to ``kms_endpoint`` without TLS (a fake on the loopback only)
    kms_plaintext: bool = False
    #: ``http://127.0.0.1:P``: a Compute Engine API instead of compute.googleapis.com
    compute_endpoint: str | None = None
    #: make the key ring, keys and buckets when missing (tests, first set-up)
    create: bool = False
    key_ring: str = "regionvault"
    #: the symmetric ENCRYPT_DECRYPT key that wraps data keys
    key_name: str = "regionvault"
    #: the ASYMMETRIC_DECRYPT key (RSA_DECRYPT_OAEP_3072_SHA256) other regions seal to
    seal_key_name: str = "regionvault-seal"
    bucket: str | None = None
    prefix: str = ""
    inbox_bucket: str | None = None
    #: the vault bucket has object retention enabled: WORM retention and holds are offered
    object_retention: bool = False
    #: objects larger than this are uploaded resumably, in ``upload_chunk_size`` chunks
    single_put_limit: int = 16 * MiB
    upload_chunk_size: int = 8 * MiB
    list_page_size: int = 1000
    #: the instance (in ``zone``) that reads and writes disks through its block devices
    worker_instance: str | None = None
    #: where the worker sees an attached disk as ``google-<device name>``
    device_dir: str = "/dev/disk/by-id"
    #: for launches whose point does not record one (points captured on another cloud)
    machine_type: str = "e2-standard-2"
    network: str = "global/networks/default"
    subnetwork: str | None = None
    disk_type: str = "pd-balanced"
    #: seconds between polls of a long-running Compute Engine operation
    poll_interval: float = 2.0
    #: seconds a Compute Engine operation may take before the job fails (transiently)
    operation_timeout: int = 1800
    #: retries of one call before it fails (google-api-core's, counted, for Cloud Storage;
    #: the provider's own for Compute Engine and Cloud KMS, whose SDK retries are off)
    sdk_retries: int = 3
    #: seconds one request may take
    timeout: int = 120

    def endpoint_of(self, service: str) -> str | None:
        """The configured endpoint of ``service`` ("storage", "kms" or "compute")."""
        return {
            "storage": self.storage_endpoint,
            "kms": self.kms_endpoint,
            "compute": self.compute_endpoint,
        }[service]

    def on_loopback(self, service: str) -> bool:
        """True when ``service``'s endpoint is configured and on this machine's loopback."""
        endpoint = self.endpoint_of(service)
        if endpoint is None:
            return False
        host = endpoint.rpartition(":")[0] if service == "kms" else urlsplit(endpoint).hostname
        return is_loopback(host or "")

    def need(self, region: RegionConfig, service: str, *keys: str) -> None:
        """:class:`ConfigError` naming the first of ``keys`` that is not set, and the service
        that needs it."""
        for key in keys:
            if getattr(self, key) is None:
                raise ConfigError(
                    f"missing (the gcp provider needs {key} for the {service})",
                    file=region.source,
                    key=region.key(key),
                    provider="gcp",
                    region=region.name,
                )

    @property
    def key_ring_path(self) -> str:
        """``projects/P/locations/L/keyRings/R`` (needs ``location``)."""
        return f"projects/{self.project}/locations/{self.location}/keyRings/{self.key_ring}"

    def key_path(self, name: str) -> str:
        return f"{self.key_ring_path}/cryptoKeys/{name}"

    @property
    def account(self) -> str:
        """The project, and the Compute Engine endpoint when one is set."""
        where = f" at {self.compute_endpoint}" if self.compute_endpoint else ""
        return f"project {self.project}{where}"

    def vault_spaces(self) -> dict[str, str]:
        """The Cloud Storage names the region's vault and inbox hold alone (a source writes
        under ``<provider>/<name>/`` of the whole inbox bucket, so two regions' inboxes in one
        bucket would mix)."""
        host = self.storage_endpoint or "gcs"
        spaces = {}
        if self.bucket:
            spaces["vault"] = f"gs://{host}/{self.bucket}/{self.prefix}"
        if self.inbox_bucket:
            spaces["inbox"] = f"gs://{host}/{self.inbox_bucket}/"
        return spaces

    def key_spaces(self) -> dict[str, str]:
        """The Cloud KMS keys the region's KeyService holds alone."""
        if self.location is None:
            return {}
        host = self.kms_endpoint or "cloudkms"
        return {
            "key": f"kms://{host}/{self.key_path(self.key_name)}#",
            "seal key": f"kms://{host}/{self.key_path(self.seal_key_name)}#",
        }

    @classmethod
    def from_region(cls, region: RegionConfig) -> GcpSettings:
        """Parse and check ``region.settings``; :class:`ConfigError` names the bad key."""
        s = region.settings

        def string(key: str, pattern: re.Pattern[str] | None = None, what: str = "") -> Any:
            value = s.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise region.error(key, f"must be a non-empty string, got {value!r}")
            if pattern is not None and not pattern.match(value):
                raise region.error(key, f"{value!r} is not {what}")
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

        def number(key: str, default: float, low: float, high: float) -> float:
            value = s.get(key, default)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise region.error(key, f"must be a number of seconds, got {value!r}")
            if not low <= value <= high:
                raise region.error(key, f"must be between {low} and {high}, got {value}")
            return float(value)

        def endpoint(key: str) -> str | None:
            value = string(key)
            if value is None:
                return None
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise region.error(
                    key, f"{value!r} is not an endpoint URL like http://127.0.0.1:9023"
                )
            if parts.scheme == "http" and not is_loopback(parts.hostname):
                raise region.error(
                    key, f"{value!r}: plain http is allowed only to this machine's loopback"
                )
            return str(value).rstrip("/")

        project = string("project", _PROJECT, "a GCP project id (6-30 of a-z, 0-9, '-')")
        if project is None:
            raise region.error("project", "missing (the gcp provider needs the project id)")
        credentials = string("credentials") or "application-default"
        if credentials not in CREDENTIAL_KINDS:
            raise region.error(
                "credentials", f"must be one of {', '.join(CREDENTIAL_KINDS)}, got {credentials!r}"
            )
        credentials_file = None
        if s.get("credentials_file") is not None:
            credentials_file = str(region.path("credentials_file"))
        if credentials == "service-account" and credentials_file is None:
            raise region.error(
                "credentials_file", 'missing (credentials = "service-account" needs the key file)'
            )
        kms_endpoint = string("kms_endpoint")
        if kms_endpoint is not None:
            host, sep, port = kms_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or "/" in kms_endpoint:
                raise region.error(
                    "kms_endpoint", f"{kms_endpoint!r} is not host:port (127.0.0.1:9443)"
                )
        kms_plaintext = boolean("kms_plaintext", False)
        if kms_plaintext and not (
            kms_endpoint is not None and is_loopback(kms_endpoint.rpartition(":")[0])
        ):
            raise region.error(
                "kms_plaintext", "is allowed only with a kms_endpoint on this machine's loopback"
            )
        prefix = s.get("prefix", "")
        if not isinstance(prefix, str) or prefix.startswith("/"):
            raise region.error(
                "prefix", f"must be a name prefix without a leading '/', got {prefix!r}"
            )
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        bucket = string("bucket", _BUCKET, "a Cloud Storage bucket name")
        inbox_bucket = string("inbox_bucket", _BUCKET, "a Cloud Storage bucket name")
        if bucket is not None and bucket == inbox_bucket:
            raise region.error("inbox_bucket", "must differ from bucket")
        names = {}
        for key, default in (
            ("key_ring", "regionvault"),
            ("key_name", "regionvault"),
            ("seal_key_name", "regionvault-seal"),
        ):
            names[key] = string(key, _KMS_ID, "a Cloud KMS id (1-63 of A-Z, a-z, 0-9, _, -)")
            names[key] = names[key] or default
        if names["key_name"] == names["seal_key_name"]:
            raise region.error("seal_key_name", "must differ from key_name")
        resource = "a Compute Engine name (a-z, 0-9, '-', starting with a letter)"
        settings = cls(
            region=region.name,
            project=project,
            **_zone_and_location(region, string),
            credentials=credentials,
            credentials_file=credentials_file,
            storage_endpoint=endpoint("storage_endpoint"),
            kms_endpoint=kms_endpoint,
            kms_plaintext=kms_plaintext,
            compute_endpoint=endpoint("compute_endpoint"),
            create=boolean("create", False),
            key_ring=names["key_ring"],
            key_name=names["key_name"],
            seal_key_name=names["seal_key_name"],
            bucket=bucket,
            prefix=prefix,
            inbox_bucket=inbox_bucket,
            object_retention=boolean("object_retention", False),
            single_put_limit=integer("single_put_limit", 16 * MiB, 1 * MiB, 5000 * MiB),
            upload_chunk_size=integer("upload_chunk_size", 8 * MiB, 256 * 1024, 1024 * MiB),
            list_page_size=integer("list_page_size", 1000, 1, 1000),
            worker_instance=string("worker_instance", _RESOURCE, resource),
            device_dir=str(region.path("device_dir"))
            if s.get("device_dir") is not None
            else "/dev/disk/by-id",
            machine_type=string("machine_type", _RESOURCE, resource) or "e2-standard-2",
            network=string("network") or "global/networks/default",
            subnetwork=string("subnetwork"),
            disk_type=string("disk_type", _RESOURCE, resource) or "pd-balanced",
            poll_interval=number("poll_interval", 2.0, 0.01, 600.0),
            operation_timeout=integer("operation_timeout", 1800, 1, 24 * 3600),
            sdk_retries=integer("sdk_retries", 3, 0, 20),
            timeout=integer("timeout", 120, 1, 3600),
        )
        if settings.upload_chunk_size % (256 * 1024):
            raise region.error(
                "upload_chunk_size", "must be a multiple of 256 KiB (Cloud Storage's rule)"
            )
        if (
            settings.zone is not None
            and settings.location is not None
            and not settings.zone.startswith(settings.location + "-")
        ):
            raise region.error(
                "zone", f"{settings.zone!r} is not a zone of location {settings.location!r}"
            )
        return settings


def _zone_and_location(region: RegionConfig, string: Any) -> dict[str, str | None]:
    """``zone`` and ``location`` as set; a region named after a zone (``gcp:europe-west1-b``)
    that sets neither is that zone of its location."""
    location = string("location", _LOCATION, "a GCP location such as europe-west1")
    zone = string("zone", _ZONE, "a GCP zone such as europe-west1-b")
    named = region.id.provider == "gcp" and _ZONE.match(region.id.name) is not None
    if named and zone is not None and zone != region.id.name:
        # a region named after a zone says its zone: ``zone`` may only repeat it
        raise region.error(
            "zone",
            f"{zone!r} disagrees with the region name {region.id.name}, itself a zone "
            "(name the region after its zone, or drop zone)",
        )
    if (
        zone is None
        and location is None
        and region.id.provider == "gcp"
        and _ZONE.match(region.id.name)
    ):
        zone = region.id.name
        location = zone.rsplit("-", 1)[0]
    return {"location": location, "zone": zone}
