"""A whole EC2 instance carried into another region: what a capture records of it for a
launch (key pair, instance profile, security groups, user data, billing details), how a
launch maps each onto what the destination has (and lists what it cannot), the instance
type offerings checked before a launch, and the status checks that say it is healthy.

What is recorded lives only in the point's sealed manifest (``Capture.launch_facts``): user
data may hold secrets, so no value of it goes into a tag, an error or a log line; the
lines a launch lists as not carried over name resources, never user data.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from regionvault.core.errors import ComputeError, InstanceNotFound, RegionVaultError
from regionvault.core.interfaces import CloudHealth
from regionvault.providers.aws.errors import aws_error, error_code, error_message, is_transient

if TYPE_CHECKING:
    from regionvault.core.types import Instance, LaunchSpec
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.settings import AwsSettings


class AwsCompute(Protocol):
    """What these functions use of providers/aws/ec2.py's AwsCompute (which imports this
    module, so it is named here by its shape)."""

    region: str
    settings: AwsSettings
    _clients: ClientFactory

    @property
    def ec2(self) -> Any: ...


__all__ = [
    "GROUP_TAG",
    "LaunchMapping",
    "billing_not_carried",
    "billing_products",
    "capture_facts",
    "checked_facts",
    "instance_extra",
    "instance_health",
    "launch_subnet",
    "map_launch",
    "offered_type",
    "subnet_place",
]

#: a security group in the destination tagged with this key, its value the source group's
#: id or name, stands for that source group (before a group of the same name)
GROUP_TAG = "regionvault:security-group"
#: the version of the facts' layout, for a later reader
_FACTS_VERSION = 1
_MAX_PAGES = 1000


def _call_error(exc: BaseException, what: str, compute: AwsCompute) -> RegionVaultError:
    return aws_error(exc, f"{what}: {error_message(exc)}", ComputeError, region=compute.region)


# ---------------------------------------------------------------------- reading them

#: the launch facts read as text (a point's manifest may hold anything: checked first)
_TEXT_FACTS = (
    "source_region", "aws_region", "instance_type", "architecture", "root_device_name",
    "boot_mode", "subnet_id", "key_name", "instance_profile_arn", "user_data",
    "user_data_unknown",
)  # fmt: skip
_BILLING_TEXT = ("platform_details", "usage_operation", "platform", "image_id")


def checked_facts(facts: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(facts a launch may use, not-carried lines)``: each known member of the wrong type
    is left out and named (``launch fact security_groups: not a list of groups; not
    applied``), never its value; facts of a newer layout than :data:`_FACTS_VERSION` are
    not applied at all. Unknown members pass (a reader ignores them)."""
    version = facts.get("aws", _FACTS_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return {}, ["launch facts: their version is not a positive integer; not applied"]
    if version > _FACTS_VERSION:
        return {}, [
            f"launch facts of version {version} (this version reads {_FACTS_VERSION}): "
            "not applied; upgrade regionvault"
        ]
    kept = dict(facts)
    lines: list[str] = []

    def drop(member: str, what: str) -> None:
        kept.pop(member, None)
        lines.append(f"launch fact {member}: not {what}; not applied")

    for member in _TEXT_FACTS:
        if member in kept and kept[member] is not None and not isinstance(kept[member], str):
            drop(member, "a string")
    groups = kept.get("security_groups")
    if groups is not None and not (
        isinstance(groups, list)
        and all(
            isinstance(g, Mapping) and all(isinstance(v, str) for v in g.values()) for g in groups
        )
    ):
        drop("security_groups", "a list of groups")
    billing = kept.get("billing")
    if billing is not None and not _billing_ok(billing, nested=True):
        drop("billing", "a table of billing details")
    return kept, lines


def _billing_ok(billing: object, *, nested: bool) -> bool:
    if not isinstance(billing, Mapping):
        return False
    if any(billing.get(k) is not None and not isinstance(billing[k], str) for k in _BILLING_TEXT):
        return False
    codes = billing.get("product_codes")
    if codes is not None and not (
        isinstance(codes, list)
        and all(
            isinstance(c, Mapping) and all(isinstance(v, str) for v in c.values()) for c in codes
        )
    ):
        return False
    image = billing.get("image")
    return image is None or (nested and _billing_ok(image, nested=False))


# ---------------------------------------------------------------------- at capture


def capture_facts(compute: AwsCompute, instance: Instance) -> dict[str, Any]:
    """The launch facts of ``instance`` as its capture found it (see the module's doc):
    what DescribeInstances told (``instance.extra``), its user data (DescribeInstanceAttribute)
    and the billing details of the image it was launched from (DescribeImages, when that
    image still exists and is visible). A detail that cannot be read is recorded as
    unknown with the reason, so that the launch lists it, rather than failing the backup."""
    extra = instance.extra
    facts: dict[str, Any] = {
        "aws": _FACTS_VERSION,
        "source_region": extra.get("aws_region"),
        "instance_type": extra.get("instance_type"),
        "architecture": extra.get("architecture"),
        "root_device_name": extra.get("root_device_name"),
        "boot_mode": extra.get("boot_mode"),
        "subnet_id": extra.get("subnet_id"),
        "key_name": extra.get("key_name"),
        "instance_profile_arn": extra.get("instance_profile_arn"),
        "security_groups": [dict(g) for g in extra.get("security_groups") or []],
        "billing": dict(extra.get("billing") or {}),
    }
    try:
        answer = compute.ec2.describe_instance_attribute(
            InstanceId=instance.id, Attribute="userData"
        )
        value = (answer.get("UserData") or {}).get("Value")
        if value:
            facts["user_data"] = str(value)  # base64, as EC2 gives it
    except (ClientError, BotoCoreError) as exc:
        if is_transient(exc, service="ec2"):  # the job is retried, not recorded without it
            raise _call_error(exc, f"cannot read the user data of {instance.id}", compute) from None
        facts["user_data_unknown"] = f"{error_code(exc) or type(exc).__name__}"
    image_id = extra.get("image_id")
    if image_id:
        facts["billing"]["image_id"] = image_id
        try:
            images = compute.ec2.describe_images(ImageIds=[image_id]).get("Images") or []
        except (ClientError, BotoCoreError) as exc:
            if is_transient(exc, service="ec2"):
                raise _call_error(exc, f"cannot describe image {image_id}", compute) from None
            images = []  # deregistered, or another account's: the instance's own say it
        for image in images[:1]:
            facts["billing"]["image"] = _billing_of(image)
    return {k: v for k, v in facts.items() if v not in (None, [], {})}


def _billing_of(raw: Mapping[str, Any]) -> dict[str, Any]:
    """PlatformDetails, UsageOperation, Platform and product codes of an instance or image."""
    billing: dict[str, Any] = {}
    for key, name in (
        ("PlatformDetails", "platform_details"),
        ("UsageOperation", "usage_operation"),
        ("Platform", "platform"),
    ):
        if raw.get(key):
            billing[name] = str(raw[key])
    codes = [
        {"code": str(c.get("ProductCodeId")), "type": str(c.get("ProductCodeType", ""))}
        for c in raw.get("ProductCodes") or []
        if c.get("ProductCodeId")
    ]
    if codes:
        billing["product_codes"] = codes
    return billing


def instance_extra(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What DescribeInstances says of an instance that a launch elsewhere carries over."""
    extra: dict[str, Any] = {}
    if raw.get("KeyName"):
        extra["key_name"] = str(raw["KeyName"])
    profile = (raw.get("IamInstanceProfile") or {}).get("Arn")
    if profile:
        extra["instance_profile_arn"] = str(profile)
    groups = [
        {"id": str(g.get("GroupId") or ""), "name": str(g.get("GroupName") or "")}
        for g in raw.get("SecurityGroups") or []
    ]
    if groups:
        extra["security_groups"] = groups
    billing = _billing_of(raw)
    if billing:
        extra["billing"] = billing
    return extra


# ---------------------------------------------------------------------- at launch


@dataclass
class LaunchMapping:
    """What a launch passes to RunInstances beyond the image and type, and what of the
    source it could not carry over (one line each, naming resources, never values)."""

    run: dict[str, Any] = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)


def _profile_name(arn: str) -> str:
    """``arn:aws:iam::123456789012:instance-profile/path/name`` -> ``name``."""
    return arn.rsplit("/", 1)[-1]


def map_launch(
    compute: AwsCompute,
    spec: LaunchSpec,
    facts: Mapping[str, Any],
    *,
    subnet: str | None,
    vpc_id: str | None,
) -> LaunchMapping:
    """Map the source's key pair, instance profile, security groups and user data onto
    this region: each is passed when the destination has it, else listed as not carried.
    Security groups given to the launch (``spec.extra['security_group_ids']`` or the
    region's ``security_group_ids``) are used as they are, instead of mapping."""
    mapping = LaunchMapping()
    where = compute.settings.aws_region
    key_name = facts.get("key_name")
    if key_name:
        found = _key_pair_exists(compute, str(key_name))
        if found is True:
            mapping.run["KeyName"] = str(key_name)
        else:
            mapping.not_carried.append(f"key pair {key_name}: {found}")
    profile = facts.get("instance_profile_arn")
    if profile:
        arn = _instance_profile(compute, _profile_name(str(profile)))
        if arn.startswith("arn:"):
            mapping.run["IamInstanceProfile"] = {"Arn": arn}
        else:
            mapping.not_carried.append(f"instance profile {_profile_name(str(profile))}: {arn}")
    given = spec.extra.get("security_group_ids") or list(compute.settings.security_group_ids)
    groups: Sequence[Mapping[str, str]] = facts.get("security_groups") or []
    if given:
        mapping.run["SecurityGroupIds"] = list(given)
        if groups:
            names = ", ".join(g.get("name") or g.get("id", "") for g in groups)
            mapping.not_carried.append(
                f"security groups {names}: the region's security_group_ids are used instead"
            )
    elif groups:
        ids, missing = _map_groups(compute, groups, vpc_id)
        if ids:
            mapping.run["SecurityGroupIds"] = ids
        for group in missing:
            label = group.get("name") or group.get("id")
            mapping.not_carried.append(
                f"security group {label} ({group.get('id')}): no group tagged "
                f"{GROUP_TAG}={label} or named {label} in {vpc_id or 'the default VPC'} "
                f"of {where}"
            )
    user_data = facts.get("user_data")
    if user_data:
        try:
            mapping.run["UserData"] = base64.b64decode(str(user_data), validate=True)
        except (binascii.Error, ValueError):
            mapping.not_carried.append("user data: the recorded value is not base64")
    elif facts.get("user_data_unknown"):
        mapping.not_carried.append(
            f"user data: could not be read at capture ({facts['user_data_unknown']})"
        )
    if subnet:
        mapping.run["SubnetId"] = subnet
    return mapping


def _key_pair_exists(compute: AwsCompute, name: str) -> bool | str:
    """True, or why not (said to the reader)."""
    try:
        found = compute.ec2.describe_key_pairs(KeyNames=[name]).get("KeyPairs") or []
    except ClientError as exc:
        if error_code(exc) == "InvalidKeyPair.NotFound":
            return f"none of that name in {compute.settings.aws_region}"
        return f"cannot check ({error_code(exc)})"
    except BotoCoreError as exc:
        return f"cannot check ({type(exc).__name__})"
    if any(k.get("KeyName") == name for k in found):
        return True
    return f"none of that name in {compute.settings.aws_region}"


def _instance_profile(compute: AwsCompute, name: str) -> str:
    """The ARN of the instance profile of this name in the destination's account, or why
    not (said to the reader). Instance profiles are global to an account."""
    iam = compute._clients.client(compute.settings, "iam")
    try:
        answer = iam.get_instance_profile(InstanceProfileName=name)
    except ClientError as exc:
        if error_code(exc) == "NoSuchEntity":
            return "none of that name in the destination's account"
        return f"cannot check ({error_code(exc)})"
    except BotoCoreError as exc:
        return f"cannot check ({type(exc).__name__})"
    return str((answer.get("InstanceProfile") or {}).get("Arn") or "no ARN in the answer")


def _map_groups(
    compute: AwsCompute, groups: Sequence[Mapping[str, str]], vpc_id: str | None
) -> tuple[list[str], list[Mapping[str, str]]]:
    """The destination's group ids for the source's ``groups``, and the groups not found:
    a group tagged ``regionvault:security-group`` with the source group's id or name, else
    one of the same name, in the VPC the instance launches into (``vpc_id``; else the
    default VPC; with none, a ComputeError before anything is made)."""
    if vpc_id is None:
        vpc_id = _default_vpc(compute)
    if vpc_id is None:
        # never a group of the same name from any VPC: EC2 would refuse it (and, with no
        # default VPC, an instance without a subnet) only after the image is registered
        raise ComputeError(
            f"no default VPC in {compute.settings.aws_region} to launch into: set subnet_id",
            provider="aws",
            region=compute.region,
        )
    filters = [{"Name": "vpc-id", "Values": [vpc_id]}]
    candidates: list[Mapping[str, Any]] = []
    token: str | None = None
    for _page in range(_MAX_PAGES):
        kwargs: dict[str, Any] = {"Filters": filters, "MaxResults": 1000}
        if token:
            kwargs["NextToken"] = token
        try:
            answer = compute.ec2.describe_security_groups(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _call_error(exc, "cannot list the security groups to map", compute) from None
        candidates.extend(answer.get("SecurityGroups") or [])
        token = answer.get("NextToken")
        if not token:
            break
    by_tag: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for group in candidates:
        tags = {t["Key"]: t["Value"] for t in group.get("Tags") or []}
        if GROUP_TAG in tags:
            by_tag.setdefault(tags[GROUP_TAG], str(group["GroupId"]))
        by_name.setdefault(str(group.get("GroupName")), str(group["GroupId"]))
    ids: list[str] = []
    missing: list[Mapping[str, str]] = []
    for source in groups:
        found = (
            by_tag.get(source.get("id", ""))
            or by_tag.get(source.get("name", ""))
            or by_name.get(source.get("name", ""))
        )
        if found is None:
            missing.append(source)
        elif found not in ids:
            ids.append(found)
    return ids, missing


def _default_vpc(compute: AwsCompute) -> str | None:
    try:
        vpcs = compute.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}]).get(
            "Vpcs"
        )
    except (ClientError, BotoCoreError) as exc:
        raise _call_error(exc, "cannot find the default VPC", compute) from None
    return str(vpcs[0]["VpcId"]) if vpcs else None


def launch_subnet(
    compute: AwsCompute, spec: LaunchSpec, facts: Mapping[str, Any]
) -> tuple[str | None, str | None, str | None, str | None]:
    """``(subnet, its VPC, its zone, a not-carried line or None)`` of a launch: the
    launch's or the region's ``subnet_id`` (one that does not exist, or lies outside a zone
    region's zone, fails the launch before anything is made);
    else, in the source's own AWS region, the source's subnet (a restore in place lands
    where the instance was), or the default VPC when that subnet is gone or another
    account's; else (another region) the default VPC."""
    given = spec.extra.get("subnet_id") or compute.settings.subnet_id
    if given:
        vpc_id, zone = subnet_place(compute, str(given))
        own = getattr(compute.settings, "availability_zone", None)
        if own and zone and zone != own:
            # a zone region lists only its zone's instances: one launched elsewhere would be
            # beyond its sight (never health-checked, never terminated)
            raise ComputeError(
                f"subnet {given} is in {zone}, not this region's zone {own}: give a subnet_id "
                f"in {own}",
                provider="aws",
                region=compute.region,
            )
        return str(given), vpc_id, zone, None
    source_region = facts.get("source_region") or facts.get("aws_region")
    source_subnet = facts.get("subnet_id")
    if not source_subnet or source_region != compute.settings.aws_region:
        return None, None, None, None
    place = _subnet(compute, str(source_subnet))
    if place is None:
        gone = f"subnet {source_subnet}: not in this account's {compute.settings.aws_region}"
        return None, None, None, f"{gone}; launched into the default VPC"
    zone = getattr(compute.settings, "availability_zone", None)
    if zone and place[1] != zone:
        # a zone region launches into its own zone: the source's subnet lies in another
        return (
            None,
            None,
            None,
            (
                f"subnet {source_subnet}: in {place[1]}, not this region's zone {zone}; "
                "launched into the default VPC"
            ),
        )
    return str(source_subnet), place[0], place[1], None


def subnet_place(compute: AwsCompute, subnet: str) -> tuple[str | None, str | None]:
    """``(VPC id, availability zone)`` of the subnet a launch goes into; a ComputeError
    naming it when it does not exist."""
    place = _subnet(compute, subnet)
    if place is None:
        raise ComputeError(
            f"subnet {subnet} does not exist in {compute.settings.aws_region}",
            provider="aws",
            region=compute.region,
        )
    return place


def _subnet(compute: AwsCompute, subnet: str) -> tuple[str | None, str | None] | None:
    """``(VPC id, availability zone)`` of the subnet, None when there is no such subnet."""
    try:
        found = compute.ec2.describe_subnets(SubnetIds=[subnet]).get("Subnets") or []
    except ClientError as exc:
        if error_code(exc) in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
            return None
        raise _call_error(exc, f"cannot describe subnet {subnet}", compute) from None
    except BotoCoreError as exc:
        raise _call_error(exc, f"cannot describe subnet {subnet}", compute) from None
    if not found:
        return None
    return found[0].get("VpcId"), found[0].get("AvailabilityZone")


def offered_type(
    compute: AwsCompute,
    wanted: str,
    zone: str | None,
    name: str,
    architecture: str | None = None,
) -> tuple[str, str | None]:
    """``(instance type to launch, a not-carried line or None)``: ``wanted`` when
    DescribeInstanceTypeOfferings says the region (or ``zone``, where the launch goes)
    offers it, else the first of the region's ``fallback_instance_types`` that is offered
    and, when the source's ``architecture`` is known, runs it (DescribeInstanceTypes: the
    image keeps the source's architecture; the others are skipped and named); a
    ComputeError naming the type, the place (and the architecture) when none is."""
    fallbacks = [t for t in compute.settings.fallback_instance_types if t != wanted]
    candidates = [wanted, *fallbacks]
    where = zone or compute.settings.aws_region
    kwargs: dict[str, Any] = {
        "LocationType": "availability-zone" if zone else "region",
        "Filters": [{"Name": "instance-type", "Values": candidates}],
    }
    if zone:
        kwargs["Filters"].append({"Name": "location", "Values": [zone]})
    offered: set[str] = set()
    token: str | None = None
    for _page in range(_MAX_PAGES):
        if token:
            kwargs["NextToken"] = token
        try:
            answer = compute.ec2.describe_instance_type_offerings(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _call_error(
                exc, f"launch {name!r}: cannot read the instance type offerings", compute
            ) from None
        offered.update(str(o.get("InstanceType")) for o in answer.get("InstanceTypeOfferings", []))
        token = answer.get("NextToken")
        if not token:
            break
    if wanted in offered:
        return wanted, None
    usable = [t for t in fallbacks if t in offered]
    skipped: list[str] = []
    if architecture and usable:
        runs = _architectures(compute, usable, name)
        skipped = [f"{t} ({'+'.join(sorted(runs.get(t, ()))) or '?'})" for t in usable
                   if architecture not in runs.get(t, ())]  # fmt: skip
        usable = [t for t in usable if architecture in runs.get(t, ())]
    skip_note = (
        f"; skipped {', '.join(skipped)}: not {architecture}, the source's architecture"
        if skipped
        else ""
    )
    if usable:
        return usable[0], (
            f"instance type {wanted}: not offered in {where}; launched as {usable[0]} "
            f"(fallback_instance_types){skip_note}"
        )
    tail = (
        f", nor is any of fallback_instance_types ({', '.join(fallbacks)}){skip_note}"
        if fallbacks
        else " (set fallback_instance_types to launch another type instead)"
    )
    raise ComputeError(
        f"launch {name!r}: instance type {wanted} is not offered in {where}{tail}",
        provider="aws",
        region=compute.region,
    )


def _architectures(compute: AwsCompute, types: list[str], name: str) -> dict[str, set[str]]:
    """The architectures each of ``types`` runs (DescribeInstanceTypes)."""
    try:
        answer = compute.ec2.describe_instance_types(InstanceTypes=types)
    except (ClientError, BotoCoreError) as exc:
        raise _call_error(
            exc, f"launch {name!r}: cannot read the architectures of {', '.join(types)}", compute
        ) from None
    return {
        str(t.get("InstanceType")): {
            str(a) for a in (t.get("ProcessorInfo") or {}).get("SupportedArchitectures") or []
        }
        for t in answer.get("InstanceTypes", [])
    }


def billing_products(compute: AwsCompute, facts: Mapping[str, Any]) -> list[str]:
    """The BillingProducts to register the image with: the region's ``billing_products``
    for the source's usage operation (only accounts AWS authorised may pass them)."""
    usage = _source_usage(facts)
    return list(compute.settings.billing_products.get(usage, ())) if usage else []


def _source_usage(facts: Mapping[str, Any]) -> str | None:
    billing: Mapping[str, Any] = facts.get("billing") or {}
    image: Mapping[str, Any] = billing.get("image") or {}
    usage = billing.get("usage_operation") or image.get("usage_operation")
    return str(usage) if usage else None


def billing_not_carried(
    compute: AwsCompute, image_id: str, facts: Mapping[str, Any], passed: Sequence[str]
) -> list[str]:
    """What of the source's billing details the image registered from its snapshots lacks:
    a usage operation (Windows, RHEL, SQL Server licensing: ``RunInstances:0002``...)
    other than the image's, and Marketplace product codes, which an image registered from
    snapshots never has. Read back from DescribeImages of the new image."""
    billing: Mapping[str, Any] = facts.get("billing") or {}
    source_image: Mapping[str, Any] = billing.get("image") or {}
    usage = _source_usage(facts)
    platform = billing.get("platform_details") or source_image.get("platform_details")
    lines: list[str] = []
    codes = billing.get("product_codes") or source_image.get("product_codes") or []
    if not codes and (not usage or usage == "RunInstances"):
        return lines  # Linux/UNIX without product codes: what every such image has
    try:
        images = compute.ec2.describe_images(ImageIds=[image_id]).get("Images") or []
    except (ClientError, BotoCoreError) as exc:
        raise _call_error(exc, f"cannot describe image {image_id}", compute) from None
    now = _billing_of(images[0]) if images else {}
    if usage and usage != "RunInstances" and now.get("usage_operation") != usage:
        how = (
            f"BillingProducts {', '.join(passed)} were passed, yet"
            if passed
            else "RegisterImage from snapshots drops it;"
        )
        lines.append(
            f"billing: the source ran as {platform or 'another platform'} ({usage}); {how} "
            f"image {image_id} reports {now.get('platform_details') or 'no platform'} "
            f"({now.get('usage_operation') or 'no usage operation'})"
        )
    kept = {c.get("code") for c in now.get("product_codes") or []}
    lost = [c for c in codes if c.get("code") not in kept]
    if lost:
        lines.append(
            "billing: product codes "
            + ", ".join(f"{c.get('code')} ({c.get('type') or 'product'})" for c in lost)
            + f" are not on image {image_id} (an image registered from snapshots has none)"
        )
    return lines


# ---------------------------------------------------------------------- health


def instance_health(compute: AwsCompute, instance_id: str) -> CloudHealth:
    """EC2's status checks of the instance (DescribeInstanceStatus): healthy when it runs
    and its instance and system status checks (and the attached EBS status check, where
    EC2 reports one) are ``ok``."""
    try:
        answer = compute.ec2.describe_instance_status(
            InstanceIds=[instance_id], IncludeAllInstances=True
        )
    except (ClientError, BotoCoreError) as exc:
        if error_code(exc) == "InvalidInstanceID.NotFound":  # not yet listed after a launch
            raise InstanceNotFound(instance_id, provider="aws", region=compute.region) from None
        raise _call_error(exc, f"cannot read the status checks of {instance_id}", compute) from None
    found = [s for s in answer.get("InstanceStatuses", []) if s.get("InstanceId") == instance_id]
    if not found:
        return CloudHealth(False, "EC2 reports no status checks yet")
    status = found[0]
    state = (status.get("InstanceState") or {}).get("Name", "unknown")
    checks = [
        ("instance", (status.get("InstanceStatus") or {}).get("Status", "unknown")),
        ("system", (status.get("SystemStatus") or {}).get("Status", "unknown")),
    ]
    if status.get("AttachedEbsStatus"):
        checks.append(("attached EBS", status["AttachedEbsStatus"].get("Status", "unknown")))
    # an instance with no attached EBS status check to run is told "not-applicable"
    ok = state == "running" and all(
        value == "ok" or (what == "attached EBS" and value == "not-applicable")
        for what, value in checks
    )
    detail = f"state {state}, " + ", ".join(f"{what} status {value}" for what, value in checks)
    return CloudHealth(ok, "" if ok else f"EC2 status checks: {detail}")
