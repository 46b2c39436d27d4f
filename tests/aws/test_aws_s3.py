"""The S3 Vault against the Vault contract, over boto3 and HTTP: atomic and conditional puts,
multipart, ranged gets, paged listings, Object Lock mapped onto the WORM model."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RetentionLocked,
    UnsupportedOperation,
    VaultError,
)
from regionvault.core.names import name_problem
from regionvault.core.types import RetentionMode

MiB = 1024 * 1024


def _versions(aws: AwsWorld, aws_region: str, bucket: str, key: str) -> list[str]:
    answer = aws.client("s3", aws_region).list_object_versions(Bucket=bucket, Prefix=key)
    found = answer.get("Versions", []) + answer.get("DeleteMarkers", [])
    return [v["VersionId"] for v in found if v["Key"] == key]


def test_put_get_head_list_delete(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(WEST, object_lock=False)))
    info = vault.put("index/00", b"hello")
    assert (info.name, info.size) == ("index/00", 5)
    assert vault.get("index/00") == b"hello"
    head = vault.head("index/00")
    assert head.size == 5 and head.etag and head.modified.tzinfo is not None
    assert not head.legal_hold and head.retain_until is None
    vault.put("index/00", memoryview(b"replaced"))
    assert vault.get("index/00") == b"replaced"
    vault.put("packs/a", b"1")
    assert [o.name for o in vault.list()] == ["index/00", "packs/a"]
    assert [o.name for o in vault.list("pa")] == ["packs/a"]
    vault.delete("index/00")
    vault.delete("index/00")  # absent is not an error
    with pytest.raises(ObjectNotFound):
        vault.head("index/00")
    with pytest.raises(ObjectNotFound):
        vault.get("index/00")
    # the bucket lives in its region
    location = aws.client("s3", WEST).get_bucket_location(Bucket=vault.bucket_name)
    assert location["LocationConstraint"] == WEST


def test_vault_id_is_stable_and_hidden(aws: AwsWorld) -> None:
    cfg = aws.region(EAST)
    first = aws.track(aws.provider.vault(cfg))
    vault_id = first.vault_id
    assert vault_id.startswith("aws-")
    again = aws.track(aws.provider.vault(cfg))
    assert again.vault_id == vault_id
    other_prefix = aws.track(aws.provider.vault(aws.region(EAST, prefix="other")))
    assert other_prefix.vault_id != vault_id
    assert list(first.list()) == []  # the id object is not a vault object
    with pytest.raises(VaultError, match="reserves"):
        first.put(".regionvault/vault-id", b"x")


@pytest.mark.parametrize(
    "bad",
    # the last two are names S3 would store, refused by the one rule of regionvault.core.names
    [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "trailing/",
        "nul\0",
        "tab\t",
        "long/" + "s" * 256,
        "d/.rv-tmp-x",
    ],
)
def test_bad_names_are_refused(aws: AwsWorld, bad: str) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST, create=False)))
    with pytest.raises(VaultError, match="bad object name") as refused:
        vault.put(bad, b"x")
    assert f": {name_problem(bad)}" in str(refused.value)


def test_if_absent_put_is_conditional(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    vault.put("locks/repo", b"mine", if_absent=True)
    with pytest.raises(ObjectExists) as taken:
        vault.put("locks/repo", b"theirs", if_absent=True)
    assert taken.value.name == "locks/repo"
    assert vault.get("locks/repo") == b"mine"
    vault.delete("locks/repo")
    vault.put("locks/repo", b"again", if_absent=True)  # free once deleted (all versions)
    assert vault.get("locks/repo") == b"again"


def test_multipart_round_trip_with_parallel_parts(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(WEST, object_lock=False)))
    vault.vault_id  # noqa: B018 - creates the bucket before counting
    data = os.urandom(40 * MiB)
    before = aws.provider.metrics.snapshot()
    info = vault.put("packs/big", data, if_absent=True)
    used = aws.provider.metrics.since(before)
    assert info.size == len(data)
    assert used.by_operation() == {
        "s3.CompleteMultipartUpload": 1,
        "s3.CreateMultipartUpload": 1,
        "s3.UploadPart": 5,  # 8 MiB parts
    }
    assert used.bytes_sent(service="s3") >= len(data)
    assert vault.get("packs/big") == data
    boundary = 8 * MiB
    assert (
        vault.get("packs/big", offset=boundary - 3, length=6) == data[boundary - 3 : boundary + 3]
    )
    with pytest.raises(ObjectExists):
        vault.put("packs/big", data, if_absent=True)
    # the refused upload left no parts behind
    uploads = aws.client("s3", WEST).list_multipart_uploads(Bucket=vault.bucket_name)
    assert uploads.get("Uploads", []) == []


def test_a_short_tail_rides_with_the_last_full_part(aws: AwsWorld) -> None:
    """A pack just over the threshold (the data plane closes packs at 16 MiB and a bit) is
    two parts, the second one slightly longer, not two full parts and a sliver."""
    vault = aws.track(aws.provider.vault(aws.region(EAST, object_lock=False)))
    vault.vault_id  # noqa: B018 - creates the bucket before counting
    data = os.urandom(16 * MiB + 300 * 1024)
    before = aws.provider.metrics.snapshot()
    vault.put("packs/just-over", data, if_absent=True)
    used = aws.provider.metrics.since(before)
    assert used.count(operation="UploadPart") == 2
    assert used.bytes_sent(operation="UploadPart") == len(data)
    assert vault.get("packs/just-over") == data


def test_small_put_is_one_request(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST, object_lock=False)))
    vault.vault_id  # noqa: B018
    before = aws.provider.metrics.snapshot()
    vault.put("packs/small", os.urandom(MiB), if_absent=True)
    assert aws.provider.metrics.since(before).by_operation() == {"s3.PutObject": 1}


def test_ranged_get(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    data = bytes(range(256)) * 4
    vault.put("obj", data)
    assert vault.get("obj", offset=10, length=5) == data[10:15]
    assert vault.get("obj", offset=1000) == data[1000:]
    assert vault.get("obj", offset=1020, length=100) == data[1020:]
    assert vault.get("obj", offset=5000) == b""
    assert vault.get("obj", offset=3, length=0) == b""
    with pytest.raises(ObjectNotFound):
        vault.get("nothing", offset=3, length=0)
    with pytest.raises(VaultError, match="bad offset"):
        vault.get("obj", offset=-1)


def test_list_pages_through_many_requests(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST, list_page_size=2)))
    names = [f"chunks/{i:02d}" for i in range(7)]
    for name in reversed(names):
        vault.put(name, name.encode())
    vault.put("other", b"x")
    before = aws.provider.metrics.snapshot()
    listed = list(vault.list("chunks/"))
    assert [o.name for o in listed] == names
    assert [o.size for o in listed] == [len(n) for n in names]
    # an Object Lock vault lists versions (so that a locked object behind a delete marker
    # is still listed): as many pages
    used = aws.provider.metrics.since(before)
    assert used.count(operation="ListObjectVersions") == 4 == used.count(service="s3")


def test_compliance_retention_refuses_delete_and_shortening(aws: AwsWorld) -> None:
    cfg = aws.region(EAST)
    vault = aws.track(aws.provider.vault(cfg))
    assert vault.capabilities.worm_lock and vault.capabilities.legal_hold
    vault.put("manifests/rp1", b"sealed manifest")
    until = datetime.now(UTC) + timedelta(minutes=2)
    info = vault.set_retention("manifests/rp1", until, RetentionMode.COMPLIANCE)
    assert info.retention_mode is RetentionMode.COMPLIANCE
    head = vault.head("manifests/rp1")
    assert head.retention_mode is RetentionMode.COMPLIANCE
    assert abs((head.retain_until or until) - until) < timedelta(seconds=1)
    for bypass in (False, True):
        with pytest.raises(RetentionLocked, match="compliance retention"):
            vault.delete("manifests/rp1", bypass_governance=bypass)
    with pytest.raises(RetentionLocked, match="extended"):
        vault.set_retention("manifests/rp1", until - timedelta(seconds=30))
    with pytest.raises(RetentionLocked):
        vault.set_retention("manifests/rp1", until, RetentionMode.GOVERNANCE)
    with pytest.raises(RetentionLocked, match="overwritten"):
        vault.put("manifests/rp1", b"other")
    vault.set_retention("manifests/rp1", until + timedelta(minutes=1))  # extending is fine
    assert vault.get("manifests/rp1") == b"sealed manifest"
    assert len(_versions(aws, EAST, vault.bucket_name, "manifests/rp1")) == 1


def test_governance_retention_yields_to_bypass(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    vault.put("manifests/rp2", b"one")
    vault.put("manifests/rp2", b"two")  # two versions of the name
    until = datetime.now(UTC) + timedelta(minutes=2)
    vault.set_retention("manifests/rp2", until, RetentionMode.GOVERNANCE)
    with pytest.raises(RetentionLocked, match="governance retention"):
        vault.delete("manifests/rp2")
    with pytest.raises(RetentionLocked, match="bypass_governance"):
        vault.set_retention(
            "manifests/rp2", until - timedelta(seconds=30), RetentionMode.GOVERNANCE
        )
    assert vault.get("manifests/rp2") == b"two"
    vault.delete("manifests/rp2", bypass_governance=True)
    assert not vault.exists("manifests/rp2")
    # a plain DELETE would have left both versions behind a delete marker
    assert _versions(aws, EAST, vault.bucket_name, "manifests/rp2") == []


def test_legal_hold_refuses_delete_until_lifted(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(WEST)))
    vault.put("packs/held", b"evidence")
    assert vault.set_legal_hold("packs/held", True).legal_hold
    assert vault.head("packs/held").legal_hold
    with pytest.raises(RetentionLocked, match="legal hold"):
        vault.delete("packs/held", bypass_governance=True)
    assert vault.get("packs/held") == b"evidence"
    assert not vault.set_legal_hold("packs/held", False).legal_hold
    vault.delete("packs/held")
    assert not vault.exists("packs/held")
    assert _versions(aws, WEST, vault.bucket_name, "packs/held") == []


def test_without_object_lock_worm_is_unsupported(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST, object_lock=False)))
    assert not vault.capabilities.worm_lock
    vault.put("a", b"1")
    with pytest.raises(UnsupportedOperation, match="object_lock"):
        vault.set_retention("a", datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(UnsupportedOperation):
        vault.set_legal_hold("a", True)
    with pytest.raises(ObjectNotFound):
        vault_locked = aws.track(aws.provider.vault(aws.region(WEST)))
        vault_locked.set_legal_hold("missing", True)


def test_missing_bucket_is_named(aws: AwsWorld) -> None:
    vault = aws.track(aws.provider.vault(aws.region(EAST, create=False, object_lock=False)))
    with pytest.raises(VaultError, match="does not exist"):
        vault.put("a", b"1")
