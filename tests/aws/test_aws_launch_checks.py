"""What an EC2 launch checks before and after it runs an instance, against moto: the
destination's instance type offerings (DescribeInstanceTypeOfferings, per region or per the
zone of the launch's subnet) with ``fallback_instance_types`` or a clear error; the source's
billing details (PlatformDetails, UsageOperation, product codes) recorded at capture and
what the image registered from snapshots lost listed (or ``billing_products`` passed);
health from EC2's status checks together with the plugin's check.

moto reports every instance's status checks ``ok`` at once and no billing details at all:
the answers that say otherwise are EC2's real shapes, put into the parsed answer by a
botocore ``after-call`` handler.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, WEST, AwsWorld
from botocore.awsrequest import AWSResponse
from regionvault.core.errors import ComputeError, ConfigError, TransientError
from regionvault.core.pipeline.launch import await_healthy
from regionvault.core.plugins import hookimpl, make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.core.types import CaptureKind, Instance, LaunchSpec, Tags
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG, AwsBlockSink, AwsCompute
from regionvault.providers.aws.settings import AwsSettings
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, live_mode, seed_snapshot

pytestmark = pytest.mark.skipif(live_mode(), reason="moto only: answers are rewritten")

BS = EBS_BLOCK_SIZE
#: offered in eu-west-1 by moto's offerings data; NOT_OFFERED is not
OFFERED, NOT_OFFERED = "m5.large", "u-24tb1.112xlarge"


def _sink(compute: AwsCompute, spec: LaunchSpec) -> AwsBlockSink:
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=BS)
    assert isinstance(sink, AwsBlockSink)
    sink.write(0, b"boot".ljust(BS, b"\0"))
    sink.commit()
    return sink


def _recorder(compute: AwsCompute) -> dict[str, dict[str, Any]]:
    sent: dict[str, dict[str, Any]] = {}

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        sent[model.name] = dict(params)

    compute.ec2.meta.events.register("provide-client-params.ec2.*", record)
    return sent


def _restore_leftovers(aws: AwsWorld, name: str) -> list[str]:
    ec2 = aws.client("ec2", WEST)
    found = ec2.describe_snapshots(Filters=[{"Name": "tag:regionvault:restore", "Values": [name]}])
    images = ec2.describe_images(Filters=[{"Name": "tag:regionvault:restore", "Values": [name]}])
    return [s["SnapshotId"] for s in found["Snapshots"]] + [i["ImageId"] for i in images["Images"]]


def test_an_instance_type_not_offered_fails_clearly_before_anything_runs(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    sent = _recorder(west)
    spec = LaunchSpec(name=f"big-{aws.tag}", extra={"instance_type": NOT_OFFERED})
    sink = _sink(west, spec)
    with pytest.raises(
        ComputeError,
        match=rf"instance type {NOT_OFFERED} is not offered in {WEST} \(set "
        "fallback_instance_types",
    ):
        west.launch(spec, sink)
    assert sent["DescribeInstanceTypeOfferings"]["LocationType"] == "region"
    assert "RegisterImage" not in sent and "RunInstances" not in sent
    sink.discard()
    assert _restore_leftovers(aws, spec.name) == []


def test_fallback_instance_types_launch_the_first_offered_and_say_so(aws: AwsWorld) -> None:
    cfg = aws.region(WEST, fallback_instance_types=["p5.48xlarge", OFFERED, "t3.micro"])
    west = aws.track(aws.provider.compute(cfg))
    sent = _recorder(west)
    spec = LaunchSpec(name=f"fallback-{aws.tag}", extra={"instance_type": NOT_OFFERED})
    launched = west.launch(spec, _sink(west, spec))
    assert sent["RunInstances"]["InstanceType"] == OFFERED
    assert launched.not_carried == (
        f"instance type {NOT_OFFERED}: not offered in {WEST}; launched as {OFFERED} "
        "(fallback_instance_types)",
    )
    west.terminate(launched.id)

    # none of them offered: the error names the type, the place and the fallbacks
    cfg = aws.region(WEST, fallback_instance_types=["p5.48xlarge"])
    west = aws.track(aws.provider.compute(cfg))
    spec = LaunchSpec(name=f"none-{aws.tag}", extra={"instance_type": NOT_OFFERED})
    sink = _sink(west, spec)
    with pytest.raises(ComputeError, match=r"nor is any of fallback_instance_types \(p5\."):
        west.launch(spec, sink)
    sink.discard()


def test_a_launch_into_a_subnet_checks_the_offerings_of_its_zone(aws: AwsWorld) -> None:
    ec2 = aws.client("ec2", WEST)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])[
        "Subnets"
    ][0]
    west = aws.track(aws.provider.compute(aws.region(WEST, subnet_id=subnet["SubnetId"])))
    sent = _recorder(west)
    spec = LaunchSpec(name=f"zoned-{aws.tag}", extra={"instance_type": OFFERED})
    launched = west.launch(spec, _sink(west, spec))
    offerings = sent["DescribeInstanceTypeOfferings"]
    assert offerings["LocationType"] == "availability-zone"
    assert {"Name": "location", "Values": [subnet["AvailabilityZone"]]} in offerings["Filters"]
    assert sent["RunInstances"]["SubnetId"] == subnet["SubnetId"]
    west.terminate(launched.id)

    # a subnet that does not exist is refused before an image is registered
    west = aws.track(aws.provider.compute(aws.region(WEST, subnet_id="subnet-0badc0ffee0000000")))
    sent = _recorder(west)
    spec = LaunchSpec(name=f"nowhere-{aws.tag}", extra={"instance_type": OFFERED})
    sink = _sink(west, spec)
    with pytest.raises(
        ComputeError, match=f"subnet subnet-0badc0ffee0000000 does not exist in {WEST}"
    ):
        west.launch(spec, sink)
    assert "RegisterImage" not in sent
    sink.discard()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fallback_instance_types": ["m5"]}, "'m5' is not an EC2 instance type"),
        ({"fallback_instance_types": "m5.large"}, "must be an array of instance types"),
        ({"billing_products": {"Windows": ["bp-6ba54002"]}}, "'Windows' is not a usage operation"),
        ({"billing_products": {"RunInstances:0002": ["6ba54002"]}}, "billing product codes"),
    ],
)
def test_bad_launch_settings_name_the_key(
    aws: AwsWorld, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        AwsSettings.from_region(aws.region(WEST, **settings))
    assert next(iter(settings)) in str(caught.value)


def _windows_marketplace(parsed: dict[str, Any], **_: Any) -> None:
    """What DescribeInstances says of an instance launched from a Windows AMI of the
    Marketplace (moto reports no billing details)."""
    for reservation in parsed.get("Reservations", []):
        for raw in reservation.get("Instances", []):
            raw["PlatformDetails"] = "Windows"
            raw["UsageOperation"] = "RunInstances:0002"
            raw["Platform"] = "windows"
            raw["ProductCodes"] = [
                {"ProductCodeId": "8fjt3h1z0example", "ProductCodeType": "marketplace"}
            ]


@pytest.mark.parametrize("pass_products", [False, True])
def test_billing_details_recorded_at_capture_and_what_the_image_lost_listed(
    aws: AwsWorld, pass_products: bool
) -> None:
    east = aws.track(aws.provider.compute(aws.region(EAST)))
    extra = {"billing_products": {"RunInstances:0002": ["bp-6ba54002"]}} if pass_products else {}
    west = aws.track(aws.provider.compute(aws.region(WEST, **extra)))
    seeded = seed_snapshot(aws.client("ebs", EAST), {0: b"C:".ljust(BS, b"\0")})
    iid = aws.run_instance(EAST, {CAPTURE_SNAPSHOT_TAG: seeded}, instance_type=OFFERED)
    east.ec2.meta.events.register("after-call.ec2.DescribeInstances", _windows_marketplace)
    with east.capture(iid) as capture:
        facts = capture.launch_facts()
    billing = facts["billing"]
    assert billing["usage_operation"] == "RunInstances:0002"
    assert billing["platform_details"] == "Windows"
    assert billing["product_codes"] == [{"code": "8fjt3h1z0example", "type": "marketplace"}]
    assert billing["image_id"] == east.get_instance(iid).extra["image_id"]

    sent = _recorder(west)
    spec = LaunchSpec(name=f"win-{aws.tag}", tags=Tags({"Name": "win"}), launch_facts=facts)
    launched = west.launch(spec, _sink(west, spec))
    if pass_products:
        assert sent["RegisterImage"]["BillingProducts"] == ["bp-6ba54002"]
    else:
        assert "BillingProducts" not in sent["RegisterImage"]
    image = sent["RunInstances"]["ImageId"]
    lines = [line for line in launched.not_carried if line.startswith("billing:")]
    # moto's image reports no usage operation: lost (or, passed, not confirmed) either way
    how = "BillingProducts bp-6ba54002 were passed, yet" if pass_products else "drops it;"
    assert lines == [
        "billing: the source ran as Windows (RunInstances:0002); "
        + ("RegisterImage from snapshots " if not pass_products else "")
        + f"{how} image {image} reports no platform (no usage operation)",
        f"billing: product codes 8fjt3h1z0example (marketplace) are not on image {image} "
        "(an image registered from snapshots has none)",
    ]
    west.terminate(launched.id)


class _Health:
    def __init__(self) -> None:
        self.answer: bool | None = None
        self.asked = 0

    @hookimpl
    def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
        self.asked += 1
        return self.answer


def _initializing(parsed: dict[str, Any], **_: Any) -> None:
    for status in parsed.get("InstanceStatuses", []):
        status["InstanceStatus"]["Status"] = "initializing"
        status["InstanceStatus"]["Details"] = [{"Name": "reachability", "Status": "initializing"}]


def test_healthy_needs_the_status_checks_and_the_plugins_check(
    aws: AwsWorld, tmp_path: Path
) -> None:
    doc = {
        "site": {"name": "health", "state_dir": str(tmp_path / "state")},
        "regions": {f"aws:{WEST}": aws.settings(WEST)},
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    plugin = _Health()
    pm = make_plugin_manager()
    pm.register(plugin)
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        region = site.region(f"aws:{WEST}")
        west = region.compute
        assert isinstance(west, AwsCompute)
        spec = LaunchSpec(name=f"checked-{aws.tag}", extra={"instance_type": OFFERED})
        launched = west.launch(spec, _sink(west, spec))
        health = west.cloud_health(launched)
        assert health is not None and health.ok  # moto: running, both checks ok

        # long enough for moto to answer on a loaded machine (a check that never turns
        # healthy waits all of it: 3 s each, twice)
        def check(timeout: float = 3.0) -> tuple[float | None, str | None]:
            return await_healthy(
                region, launched, time.monotonic(), timeout=timeout, plugin_manager=pm
            )

        plugin.answer = True
        rto, why = check()
        assert rto is not None and why is None
        # the plugin says it serves, EC2's instance status check is still initializing
        west.ec2.meta.events.register("after-call.ec2.DescribeInstanceStatus", _initializing)
        health = west.cloud_health(launched)
        assert health is not None and not health.ok
        assert "instance status initializing, system status ok" in health.detail
        rto, why = check()
        assert rto is None and why is not None
        assert "EC2 status checks: state running, instance status initializing" in why
        west.ec2.meta.events.unregister("after-call.ec2.DescribeInstanceStatus", _initializing)
        # the checks pass, the plugin says not yet
        plugin.answer = False
        asked = plugin.asked
        rto, why = check()
        assert rto is None and why is not None and "the plugin's health check says not yet" in why
        assert plugin.asked > asked
        # no plugin answer: the status checks alone
        plugin.answer = None
        rto, why = check()
        assert rto is not None
        west.terminate(launched.id)


def test_user_data_that_cannot_be_read_at_capture_is_listed_not_lost(aws: AwsWorld) -> None:
    """DescribeInstanceAttribute denied (a role without it): the backup goes on, the facts
    say the user data is unknown and why, and the launch lists it as not carried over; a
    throttled call fails the capture's facts (the job is retried) rather than record that."""
    east = aws.track(aws.provider.compute(aws.region(EAST)))
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    seeded = seed_snapshot(aws.client("ebs", EAST), {0: b"boot".ljust(BS, b"\0")})
    iid = aws.run_instance(EAST, {CAPTURE_SNAPSHOT_TAG: seeded}, instance_type=OFFERED)
    code = "UnauthorizedOperation"

    def refused(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        error = {"Code": code, "Message": "You are not authorized to perform this operation."}
        status = 403 if code == "UnauthorizedOperation" else 503
        answer = AWSResponse("https://ec2.invalid/", status, {}, None)
        return answer, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}

    east.ec2.meta.events.register("before-call.ec2.DescribeInstanceAttribute", refused)
    with east.capture(iid) as capture:
        facts = capture.launch_facts()
        assert "user_data" not in facts and facts["user_data_unknown"] == code
        code = "RequestLimitExceeded"
        with pytest.raises(TransientError, match=f"cannot read the user data of {iid}"):
            capture.launch_facts()
    spec = LaunchSpec(name=f"nodata-{aws.tag}", launch_facts=facts)
    launched = west.launch(spec, _sink(west, spec))
    assert launched.not_carried == (
        "user data: could not be read at capture (UnauthorizedOperation)",
    )
    west.terminate(launched.id)


