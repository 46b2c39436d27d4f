"""A whole EC2 instance carried from us-east-1 into eu-west-1 through the engine: two EBS
volumes, an instance profile, a key pair, two security groups, user data holding a secret
and the instance's tags, backed up, copied and launched from the copy.

Shown against moto: each disk is restored into a snapshot of its own whose blocks equal the
original's, and the image maps each at the device name it had (the root /dev/sda1, the data
volume /dev/sdh: not renumbered); RunInstances carries the profile, the key pair, the
security group mapped by its tag in the destination, the user data and the tags; the group
the destination lacks is listed as not carried over. The user data travels only inside the
sealed manifest (and the sealed offer): no bucket object, inbox payload, tag or log line
holds it. moto cannot boot the image, so the mapping is asserted on the requests.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.core.types import Disk
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.launching import GROUP_TAG
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, live_mode, seed_snapshot

pytestmark = pytest.mark.skipif(
    live_mode(), reason="moto only: it launches instances and leaves profiles and key pairs"
)

A, B = f"aws:{EAST}", f"aws:{WEST}"
BS = EBS_BLOCK_SIZE
GiB = 1024**3
SECRET = "subscriber-db-password=Zq8-not-for-logs"
USER_DATA = f"#!/bin/sh\nexport {SECRET}\nsystemctl start vdu\n".encode()


def _block(text: str) -> bytes:
    return text.encode().ljust(BS, b"\0")


def _snapshot_blocks(aws: AwsWorld, aws_region: str, snapshot_id: str) -> dict[int, bytes]:
    ebs = aws.client("ebs", aws_region)
    out = {}
    for block in ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]:
        answer = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )
        out[int(block["BlockIndex"])] = answer["BlockData"].read()
    return out


def _default_vpc(aws: AwsWorld, aws_region: str) -> str:
    vpcs = aws.client("ec2", aws_region).describe_vpcs(
        Filters=[{"Name": "is-default", "Values": ["true"]}]
    )["Vpcs"]
    return str(vpcs[0]["VpcId"])


def _group(aws: AwsWorld, aws_region: str, name: str, tags: dict[str, str] | None = None) -> str:
    ec2 = aws.client("ec2", aws_region)
    kwargs: dict[str, Any] = {
        "GroupName": name,
        "Description": f"{name} (test)",
        "VpcId": _default_vpc(aws, aws_region),
    }
    if tags:
        kwargs["TagSpecifications"] = [
            {
                "ResourceType": "security-group",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
        ]
    return str(ec2.create_security_group(**kwargs)["GroupId"])


def _everything_stored(aws: AwsWorld) -> list[tuple[str, bytes]]:
    """Every object version in every bucket of either region."""
    found = []
    for where in (EAST, WEST):
        s3 = aws.client("s3", where)
        for bucket in s3.list_buckets()["Buckets"]:
            name = bucket["Name"]
            versions = s3.list_object_versions(Bucket=name).get("Versions", [])
            for v in versions:
                body = s3.get_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"])
                found.append((f"{name}/{v['Key']}", body["Body"].read()))
    return found


def test_a_two_volume_instance_is_carried_whole_into_another_region(
    aws: AwsWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="regionvault")
    iam = aws.client("iam", EAST)
    iam.create_role(RoleName=f"vdu-{aws.tag}", AssumeRolePolicyDocument="{}")
    profile = iam.create_instance_profile(InstanceProfileName=f"vdu-{aws.tag}")["InstanceProfile"]
    iam.add_role_to_instance_profile(
        InstanceProfileName=f"vdu-{aws.tag}", RoleName=f"vdu-{aws.tag}"
    )
    for where in (EAST, WEST):
        aws.client("ec2", where).create_key_pair(KeyName="ops")
    signalling = _group(aws, EAST, "vdu-signalling")
    oam = _group(aws, EAST, "vdu-oam")
    # the destination's group for signalling has another name: its tag maps it; no oam there
    west_signalling = _group(aws, WEST, "sig-eu", {GROUP_TAG: "vdu-signalling"})
    _group(aws, WEST, "unrelated")

    root = {0: os.urandom(BS), 3: _block("boot config"), 2047: _block("root tail")}
    data = {0: _block("subscriber db"), 1: os.urandom(BS), 900: os.urandom(BS)}
    ebs = aws.client("ebs", EAST)
    tags = {
        "backup": "1-7",
        "Name": "vdu-1",
        "function": "vdu",
        CAPTURE_SNAPSHOT_TAG: seed_snapshot(ebs, root),
        f"{CAPTURE_SNAPSHOT_TAG}:/dev/sdh": seed_snapshot(ebs, data),
    }
    ec2_east = aws.client("ec2", EAST)
    iid = str(
        ec2_east.run_instances(
            ImageId=aws.base_image(EAST),
            InstanceType="m5.large",
            MinCount=1,
            MaxCount=1,
            KeyName="ops",
            SecurityGroupIds=[signalling, oam],
            IamInstanceProfile={"Name": f"vdu-{aws.tag}"},
            UserData=USER_DATA,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        )["Instances"][0]["InstanceId"]
    )
    aws.instances.append((EAST, iid))

    doc = {
        "site": {"name": "whole-instance", "state_dir": str(tmp_path / "state")},
        "regions": {A: aws.settings(EAST), B: aws.settings(WEST)},
        "replication": [{"from": A, "to": B}],
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, health_timeout=5.0)
        point = engine.backup(iid, region=A)
        copy = engine.copy(point.id, to=B).point
        manifest = engine.repository(B).load_manifest(copy.id)
        assert manifest.disks == (Disk("/dev/sda1", 0, GiB), Disk("/dev/sdh", GiB, GiB))
        # recorded at capture, carried by the copy, inside the sealed manifest only
        assert base64.b64decode(manifest.launch["user_data"]) == USER_DATA
        assert manifest.launch["key_name"] == "ops"

        west = site.region(B).compute
        sent: dict[str, dict[str, Any]] = {}

        def record(params: dict[str, Any], model: Any, **_: Any) -> None:
            sent[model.name] = dict(params)

        west.ec2.meta.events.register("provide-client-params.ec2.*", record)
        result = engine.restore(copy.id, region=B, launch=True)

    assert result.instance is not None and result.healthy, result.health_error
    register, run = sent["RegisterImage"], sent["RunInstances"]
    # each disk at its own device name, each from its own snapshot equal to the original
    assert register["RootDeviceName"] == "/dev/sda1"
    mapped = [(m["DeviceName"], m["Ebs"]["SnapshotId"]) for m in register["BlockDeviceMappings"]]
    assert [device for device, _ in mapped] == ["/dev/sda1", "/dev/sdh"]
    assert _snapshot_blocks(aws, WEST, mapped[0][1]) == root
    assert _snapshot_blocks(aws, WEST, mapped[1][1]) == data
    # what the destination has is carried over
    assert run["InstanceType"] == "m5.large"
    assert run["KeyName"] == "ops"
    assert run["IamInstanceProfile"] == {"Arn": profile["Arn"]}
    assert run["SecurityGroupIds"] == [west_signalling]
    assert run["UserData"] == USER_DATA
    run_tags = {t["Key"]: t["Value"] for t in run["TagSpecifications"][0]["Tags"]}
    assert {k: run_tags[k] for k in ("backup", "Name", "function")} == {
        "backup": "1-7",
        "Name": "vdu-1",
        "function": "vdu",
    }
    assert not any(k.startswith(CAPTURE_SNAPSHOT_TAG) for k in run_tags)
    # and what it lacks is listed, by name
    assert len(result.not_carried) == 1
    assert result.not_carried[0].startswith(f"security group vdu-oam ({oam}): no group tagged")
    assert "vdu-signalling" not in result.not_carried[0]

    ec2_west = aws.client("ec2", WEST)
    launched = ec2_west.describe_instances(InstanceIds=[result.instance.id])["Reservations"][0][
        "Instances"
    ][0]
    assert launched["KeyName"] == "ops"
    assert launched["IamInstanceProfile"]["Arn"] == profile["Arn"]
    assert [g["GroupId"] for g in launched["SecurityGroups"]] == [west_signalling]
    answer = ec2_west.describe_instance_attribute(
        InstanceId=result.instance.id, Attribute="userData"
    )
    assert base64.b64decode(answer["UserData"]["Value"]) == USER_DATA

    # the secret is nowhere but in the sealed manifests and the instances themselves
    needles = [SECRET.encode(), base64.b64encode(USER_DATA), USER_DATA]
    for name, body in _everything_stored(aws):
        assert not any(n in body for n in needles), name
    # (botocore's own DEBUG log writes every request body: that logger is not turned on)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("regionvault"))
    assert "not carried over: security group vdu-oam" in ours
    assert SECRET not in ours and base64.b64encode(USER_DATA).decode() not in ours
    # nor in the tags of what the launch made
    image = ec2_west.describe_images(ImageIds=[run["ImageId"]])["Images"][0]
    snapshots = ec2_west.describe_snapshots(SnapshotIds=[s for _, s in mapped])["Snapshots"]
    for resource in [image, *snapshots, launched]:
        assert not any(SECRET in t["Value"] for t in resource.get("Tags") or [])
