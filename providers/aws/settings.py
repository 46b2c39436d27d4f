"""The AWS provider's site.toml settings for one region, checked without touching AWS."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig

__all__ = ["OPTIONAL_SETTINGS", "REQUIRED_SETTINGS", "AwsSettings"]

MiB = 1024 * 1024

#: None is required of every service: ``kms_key`` is needed by keys (and sealing), ``bucket``
#: by the vault and transit; each service checks its own when it is built.
REQUIRED_SETTINGS: frozenset[str] = frozenset()
OPTIONAL_SETTINGS = frozenset(
    {
        "aws_region",
        "availability_zone",
        "profile",
        "endpoint_url",
        "create",
        "kms_key",
        "bucket",
        "prefix",
        "object_lock",
        "inbox_bucket",
        "inbox_prefix",
        "list_page_size",
        "multipart_threshold",
        "multipart_part_size",
        "multipart_concurrency",
        "instance_type",
        "subnet_id",
        "security_group_ids",
        "snapshot_timeout",
        "ebs_concurrency",
        "capture_launched_from_snapshot",
        "sdk_retries",
        "connect_timeout",
        "read_timeout",
        "snapshot_stall_timeout",
        "snapshot_queue_timeout",
        "ebs_kms_key",
        "fallback_instance_types",
        "billing_products",
    }
)

_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
#: an availability zone's name: its region's and a letter (``us-east-1a``); a Local Zone's
#: has a place between them (``us-east-1-bos-1a``)
_ZONE_SUFFIX = re.compile(r"^(-[a-z]+-\d+)?[a-z]$")
# S3 bucket names: 3-63 of lower-case letters, digits, '.', '-', starting and ending alnum
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KMS_ARN = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:(key|alias)/.+$")
_KMS_ID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$|^mrk-[0-9a-f]{32}$"
)


@dataclass(frozen=True)
class AwsSettings:
    """One region's settings for the AWS provider (see docs/aws.md for each key)."""

    region: str
    aws_region: str
    #: the one availability zone whose instances the region lists, captures and launches;
    #: None: every zone of ``aws_region``
    availability_zone: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    create: bool = False
    kms_key: str | None = None
    bucket: str | None = None
    prefix: str = ""
    object_lock: bool = False
    inbox_bucket: str | None = None
    inbox_prefix: str = "inbox/"
    list_page_size: int = 1000
    multipart_threshold: int = 16 * MiB
    multipart_part_size: int = 8 * MiB
    multipart_concurrency: int = 4
    instance_type: str | None = None
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    snapshot_timeout: int = 1800
    ebs_concurrency: int = 8
    #: test/dev only: a launched instance is captured from the snapshot it was restored
    #: from (moto does not tie a volume's contents to snapshots; real AWS must not use this)
    capture_launched_from_snapshot: bool = False
    #: botocore's own retries of one call (standard retry mode) before it fails; a failure
    #: still transient then fails the job as transient, and the executor retries the job
    sdk_retries: int = 5
    #: seconds to wait for a connection, and for each read of an answer
    connect_timeout: int = 10
    read_timeout: int = 120
    #: seconds a snapshot may go without progress (DescribeSnapshots' Progress) before a
    #: wait for it fails; a large snapshot that keeps moving is waited for however long it
    #: takes. ``snapshot_timeout`` is its older name (read into both fields)
    snapshot_stall_timeout: int = 1800
    #: seconds a snapshot that has shown no progress at all since the wait began (pending
    #: at 0%, or no Progress: queued behind another snapshot of its volume) may stay so
    #: before the wait fails; once it moves, ``snapshot_stall_timeout`` applies
    snapshot_queue_timeout: int = 6 * 3600
    #: the KMS key (a key ARN in this region) the snapshots a restore writes are encrypted
    #: with; None: the account's EBS default (encrypted when the account encrypts by default)
    ebs_kms_key: str | None = None

    #: launch: the instance types to launch instead, in this order, when the destination
    #: (its zone, or the region) does not offer the source's; none: such a launch fails
    fallback_instance_types: tuple[str, ...] = ()
    #: launch: RegisterImage's BillingProducts by the source's usage operation
    #: ("RunInstances:0002" = ["bp-..."]); only accounts AWS authorised may pass them
    billing_products: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    @property
    def inbox_bucket_name(self) -> str | None:
        return self.inbox_bucket or self.bucket

    @classmethod
    def from_region(cls, region: RegionConfig) -> AwsSettings:
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

        aws_region = string("aws_region")
        zone = string("availability_zone")
        named = _zone_region(region.id.name) if region.id.provider == "aws" else None
        if named is not None and zone is not None:
            # a region named after a zone says its zone: availability_zone may only repeat it
            if zone != region.id.name:
                raise region.error(
                    "availability_zone",
                    f"{zone!r} disagrees with the region name {region.id.name}, itself a zone "
                    f"of {named} (name the region after its zone, or drop availability_zone)",
                )
            aws_region = aws_region or named
        if aws_region is None and zone is None and named is not None:
            # a region named after a zone (aws:us-east-1a) is that zone of its AWS region
            aws_region, zone = named, region.id.name
        if aws_region is None:
            if region.id.provider != "aws":
                raise region.error(
                    "aws_region", "missing (needed when the region id is not aws:<aws region>)"
                )
            aws_region = region.id.name
        if not _AWS_REGION.match(aws_region):
            message = f"{aws_region!r} is not an AWS region name like us-east-1"
            if "aws_region" in s:
                raise region.error("aws_region", message)
            raise ConfigError(
                f"{message} (set aws_region)",
                file=region.source,
                key=region.key(),
                region=region.name,
            )

        if zone is not None and (
            not zone.startswith(aws_region) or not _ZONE_SUFFIX.match(zone[len(aws_region) :])
        ):
            raise region.error(
                "availability_zone",
                f"{zone!r} is not an availability zone of {aws_region} (like {aws_region}a)",
            )

        endpoint_url = string("endpoint_url")
        if endpoint_url is not None and not re.match(r"^https?://[^/\s]+/?$", endpoint_url):
            raise region.error(
                "endpoint_url", f"{endpoint_url!r} is not an http(s)://host:port URL"
            )

        kms_key = string("kms_key")
        if kms_key is not None:
            arn = _KMS_ARN.match(kms_key)
            if arn is not None and arn.group(1) != aws_region:
                raise region.error(
                    "kms_key", f"the key's ARN is in {arn.group(1)}, the region is in {aws_region}"
                )
            if arn is None and not kms_key.startswith("alias/") and not _KMS_ID.match(kms_key):
                raise region.error(
                    "kms_key", f"{kms_key!r} is not a key ARN, key id or alias/<name>"
                )

        buckets: dict[str, str | None] = {}
        for key in ("bucket", "inbox_bucket"):
            name = string(key)
            if name is not None and (not _BUCKET.match(name) or ".." in name):
                raise region.error(key, f"{name!r} is not a valid S3 bucket name")
            buckets[key] = name

        prefixes: dict[str, str] = {}
        for key, default in (("prefix", ""), ("inbox_prefix", "inbox/")):
            value = s.get(key, default)
            if not isinstance(value, str) or value.startswith("/"):
                raise region.error(
                    key, f"must be a key prefix without a leading '/', got {value!r}"
                )
            if value and not value.endswith("/"):
                value += "/"
            prefixes[key] = value
        if prefixes["inbox_prefix"] == "":
            raise region.error("inbox_prefix", "must not be empty")

        groups = s.get("security_group_ids", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise region.error("security_group_ids", "must be an array of security group ids")

        stall = _snapshot_stall_timeout(region, integer)
        ebs_kms_key = _ebs_kms_key(region, string("ebs_kms_key"), aws_region)

        part = integer("multipart_part_size", 8 * MiB, 5 * MiB, 5 * 1024 * MiB)
        threshold = integer("multipart_threshold", 16 * MiB, 5 * MiB, 5 * 1024 * MiB)
        if threshold < part:
            raise region.error("multipart_threshold", "must be at least multipart_part_size")
        return cls(
            region=region.name,
            aws_region=aws_region,
            availability_zone=zone,
            profile=string("profile"),
            endpoint_url=endpoint_url.rstrip("/") if endpoint_url else None,
            create=boolean("create", False),
            kms_key=kms_key,
            bucket=buckets["bucket"],
            prefix=prefixes["prefix"],
            object_lock=boolean("object_lock", False),
            inbox_bucket=buckets["inbox_bucket"],
            inbox_prefix=prefixes["inbox_prefix"],
            list_page_size=integer("list_page_size", 1000, 1, 1000),
            multipart_threshold=threshold,
            multipart_part_size=part,
            multipart_concurrency=integer("multipart_concurrency", 4, 1, 64),
            instance_type=string("instance_type"),
            subnet_id=string("subnet_id"),
            security_group_ids=tuple(groups),
            snapshot_timeout=stall,
            ebs_concurrency=integer("ebs_concurrency", 8, 1, 64),
            capture_launched_from_snapshot=boolean("capture_launched_from_snapshot", False),
            sdk_retries=integer("sdk_retries", 5, 0, 20),
            connect_timeout=integer("connect_timeout", 10, 1, 600),
            read_timeout=integer("read_timeout", 120, 1, 3600),
            snapshot_stall_timeout=stall,
            snapshot_queue_timeout=integer("snapshot_queue_timeout", 6 * 3600, 1, 48 * 3600),
            ebs_kms_key=ebs_kms_key,
            fallback_instance_types=_fallback_instance_types(region),
            billing_products=_billing_products(region),
        )

    def need(self, region: RegionConfig, key: str, service: str) -> str:
        value: Any = getattr(self, key)
        if not value:
            raise ConfigError(
                f"missing (the aws provider needs it for the {service})",
                file=region.source,
                key=region.key(key),
                region=region.name,
            )
        return str(value)

    @property
    def account(self) -> str:
        """What names the account statically: the profile, and the endpoint when one is set
        (two profiles may still reach one account: the tick checks listed ids too)."""
        who = f"profile {self.profile}" if self.profile else "default credentials"
        return f"{who} at {self.endpoint_url}" if self.endpoint_url else who

    def vault_spaces(self) -> dict[str, str]:
        """The S3 key spaces the region's vault and inbox hold alone (bucket names are global,
        so the account is not part of them)."""
        if not self.bucket:
            return {}
        host = self.endpoint_url or "aws"
        inbox = self.inbox_bucket_name or self.bucket
        return {
            "vault": f"s3://{host}/{self.bucket}/{self.prefix}",
            "inbox": f"s3://{host}/{inbox}/{self.inbox_prefix}",
        }

    def key_spaces(self) -> dict[str, str]:
        """The KMS key the region's KeyService holds alone: an ARN names it everywhere; an id
        or alias within the account and AWS region."""
        if not self.kms_key:
            return {}
        if self.kms_key.startswith("arn:"):
            return {"key": f"kms:{self.kms_key}#"}
        host = self.endpoint_url or "aws"
        return {"key": f"kms://{host}/{self.aws_region}/{self.account}/{self.kms_key}#"}


def _zone_region(name: str) -> str | None:
    """The AWS region of a zone-shaped name (``us-east-1a`` is a zone of ``us-east-1``)."""
    match = re.match(r"^([a-z]{2}(?:-[a-z]+)+-\d{1,2})(-[a-z]+-\d+)?[a-z]$", name)
    return match.group(1) if match else None


#: a KMS key's ARN (not an alias's): what StartSnapshot's KmsKeyArn takes
_KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:key/[A-Za-z0-9-]+$")


def _snapshot_stall_timeout(region: RegionConfig, integer: Callable[..., int]) -> int:
    """``snapshot_stall_timeout``, or ``snapshot_timeout`` (its older name: a fixed limit
    then, a limit on time without progress now, which only waits longer); not both."""
    given = [k for k in ("snapshot_stall_timeout", "snapshot_timeout") if k in region.settings]
    if len(given) == 2:
        raise region.error(
            "snapshot_timeout",
            "give snapshot_stall_timeout only (snapshot_timeout is its older name)",
        )
    key = given[0] if given else "snapshot_stall_timeout"
    return integer(key, 1800, 1, 24 * 3600)


def _ebs_kms_key(region: RegionConfig, value: str | None, aws_region: str) -> str | None:
    """``ebs_kms_key``: a KMS key ARN in the region's AWS region (StartSnapshot takes no
    alias or bare key id)."""
    if value is None:
        return None
    arn = _KMS_KEY_ARN.match(value)
    if arn is None:
        raise region.error(
            "ebs_kms_key",
            f"{value!r} is not a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>; "
            "EBS StartSnapshot takes no alias or bare key id)",
        )
    if arn.group(1) != aws_region:
        raise region.error(
            "ebs_kms_key", f"the key's ARN is in {arn.group(1)}, the region is in {aws_region}"
        )
    return value


#: an EC2 instance type: family, generation and options, a dot, a size
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_USAGE_OPERATION = re.compile(r"^RunInstances(:[0-9a-zA-Z]{4})?$")
_BILLING_PRODUCT = re.compile(r"^bp-[0-9a-f]{8,}$")


def _fallback_instance_types(region: RegionConfig) -> tuple[str, ...]:
    value = region.settings.get("fallback_instance_types", [])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise region.error("fallback_instance_types", "must be an array of instance types")
    for name in value:
        if not _INSTANCE_TYPE.match(name):
            raise region.error(
                "fallback_instance_types", f"{name!r} is not an EC2 instance type like m5.large"
            )
    return tuple(dict.fromkeys(value))


def _billing_products(region: RegionConfig) -> dict[str, tuple[str, ...]]:
    value = region.settings.get("billing_products", {})
    if not isinstance(value, dict):
        raise region.error("billing_products", 'must be a table: usage operation = ["bp-...", ...]')
    out: dict[str, tuple[str, ...]] = {}
    for usage, codes in value.items():
        if not _USAGE_OPERATION.match(usage):
            raise region.error(
                "billing_products", f"{usage!r} is not a usage operation like RunInstances:0002"
            )
        if not isinstance(codes, list) or not all(
            isinstance(c, str) and _BILLING_PRODUCT.match(c) for c in codes
        ):
            raise region.error(
                "billing_products", f"{usage}: must be an array of billing product codes bp-..."
            )
        out[usage] = tuple(codes)
    return out