def test_a_restore_in_place_lands_in_the_source_subnet_with_its_groups(aws: AwsWorld) -> None:
    """In the source's own region, with no subnet_id given, the launch goes into the
    source's subnet (a VPC of its own, not the default one) and its security groups are
    found in that VPC; a source subnet that is gone (another account) is listed and the
    launch goes into the default VPC."""
    east = aws.track(aws.provider.compute(aws.region(EAST)))
    ec2 = aws.client("ec2", EAST)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    # a zone moto's offerings list the type in (without one, moto picks any zone, and
    # us-east-1e offers no m5.large)
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24", AvailabilityZone=f"{EAST}a")[
        "Subnet"
    ]["SubnetId"]
    group = ec2.create_security_group(GroupName="vdu", Description="vdu", VpcId=vpc)["GroupId"]
    # a group of the same name in the default VPC must not be the one chosen
    ec2.create_security_group(GroupName="vdu", Description="elsewhere")
    seeded = seed_snapshot(aws.client("ebs", EAST), {0: b"boot".ljust(BS, b"\0")})
    source = ec2.run_instances(
        ImageId=aws.base_image(EAST),
        InstanceType=OFFERED,
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        SecurityGroupIds=[group],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": CAPTURE_SNAPSHOT_TAG, "Value": seeded}]}
        ],
    )["Instances"][0]["InstanceId"]
    aws.instances.append((EAST, source))
    with east.capture(source) as capture:
        facts = capture.launch_facts()
    assert facts["subnet_id"] == subnet and facts["source_region"] == EAST

    sent = _recorder(east)
    spec = LaunchSpec(name=f"in-place-{aws.tag}", launch_facts=facts)
    launched = east.launch(spec, _sink(east, spec))
    assert sent["RunInstances"]["SubnetId"] == subnet
    assert sent["RunInstances"]["SecurityGroupIds"] == [group]
    assert launched.not_carried == ()
    east.terminate(launched.id)

    gone = {**facts, "subnet_id": "subnet-0deadbeef0000000"}
    spec = LaunchSpec(name=f"elsewhere-{aws.tag}", launch_facts=gone)
    launched = east.launch(spec, _sink(east, spec))
    assert "SubnetId" not in sent["RunInstances"]
    assert launched.not_carried[0] == (
        f"subnet subnet-0deadbeef0000000: not in this account's {EAST}; "
        "launched into the default VPC"
    )
    east.terminate(launched.id)


