"""What a killed put or send leaves in S3 (an incomplete multipart upload: invisible, yet
billed) is found by the vault's and the inbox's ``stale_temporaries`` once older than the
lock expiry, each side seeing only its own, and aborted by ``verify --repair``."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.repository import Repository
from regionvault.providers.aws import s3

MiB = 1024 * 1024


def leave_upload(client: Any, bucket: str, key: str) -> str:
    """Begin a multipart upload of ``key`` and send one part, as a put killed mid-way does."""
    upload_id = str(client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
    client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(5 * MiB)
    )
    return upload_id


def uploads(client: Any, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_stale_multipart_uploads_are_found_and_aborted(
    aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    west_cfg = aws.region(WEST, object_lock=False)
    vault = aws.track(aws.provider.vault(west_cfg))
    transit = aws.track(aws.provider.transit(aws.region(EAST, object_lock=False), west_cfg))
    repo = Repository.init_or_open(
        vault, aws.track(aws.provider.key_service(west_cfg)), region=west_cfg.name
    )
    client = aws.client("s3", WEST)
    bucket = vault.bucket_name
    leave_upload(client, bucket, "packs/7f/killed-pack")
    leave_upload(client, bucket, f"{transit.prefix}copy/p1/batch-000001")
    assert len(uploads(client, bucket)) == 2
    # the clock is set against the uploads' own start (moto reports a fixed one)
    begun = max(
        u["Initiated"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    ).astimezone(UTC)

    # ten minutes on: a live writer may still be sending parts
    monkeypatch.setattr(s3, "_now", lambda: begun + timedelta(minutes=10))
    assert list(vault.stale_temporaries(timedelta(minutes=30))) == []
    assert list(transit.stale_temporaries(timedelta(minutes=30))) == []
    assert repo.verify(repair=True).repaired == []
    assert len(uploads(client, bucket)) == 2

    # an hour on, both are stale; the vault sees its own, the inbox its own
    monkeypatch.setattr(s3, "_now", lambda: begun + timedelta(hours=1))
    (in_vault,) = vault.stale_temporaries(timedelta(minutes=30))
    assert in_vault.name == "packs/7f/killed-pack" and isinstance(in_vault.modified, datetime)
    (in_inbox,) = transit.stale_temporaries(timedelta(minutes=30))
    assert in_inbox.name == "copy/p1/batch-000001"
    with pytest.raises(Exception, match="not an upload of this vault"):
        vault.remove_temporary(in_inbox)

    report = repo.verify(repair=True)
    assert report.ok
    assert [p.object for p in report.repaired] == ["packs/7f/killed-pack"]
    assert uploads(client, bucket) == [f"{transit.prefix}copy/p1/batch-000001"]
    transit.remove_temporary(in_inbox)
    transit.remove_temporary(in_inbox)  # gone already is fine
    assert uploads(client, bucket) == []
