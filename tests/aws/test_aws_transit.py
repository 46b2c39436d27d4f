"""The S3-inbox Transit from us-east-1 into eu-west-1: delivery, has(), byte accounting,
receive and discard on the destination side."""

from __future__ import annotations

import os

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.errors import TransitError


def test_send_has_inbox_receive_discard(aws: AwsWorld) -> None:
    east_cfg, west_cfg = aws.region(EAST), aws.region(WEST)
    west_vault = aws.track(aws.provider.vault(west_cfg))
    west_vault.put("packs/p1", b"vault object")
    transit = aws.track(aws.provider.transit(east_cfg, west_cfg))
    assert (transit.source, transit.region) == (f"aws:{EAST}", f"aws:{WEST}")

    assert not transit.has("rp1/packs/a")
    assert transit.bytes_sent == 0
    big = os.urandom(3 * 1024 * 1024)
    transit.send("rp1/packs/a", big)
    transit.send("rp1/index", memoryview(b"sealed index"))
    transit.send("rp2/packs/b", b"x")
    assert transit.bytes_sent == len(big) + len(b"sealed index") + 1
    assert transit.has("rp1/packs/a") and transit.has("rp1/index")
    assert not transit.has("rp1/packs")  # a prefix of a name is not the name
    assert list(transit.inbox()) == ["rp1/index", "rp1/packs/a", "rp2/packs/b"]
    assert list(transit.inbox("rp1/")) == ["rp1/index", "rp1/packs/a"]
    assert transit.receive("rp1/packs/a") == big

    # the payload sits in the destination region's bucket, under the source's prefix
    s3 = aws.client("s3", WEST)
    key = f"inbox/aws/{EAST}/rp1/index"
    assert s3.get_object(Bucket=transit.bucket_name, Key=key)["Body"].read() == b"sealed index"
    location = s3.get_bucket_location(Bucket=transit.bucket_name)["LocationConstraint"]
    assert location == WEST
    # the inbox shares the vault's bucket but never shows among the vault's objects
    assert [o.name for o in west_vault.list()] == ["packs/p1"]

    transit.discard("rp1/index")
    transit.discard("rp1/index")  # already gone is fine
    assert not transit.has("rp1/index")
    versions = s3.list_object_versions(Bucket=transit.bucket_name, Prefix=key)
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []
    with pytest.raises(TransitError, match="not in the inbox"):
        transit.receive("rp1/index")
    with pytest.raises(TransitError, match="bad payload name"):
        transit.send("/abs", b"x")


def test_has_needs_only_a_listing(aws: AwsWorld) -> None:
    """The source asks has() with ListBucket on its own prefix, never by reading (GetObject
    or HeadObject), so its role can be write-and-list-only on the destination's inbox."""
    east_cfg, west_cfg = aws.region(EAST), aws.region(WEST, inbox_bucket=None)
    transit = aws.track(aws.provider.transit(east_cfg, west_cfg))
    transit.send("n", b"payload")
    before = aws.provider.metrics.snapshot()
    assert transit.has("n")
    transit.send("m", b"more")
    assert aws.provider.metrics.since(before).by_operation() == {
        "s3.ListObjectsV2": 1,
        "s3.PutObject": 1,
    }


def test_separate_inbox_bucket(aws: AwsWorld) -> None:
    inbox = f"rv-test-{aws.tag}-inbox"
    east_cfg, west_cfg = aws.region(EAST), aws.region(WEST, inbox_bucket=inbox)
    transit = aws.track(aws.provider.transit(east_cfg, west_cfg))
    transit.send("rp/x", b"1")
    assert transit.bucket_name == inbox
    assert aws.client("s3", WEST).get_bucket_location(Bucket=inbox)["LocationConstraint"] == WEST
    assert transit.receive("rp/x") == b"1"


@pytest.mark.parametrize("prefix", ["../rp1/", "/rp1", "rp1//x", "rp1/../"])
def test_inbox_refuses_a_bad_prefix(aws: AwsWorld, prefix: str) -> None:
    # the same rule as the local transit and the vaults' listings (core.names.prefix_problem)
    transit = aws.track(aws.provider.transit(aws.region(EAST), aws.region(WEST)))
    before = aws.provider.metrics.snapshot()
    with pytest.raises(TransitError, match="bad inbox prefix"):
        transit.inbox(prefix)
    assert aws.provider.metrics.since(before).by_operation() == {}  # refused before asking
