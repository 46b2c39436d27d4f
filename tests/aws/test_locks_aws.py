"""Locks by policy on S3 Object Lock (moto, or real AWS in live mode): the policy's lock at a
point's commit lands as S3 retention on every object the point uses, and the framework's
refusals (forget, shortening) hold there too; a legal hold is placed and lifted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aws_world import EAST, AwsWorld
from regionvault.core.errors import RetentionLocked
from regionvault.core.operations import OperationsConfig, resolve_operations
from regionvault.core.pipeline.locks import (
    LockRefused,
    apply_policy_lock,
    hold_point,
    lock_point,
    release_point,
)
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.types import Instance, RecoveryPoint, RetentionMode, Tags
from regionvault.providers.local.compute import LocalFileCapture


def _point(aws: AwsWorld, tmp_path: Path, **tags: str) -> tuple[Repository, RecoveryPoint]:
    cfg = aws.region(EAST)
    vault = aws.track(aws.provider.vault(cfg))
    keys = aws.track(aws.provider.key_service(cfg))
    repo = Repository.init_or_open(
        vault, keys, region=cfg.name, settings=RepositorySettings(workers=2)
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "db.bin").write_bytes(bytes(range(256)) * 512)
    inst = Instance(id="i-1", name="hlr", region=cfg.name, tags=Tags(tags))
    return repo, repo.backup(LocalFileCapture(inst, datetime.now(UTC), data), instance=inst)


def test_a_policy_lock_lands_as_s3_object_lock(aws: AwsWorld, tmp_path: Path) -> None:
    repo, point = _point(aws, tmp_path, **{"backup": "1-7", "backup-lock": "compliance-1d"})
    vault = repo.vault
    report = apply_policy_lock(
        repo, point, lambda i, *, keys=None: resolve_operations(i, OperationsConfig(), keys=keys)
    )
    assert report is not None and report.locked[-1] == f"points/{point.id}"

    s3 = aws.client("s3", EAST)
    manifest = repo.point_object(point.id)
    assert manifest.retain_until is not None
    for name in report.locked:
        answer = s3.head_object(Bucket=vault.bucket_name, Key=vault._key(name))
        assert answer["ObjectLockMode"] == "COMPLIANCE"
        assert answer["ObjectLockRetainUntilDate"] == manifest.retain_until
    assert abs(manifest.retain_until - (manifest.modified + timedelta(days=1))) < timedelta(
        seconds=1
    )

    with pytest.raises(RetentionLocked):
        repo.forget([point.id])
    with pytest.raises(LockRefused, match="can never be shortened"):
        lock_point(
            repo, point.id, manifest.retain_until - timedelta(hours=1), RetentionMode.COMPLIANCE
        )
    with pytest.raises(LockRefused, match="nobody can release it"):
        release_point(repo, point.id, bypass_governance=True)

    hold_point(repo, point.id)
    assert repo.point_object(point.id).legal_hold
    release_point(repo, point.id)
    assert not repo.point_object(point.id).legal_hold
    assert repo.point_object(point.id).retain_until == manifest.retain_until


def test_a_governance_lock_is_lifted_with_bypass_then_the_point_forgotten(
    aws: AwsWorld, tmp_path: Path
) -> None:
    repo, point = _point(aws, tmp_path, backup="1-7")
    lock_point(repo, point.id, datetime.now(UTC) + timedelta(days=1), RetentionMode.GOVERNANCE)
    with pytest.raises(RetentionLocked, match="retained until"):
        repo.forget([point.id])
    with pytest.raises(LockRefused, match="--bypass-governance"):
        release_point(repo, point.id)
    release_point(repo, point.id, bypass_governance=True)
    assert repo.forget([point.id]) == [point.id]
