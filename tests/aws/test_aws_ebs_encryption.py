"""Encrypted EBS: the snapshots a restore writes are encrypted with the region's
``ebs_kms_key``, or, without one, as the account's EBS encryption by default says
(GetEbsEncryptionByDefault, asked once); a capture of an encrypted volume takes an
encrypted snapshot (CreateSnapshot(s) inherit the volume's key: nothing to ask).

What moto shows, and what it cannot: moto's StartSnapshot ignores Encrypted and
KmsKeyArn, so these tests assert the request the real client sends (its JSON body, seen in
botocore's before-send event); moto keeps the encryption of a volume's snapshots, so the
capture test reads that from DescribeSnapshots. moto enforces no KMS permission and its
RegisterImage drops block device mappings, so that the role may use the key and that a
launched volume is encrypted with the snapshot's key are for the live suite
(``REGIONVAULT_AWS_LIVE=1``) and docs/aws.md's IAM list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_world import EAST, AwsWorld
from botocore.awsrequest import AWSResponse
from regionvault.core.errors import ConfigError
from regionvault.core.interfaces import BlockCapture
from regionvault.core.types import (
    CaptureKind,
    Disk,
    LaunchSpec,
    RegionConfig,
    RegionId,
    ServiceConfig,
)
from regionvault.providers.aws.ec2 import AwsBlockSink, AwsCompute
from regionvault.providers.aws.settings import AwsSettings
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE

GiB = 1024**3
DISKS = [Disk("/dev/xvda", 0, GiB), Disk("/dev/sdf", GiB, GiB)]


def _sent_start_snapshots(compute: AwsCompute) -> list[dict[str, Any]]:
    """The JSON bodies of the StartSnapshot requests the compute's client sends."""
    sent: list[dict[str, Any]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(json.loads(request.body))

    compute.ebs.meta.events.register("before-send.ebs.StartSnapshot", record)
    return sent


def _restore(compute: AwsCompute, name: str) -> AwsBlockSink:
    sink = compute.open_restore_sink(
        LaunchSpec(name=name), CaptureKind.BLOCKS, size=2 * GiB, disks=DISKS
    )
    assert isinstance(sink, AwsBlockSink)
    sink.write(0, b"boot".ljust(EBS_BLOCK_SIZE, b"\0"))
    sink.commit()
    return sink


def test_a_restore_encrypts_with_the_regions_ebs_kms_key(aws: AwsWorld) -> None:
    kms = aws.client("kms", EAST)
    key = kms.create_key(Description=f"rv-test-ebs-{aws.tag}")["KeyMetadata"]["Arn"]
    compute = aws.track(aws.provider.compute(aws.region(EAST, ebs_kms_key=key)))
    sent = _sent_start_snapshots(compute)
    before = aws.provider.metrics.snapshot()
    sink = _restore(compute, f"keyed-{aws.tag}")
    try:
        assert [(b.get("Encrypted"), b.get("KmsKeyArn")) for b in sent] == [(True, key)] * 2
        # the key is named: the account's default is not asked
        used = aws.provider.metrics.since(before)
        assert used.count(operation="GetEbsEncryptionByDefault") == 0
        if aws.live:  # moto's StartSnapshot ignores both parameters
            ec2 = aws.client("ec2", EAST)
            made = ec2.describe_snapshots(SnapshotIds=sink.snapshot_ids)["Snapshots"]
            assert {(m["Encrypted"], m.get("KmsKeyId")) for m in made} == {(True, key)}
    finally:
        sink.discard()
        if aws.live:
            kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)


@pytest.mark.parametrize("by_default", [True, False])
def test_without_a_key_a_restore_follows_the_accounts_default(
    aws: AwsWorld, by_default: bool
) -> None:
    """Encryption by default on: Encrypted without a key (EBS takes the account's default
    key); off: neither, as the account makes snapshots. Asked once for every restore."""
    if aws.live:
        pytest.skip("turns the account's EBS encryption by default on and off")
    ec2 = aws.client("ec2", EAST)
    if by_default:
        ec2.enable_ebs_encryption_by_default()
    else:
        ec2.disable_ebs_encryption_by_default()
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    sent = _sent_start_snapshots(compute)
    before = aws.provider.metrics.snapshot()
    first, second = _restore(compute, "one"), _restore(compute, "two")
    expected = {"Encrypted": True} if by_default else {}
    assert [{k: b[k] for k in ("Encrypted", "KmsKeyArn") if k in b} for b in sent] == (
        [expected] * 4
    )
    assert aws.provider.metrics.since(before).count(operation="GetEbsEncryptionByDefault") == 1
    first.discard()
    second.discard()