# ---------------------------------------------------------------- review rev5 (fix4)


def test_a_zone_region_refuses_a_given_subnet_of_another_zone(aws: AwsWorld) -> None:
    ec2 = aws.client("ec2", WEST)
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    other = next(s for s in subnets["Subnets"] if s["AvailabilityZone"] != WEST + "a")
    region = aws.region(WEST, availability_zone=WEST + "a", subnet_id=other["SubnetId"])
    west = aws.track(aws.provider.compute(region))
    sent = _recorder(west)
    spec = LaunchSpec(name=f"zs-{aws.tag}", extra={"instance_type": OFFERED})
    sink = _sink(west, spec)
    with pytest.raises(
        ComputeError,
        match=rf"subnet {other['SubnetId']} is in {other['AvailabilityZone']}, not this "
        rf"region's zone {WEST}a",
    ):
        west.launch(spec, sink)
    assert "RegisterImage" not in sent and "RunInstances" not in sent
    sink.discard()
    assert _restore_leftovers(aws, spec.name) == []


def test_status_not_found_right_after_launch_is_not_yet(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    spec = LaunchSpec(name=f"eventual-{aws.tag}", extra={"instance_type": OFFERED})
    launched = west.launch(spec, _sink(west, spec))
    calls = {"n": 0}

    def not_yet(**_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        calls["n"] += 1
        if calls["n"] > 1:
            return None
        error = {"Code": "InvalidInstanceID.NotFound", "Message": "does not exist"}
        answer = AWSResponse("https://ec2.invalid/", 400, {}, None)  # type: ignore[arg-type]
        return answer, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}

    west.ec2.meta.events.register("before-call.ec2.DescribeInstanceStatus", not_yet)
    region: Any = type("R", (), {"name": "aws:" + WEST, "compute": west})
    pm = make_plugin_manager(load_entry_points=False)
    try:
        rto, why = await_healthy(region, launched, time.monotonic(), timeout=30, plugin_manager=pm)
    finally:
        west.terminate(launched.id)
    assert why is None and rto is not None
    assert calls["n"] >= 2


def test_attached_ebs_not_applicable_counts_as_ok(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    spec = LaunchSpec(name=f"na-{aws.tag}", extra={"instance_type": OFFERED})
    launched = west.launch(spec, _sink(west, spec))

    def status(value: str) -> Any:
        def rewrite(parsed: dict[str, Any], **_: Any) -> None:
            for found in parsed.get("InstanceStatuses", []):
                found["AttachedEbsStatus"] = {"Status": value}

        return rewrite

    try:
        west.ec2.meta.events.register(
            "after-call.ec2.DescribeInstanceStatus", status("not-applicable"), unique_id="ebs"
        )
        health = west.cloud_health(launched)
        assert health is not None and health.ok, health
        west.ec2.meta.events.unregister("after-call.ec2.DescribeInstanceStatus", unique_id="ebs")
        west.ec2.meta.events.register(
            "after-call.ec2.DescribeInstanceStatus", status("insufficient-data"), unique_id="ebs2"
        )
        health = west.cloud_health(launched)
        assert health is not None and not health.ok
        assert "attached EBS status insufficient-data" in health.detail
    finally:
        west.terminate(launched.id)


@pytest.mark.parametrize(
    ("facts", "member"),
    [
        ({"security_groups": "sg-1"}, "security_groups"),
        ({"security_groups": [1, 2]}, "security_groups"),
        ({"billing": "x"}, "billing"),
        ({"billing": {"usage_operation": "RunInstances:0002", "product_codes": ["x"]}}, "billing"),
        ({"key_name": ["a"]}, "key_name"),
        ({"user_data": 7}, "user_data"),
        ({"root_device_name": 7}, "root_device_name"),
    ],
)
def test_launch_facts_of_the_wrong_type_are_named_not_applied(
    aws: AwsWorld, facts: dict[str, Any], member: str
) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    spec = LaunchSpec(
        name=f"hostile-{aws.tag}",
        extra={"instance_type": OFFERED},
        launch_facts={"aws": 1, "instance_type": OFFERED, **facts},
    )
    launched = west.launch(spec, _sink(west, spec))
    try:
        assert f"launch fact {member}: not " in "\n".join(launched.not_carried)
        assert all(str(v) not in line for v in facts.values() for line in launched.not_carried)
    finally:
        west.terminate(launched.id)


def test_launch_facts_of_a_newer_version_are_not_applied(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    sent = _recorder(west)
    facts = {"aws": 2, "instance_type": OFFERED, "user_data": "aGVsbG8=", "key_name": "ops"}
    spec = LaunchSpec(name=f"newer-{aws.tag}", extra={"instance_type": OFFERED}, launch_facts=facts)
    launched = west.launch(spec, _sink(west, spec))
    try:
        assert launched.not_carried[0].startswith(
            "launch facts of version 2 (this version reads 1)"
        )
        assert "UserData" not in sent["RunInstances"] and "KeyName" not in sent["RunInstances"]
    finally:
        west.terminate(launched.id)


def test_a_fallback_of_another_architecture_is_skipped_and_named(aws: AwsWorld) -> None:
    region = aws.region(WEST, fallback_instance_types=["m6g.large", "m6i.large"])
    west = aws.track(aws.provider.compute(region))
    sent = _recorder(west)
    facts = {"aws": 1, "instance_type": NOT_OFFERED, "architecture": "x86_64"}
    spec = LaunchSpec(name=f"arch-{aws.tag}", launch_facts=facts)
    launched = west.launch(spec, _sink(west, spec))
    try:
        assert sent["RunInstances"]["InstanceType"] == "m6i.large"
        assert sent["RegisterImage"]["Architecture"] == "x86_64"
        line = next(x for x in launched.not_carried if x.startswith("instance type"))
        assert "launched as m6i.large" in line
        assert "skipped m6g.large (arm64): not x86_64" in line
    finally:
        west.terminate(launched.id)


def test_no_fallback_of_the_source_architecture_fails_before_registering(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST, fallback_instance_types=["m6g.large"])))
    sent = _recorder(west)
    facts = {"aws": 1, "instance_type": NOT_OFFERED, "architecture": "x86_64"}
    spec = LaunchSpec(name=f"arch2-{aws.tag}", launch_facts=facts)
    sink = _sink(west, spec)
    with pytest.raises(ComputeError, match=r"skipped m6g\.large \(arm64\): not x86_64"):
        west.launch(spec, sink)
    assert "RegisterImage" not in sent and "RunInstances" not in sent
    sink.discard()


def _refuse_run_with_profile(west: AwsCompute, always: bool = False) -> None:
    def refused(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if not always and "IamInstanceProfile" not in str(params.get("body")):
            return None
        error = {"Code": "UnauthorizedOperation", "Message": "You are not authorized"}
        answer = AWSResponse("https://ec2.invalid/", 403, {}, None)  # type: ignore[arg-type]
        return answer, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}

    west.ec2.meta.events.register("before-call.ec2.RunInstances", refused)


def test_a_refused_pass_role_launches_without_the_profile_and_says_so(aws: AwsWorld) -> None:
    aws.client("iam", WEST).create_instance_profile(InstanceProfileName=f"prof-{aws.tag}")
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    _refuse_run_with_profile(west)
    arn = f"arn:aws:iam::123456789012:instance-profile/prof-{aws.tag}"
    facts = {"aws": 1, "instance_profile_arn": arn}
    spec = LaunchSpec(name=f"pr-{aws.tag}", extra={"instance_type": OFFERED}, launch_facts=facts)
    launched = west.launch(spec, _sink(west, spec))
    try:
        assert (
            f"instance profile prof-{aws.tag}: not passed (RunInstances refused it, "
            "UnauthorizedOperation: the launch role may lack iam:PassRole on its role)"
        ) in launched.not_carried
    finally:
        west.terminate(launched.id)


def test_a_launch_refused_without_the_profile_too_names_it(aws: AwsWorld) -> None:
    aws.client("iam", WEST).create_instance_profile(InstanceProfileName=f"prof2-{aws.tag}")
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    _refuse_run_with_profile(west, always=True)
    arn = f"arn:aws:iam::123456789012:instance-profile/prof2-{aws.tag}"
    facts = {"aws": 1, "instance_profile_arn": arn}
    spec = LaunchSpec(name=f"pr2-{aws.tag}", extra={"instance_type": OFFERED}, launch_facts=facts)
    sink = _sink(west, spec)
    with pytest.raises(ComputeError, match=f"refused with instance profile prof2-{aws.tag}"):
        west.launch(spec, sink)
    sink.discard()


def test_groups_with_no_subnet_and_no_default_vpc_fail_before_registering(aws: AwsWorld) -> None:
    ec2 = aws.client("ec2", WEST)
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    ec2.create_security_group(GroupName="vdu", Description="another VPC's", VpcId=vpc)
    west = aws.track(aws.provider.compute(aws.region(WEST)))

    def no_default(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Vpcs"] = []

    west.ec2.meta.events.register("after-call.ec2.DescribeVpcs", no_default)
    sent = _recorder(west)
    facts = {"aws": 1, "security_groups": [{"id": "sg-0src", "name": "vdu"}]}
    spec = LaunchSpec(name=f"novpc-{aws.tag}", extra={"instance_type": OFFERED}, launch_facts=facts)
    sink = _sink(west, spec)
    with pytest.raises(
        ComputeError, match=f"no default VPC in {WEST} to launch into: set subnet_id"
    ):
        west.launch(spec, sink)
    assert "RegisterImage" not in sent and "RunInstances" not in sent
    sink.discard()


def test_data_device_names_are_slots_and_stay_in_ec2_range() -> None:
    from regionvault.providers.aws.ec2 import _data_devices

    # sdf and xvdf are one attachment point (Xen renames one to the other)
    assert _data_devices(["/dev/xvdf", "lun1"], "/dev/xvda") == ["/dev/xvdf", "/dev/sdg"]
    assert _data_devices(["/dev/sdf", "/dev/xvdf"], "/dev/sda1") == ["/dev/sdf", "/dev/sdg"]
    # after /dev/sdz come /dev/xvdba.. (never /dev/sdaa, which EC2 does not take)
    many = _data_devices([f"lun{i}" for i in range(23)], "/dev/xvda")
    assert many[20:] == ["/dev/sdz", "/dev/xvdba", "/dev/xvdbb"]
    assert _data_devices(["/dev/sdaa"], "/dev/xvda") == ["/dev/sdf"]
    with pytest.raises(ComputeError, match="more than EC2 has device names for"):
        _data_devices([f"lun{i}" for i in range(80)], "/dev/xvda")