class _RecordedBody:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def test_a_role_that_may_not_ask_leaves_it_to_the_account(aws: AwsWorld) -> None:
    """GetEbsEncryptionByDefault denied (a recorded EC2 answer, parsed by the real
    client): the restore goes on without encryption parameters, so the account's setting
    decides; any other failure to ask is the restore's error."""
    if aws.live:
        pytest.skip("replays a recorded EC2 answer")
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    sent = _sent_start_snapshots(compute)
    body = (
        b"<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not "
        b"authorized to perform this operation.</Message></Error></Errors>"
        b"<RequestID>1</RequestID></Response>"
    )

    def denied(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, 403, {}, _RecordedBody(body))

    compute.ec2.meta.events.register("before-send.ec2.GetEbsEncryptionByDefault", denied)
    sink = _restore(compute, "denied")
    assert [("Encrypted" in b, "KmsKeyArn" in b) for b in sent] == [(False, False)] * 2
    sink.discard()


def test_a_capture_of_an_encrypted_volume_is_encrypted_with_its_key(aws: AwsWorld) -> None:
    """CreateSnapshots of an encrypted volume gives a snapshot encrypted with the volume's
    key, with no encryption parameter asked of the provider: the kept snapshot says so."""
    if aws.live:
        pytest.skip("makes an encrypted volume with a new key")
    key = aws.client("kms", EAST).create_key(Description="volume")["KeyMetadata"]["Arn"]
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    ec2 = aws.client("ec2", EAST)
    iid = aws.run_instance(EAST, {})
    zone = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0][
        "Placement"
    ]["AvailabilityZone"]
    volume = ec2.create_volume(Size=1, AvailabilityZone=zone, Encrypted=True, KmsKeyId=key)
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=iid, Device="/dev/sdf")
    with compute.capture(iid, keep=True) as capture:
        assert isinstance(capture, BlockCapture)
        ref = capture.ref
        parts = {p.device: p.snapshot_id for p in capture.parts}  # type: ignore[attr-defined]
    described = ec2.describe_snapshots(SnapshotIds=list(parts.values()))["Snapshots"]
    encrypted = {s["SnapshotId"]: s["Encrypted"] for s in described}
    # the encrypted volume's snapshot is encrypted, the plain root volume's is not (moto
    # records no key on a volume's snapshots: AWS gives them the volume's)
    root = compute.get_instance(iid).extra["root_device_name"]
    assert encrypted == {parts["/dev/sdf"]: True, parts[root]: False}
    assert ref is not None
    compute.release_capture(ref)


def test_an_encrypted_source_disk_never_restores_unencrypted(aws: AwsWorld) -> None:
    """The account does not encrypt by default and no ebs_kms_key is set: the disk whose
    snapshot was encrypted at capture (recorded in the launch facts) is restored with
    Encrypted (the account's default key); the plain one as the account makes it."""
    if aws.live:
        pytest.skip("turns the account's EBS encryption by default off")
    ec2 = aws.client("ec2", EAST)
    ec2.disable_ebs_encryption_by_default()
    key = aws.client("kms", EAST).create_key(Description="volume")["KeyMetadata"]["Arn"]
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    iid = aws.run_instance(EAST, {})
    zone = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0][
        "Placement"
    ]["AvailabilityZone"]
    volume = ec2.create_volume(Size=1, AvailabilityZone=zone, Encrypted=True, KmsKeyId=key)
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=iid, Device="/dev/sdf")
    with compute.capture(iid) as capture:
        facts = dict(capture.launch_facts())
    assert facts["encrypted_devices"] == ["/dev/sdf"]
    sent = _sent_start_snapshots(compute)
    sink = compute.open_restore_sink(
        LaunchSpec(name="enc", launch_facts=facts), CaptureKind.BLOCKS, size=2 * GiB, disks=DISKS
    )
    try:
        assert [{k: b[k] for k in ("Encrypted", "KmsKeyArn") if k in b} for b in sent] == [
            {},
            {"Encrypted": True},
        ]
    finally:
        sink.discard()


def _settings(**settings: Any) -> AwsSettings:
    region = RegionConfig(
        id=RegionId("aws", "us-east-1"),
        settings=settings,
        services={"compute": ServiceConfig("aws", settings)},
        base_dir=Path(),
        source="site.toml",
    )
    return AwsSettings.from_region(region)


def test_ebs_kms_key_must_be_a_key_arn_in_the_region() -> None:
    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert _settings(ebs_kms_key=arn).ebs_kms_key == arn
    assert _settings().ebs_kms_key is None
    with pytest.raises(ConfigError, match=r"ebs_kms_key.*'alias/ebs' is not a KMS key ARN"):
        _settings(ebs_kms_key="alias/ebs")
    with pytest.raises(ConfigError, match="not a KMS key ARN"):
        _settings(ebs_kms_key="1234abcd-12ab-34cd-56ef-1234567890ab")
    with pytest.raises(ConfigError, match="the key's ARN is in eu-west-1"):
        _settings(ebs_kms_key=arn.replace("us-east-1", "eu-west-1"))
