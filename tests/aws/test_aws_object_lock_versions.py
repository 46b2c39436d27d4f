"""Object Lock done right (issue #22 item 5), against the moto server: S3 lets anyone with
``s3:PutObject`` write a new version over a locked object, or a delete marker in front of
it. The locked version stays; the vault reads it (a fresh process too, learning it from the
key's versions), verify names each newer version or delete marker as tampering, and a
restore of the locked point still succeeds."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aws_world import EAST, AwsWorld
from regionvault.core.errors import IntegrityError, RetentionLocked
from regionvault.core.pipeline.locks import lock_point
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.types import Instance, RetentionMode, Tags
from regionvault.providers.aws import s3 as s3mod
from regionvault.providers.aws.s3 import AwsVault
from regionvault.providers.local.compute import LocalFileCapture

SMALL = RepositorySettings(workers=2, pack_size=64 << 10)


def _locked_point(
    aws: AwsWorld, tmp_path: Path
) -> tuple[AwsVault, str, dict[str, bytes], list[str]]:
    """A point of a few packs in an Object Lock vault, COMPLIANCE-locked for a day: the
    vault, the point's id, its files and its packs."""
    cfg = aws.region(EAST)
    repo = Repository.init_or_open(
        aws.track(aws.provider.vault(cfg)),
        aws.track(aws.provider.key_service(cfg)),
        region=cfg.name,
        settings=SMALL,
    )
    data = tmp_path / "data"
    data.mkdir()
    files = {f"f{n}.bin": os.urandom(96 << 10) for n in range(3)}
    for name, body in files.items():
        (data / name).write_bytes(body)
    inst = Instance(id="i-1", name="hlr", region=cfg.name, tags=Tags({"backup": "1-7"}))
    point = repo.backup(LocalFileCapture(inst, datetime.now(UTC), data), instance=inst)
    lock_point(repo, point.id, datetime.now(UTC) + timedelta(days=1), RetentionMode.COMPLIANCE)
    vault = repo.vault
    assert isinstance(vault, AwsVault)
    packs = sorted(info.name for info in vault.list("packs/"))
    assert len(packs) >= 3
    return vault, point.id, files, packs


def _fresh(aws: AwsWorld) -> tuple[Repository, AwsVault]:
    """The repository as a new process sees it: nothing learnt yet."""
    cfg = aws.region(EAST)
    vault = aws.track(aws.provider.vault(cfg))
    keys = aws.track(aws.provider.key_service(cfg))
    return Repository.open(vault, keys, region=cfg.name, settings=SMALL), vault


def _restored(repo: Repository, point_id: str, out: Path) -> dict[str, bytes]:
    repo.restore(point_id, out)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_newer_version_over_a_locked_pack_is_tampering_and_restore_reads_the_locked_one(
    aws: AwsWorld, tmp_path: Path
) -> None:
    vault, point_id, files, packs = _locked_point(aws, tmp_path)
    victim = packs[1]
    s3 = aws.client("s3", EAST)
    key = vault._key(victim)
    original = s3.get_object(Bucket=vault.bucket_name, Key=key)["Body"].read()
    # what real S3 allows whatever the lock: a new version in front of the locked one
    s3.put_object(Bucket=vault.bucket_name, Key=key, Body=b"x" * len(original))
    assert s3.get_object(Bucket=vault.bucket_name, Key=key)["Body"].read() != original

    fresh, fresh_vault = _fresh(aws)
    assert fresh_vault.get(victim) == original
    assert fresh_vault.head(victim).retain_until is not None  # the locked version's facts
    report = fresh.verify(read_data=True)
    assert not report.ok
    assert [p.object for p in report.errors] == [victim], report.errors
    assert "1 newer version(s) over its locked version" in report.errors[0].message
    assert "tampering" in report.errors[0].message
    assert _restored(fresh, point_id, tmp_path / "out") == files

    # the framework itself still refuses to replace the locked object
    with pytest.raises(RetentionLocked, match="cannot be overwritten"):
        fresh_vault.put(victim, original)


def test_a_delete_marker_over_locked_objects_is_tampering_and_restore_succeeds(
    aws: AwsWorld, tmp_path: Path
) -> None:
    vault, point_id, files, packs = _locked_point(aws, tmp_path)
    pack = packs[0]
    manifest = f"points/{point_id}"
    s3 = aws.client("s3", EAST)
    for name in (pack, manifest):
        # a plain DELETE in a versioned bucket: a delete marker hides the locked version
        s3.delete_object(Bucket=vault.bucket_name, Key=vault._key(name))
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=vault.bucket_name)["Contents"]}
    assert vault._key(pack) not in listed and vault._key(manifest) not in listed

    fresh, fresh_vault = _fresh(aws)
    assert {pack, manifest} <= {info.name for info in fresh_vault.list()}
    assert [p.id for p in fresh.points()] == [point_id]
    report = fresh.verify(read_data=True)
    assert sorted(p.object for p in report.errors) == sorted([pack, manifest]), report.errors
    assert all("1 delete marker(s) over its locked version" in p.message for p in report.errors)
    assert _restored(fresh, point_id, tmp_path / "out") == files


def test_objects_nobody_locked_read_their_newest_version(aws: AwsWorld) -> None:
    """The framework replaces objects it never locks (locks, copy records): in an Object
    Lock vault a read of one is of its newest version, in this process and a fresh one."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    vault.put("locks/a", b"first")
    assert vault.get("locks/a") == b"first"
    vault.put("locks/a", b"second")
    assert vault.get("locks/a") == b"second"
    fresh = aws.track(aws.provider.vault(aws.region(EAST)))
    assert fresh.get("locks/a") == b"second"
    assert [i.name for i in fresh.list("locks/")] == ["locks/a"]
    assert fresh.head("locks/a").size == len(b"second")
    assert list(fresh.versions_over_locks()) == []
    fresh.delete("locks/a")
    assert list(fresh.list("locks/")) == []


def test_a_lock_pins_the_version_it_locked(aws: AwsWorld) -> None:
    """The version a lock protects is the one this process reads from then on, even when
    another writer puts a newer one without the vault listing anything again."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    vault.put("packs/00/kept", b"locked bytes")
    vault.get("packs/00/kept")  # learnt: one version, read as the newest
    vault.set_retention("packs/00/kept", datetime.now(UTC) + timedelta(days=1))
    s3 = aws.client("s3", EAST)
    s3.put_object(Bucket=vault.bucket_name, Key=vault._key("packs/00/kept"), Body=b"other")
    metrics = aws.provider.metrics
    before = metrics.snapshot()
    assert vault.get("packs/00/kept") == b"locked bytes"
    used = metrics.since(before)
    assert used.count(service="s3") == 1 and used.count(operation="GetObject") == 1
    (name, what), *rest = list(vault.versions_over_locks("packs/"))
    assert name == "packs/00/kept" and "1 newer version(s)" in what and not rest


def _run_out(monkeypatch: pytest.MonkeyPatch, days: int = 2) -> datetime:
    """Move the vault's clock ``days`` on: the point's one-day lock has run out for it."""
    later = datetime.now(UTC) + timedelta(days=days)
    monkeypatch.setattr(s3mod, "_now", lambda: later)
    return later


def _over(aws: AwsWorld, vault: AwsVault, name: str, body: bytes) -> str:
    """Another writer's version put over ``name``; its version id."""
    s3 = aws.client("s3", EAST)
    return str(
        s3.put_object(Bucket=vault.bucket_name, Key=vault._key(name), Body=body)["VersionId"]
    )


def _retention(aws: AwsWorld, vault: AwsVault, name: str) -> dict[int, object]:
    """Each version's size -> its retain-until date (or legal hold status)."""
    s3 = aws.client("s3", EAST)
    key = vault._key(name)
    out: dict[int, object] = {}
    for v in s3.list_object_versions(Bucket=vault.bucket_name, Prefix=key)["Versions"]:
        facts = s3.head_object(Bucket=vault.bucket_name, Key=key, VersionId=v["VersionId"])
        out[facts["ContentLength"]] = (
            facts.get("ObjectLockRetainUntilDate"),
            facts.get("ObjectLockLegalHoldStatus"),
        )
    return out


def test_relocking_after_the_lock_ran_out_never_locks_another_writers_version(
    aws: AwsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F5: with the lock run out, a fresh process's lock_point or legal hold refuses, naming
    the object and both versions, rather than locking the newest (the attacker's) version."""
    vault, point_id, _files, packs = _locked_point(aws, tmp_path)
    victim = packs[1]
    attacker = _over(aws, vault, victim, b"x" * 100)
    later = _run_out(monkeypatch)
    fresh, fresh_vault = _fresh(aws)
    with pytest.raises(IntegrityError, match="tampering") as caught:
        lock_point(fresh, point_id, later + timedelta(days=30), RetentionMode.COMPLIANCE)
    assert victim in str(caught.value) and attacker in str(caught.value)
    with pytest.raises(IntegrityError, match=attacker):
        fresh_vault.set_legal_hold(victim, True)
    after = _retention(aws, vault, victim)
    assert after[100] == (None, None) or after[100] == (None, "OFF")  # nothing on the attacker's
    assert all(hold != "ON" for _until, hold in after.values())


def test_own_overwrite_after_the_lock_ran_out_reads_the_new_bytes(
    aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F1: a key this process pinned by locking it, overwritten by this process once the
    lock ran out, reads the new bytes here as in a fresh process."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    vault.put("locks/a", b"old")
    vault.set_retention("locks/a", datetime.now(UTC) + timedelta(seconds=30))
    _run_out(monkeypatch)
    vault.put("locks/a", b"new")
    assert vault.get("locks/a") == b"new"
    assert vault.head("locks/a").size == 3
    assert aws.track(aws.provider.vault(aws.region(EAST))).get("locks/a") == b"new"


def test_a_locked_version_behind_many_versions_is_still_found(aws: AwsWorld) -> None:
    """F2: the locked version is found however many versions lie under it: five of the
    framework's own overwrites, then a lock, then another writer's version."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    for n in range(6):
        vault.put("x/a", b"v%d" % n)
    vault.set_retention("x/a", datetime.now(UTC) + timedelta(days=1))
    _over(aws, vault, "x/a", b"attacker")
    fresh = aws.track(aws.provider.vault(aws.region(EAST)))
    assert fresh.get("x/a") == b"v5"
    (name, what), *rest = list(fresh.versions_over_locks())
    assert name == "x/a" and "1 newer version(s) over its locked version" in what and not rest


def test_junk_versions_seeded_under_a_write_once_name_are_reported(aws: AwsWorld) -> None:
    """F2: another writer seeds junk versions and a delete marker under a name the framework
    will write once (event names are sequential), then puts over the framework's locked
    version: reads use the framework's, verify names the junk under it and the version over
    it."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    s3 = aws.client("s3", EAST)
    vault.put("warm", b"w")
    key = vault._key("events/x")
    for n in range(5):
        s3.put_object(Bucket=vault.bucket_name, Key=key, Body=b"junk%d" % n)
    s3.delete_object(Bucket=vault.bucket_name, Key=key)
    vault.put("events/x", b"framework", if_absent=True)
    vault.set_retention("events/x", datetime.now(UTC) + timedelta(days=1))
    _over(aws, vault, "events/x", b"attacker")
    fresh = aws.track(aws.provider.vault(aws.region(EAST)))
    assert fresh.get("events/x") == b"framework"
    (name, what), *rest = list(fresh.versions_over_locks())
    assert name == "events/x" and not rest
    assert "1 newer version(s) over its locked version" in what
    assert "5 older version(s) and 1 delete marker(s) under it" in what


def test_a_version_over_a_pack_whose_lock_ran_out_is_tampering_and_restore_succeeds(
    aws: AwsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F3: the lock ran out, another writer's version lies over a pack: reads still use the
    framework's version (restore succeeds) and verify calls the other one tampering, not a
    damaged pack."""
    vault, point_id, files, packs = _locked_point(aws, tmp_path)
    victim = packs[1]
    attacker = _over(aws, vault, victim, b"x" * 100)
    _run_out(monkeypatch)
    fresh, _fresh_vault = _fresh(aws)
    report = fresh.verify(read_data=True)
    assert [p.object for p in report.errors] == [victim], report.errors
    message = report.errors[0].message
    assert "tampering" in message and "lock has run out" in message and attacker in message
    assert _restored(fresh, point_id, tmp_path / "out") == files


def test_a_fresh_process_learns_versions_a_page_at_a_time(aws: AwsWorld) -> None:
    """F4: a fresh process reading many packs of one shard lists the shard once, not each
    pack's versions."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    names = [f"packs/00/{n:032x}" for n in range(30)]
    for name in names:
        vault.put(name, name.encode())
    fresh = aws.track(aws.provider.vault(aws.region(EAST)))
    metrics = aws.provider.metrics
    before = metrics.snapshot()
    assert [fresh.get(name) for name in names] == [name.encode() for name in names]
    used = metrics.since(before)
    assert used.count(operation="ListObjectVersions") == 1
    assert used.count(operation="GetObject") == len(names)


def test_a_fresh_process_restore_lists_versions_per_shard_not_per_pack(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """F4: a restore in a process that did not write the packs lists each pack shard's
    versions once (and the index once), not each pack's."""
    _vault, point_id, files, packs = _locked_point(aws, tmp_path)
    shards = {name.rsplit("/", 1)[0] for name in packs}
    fresh, _fresh_vault = _fresh(aws)
    metrics = aws.provider.metrics
    before = metrics.snapshot()
    assert _restored(fresh, point_id, tmp_path / "out") == files
    used = metrics.since(before)
    # the shards, and 7 more: config, the point, the keyring and the index (a listing
    # each), the repository lock (put, two listings of locks/, delete)
    assert used.count(operation="ListObjectVersions") <= len(shards) + 7


def test_a_page_learnt_later_keeps_the_version_this_process_put(aws: AwsWorld) -> None:
    """A pack this process put stays read at its own version when another writer puts over
    it and a read of another pack of the shard then learns the shard."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    mine, other = "packs/00/" + "a" * 32, "packs/00/" + "b" * 32
    vault.put(mine, b"framework")
    aws.track(aws.provider.vault(aws.region(EAST))).put(other, b"other process")
    _over(aws, vault, mine, b"attacker")
    assert vault.get(other) == b"other process"  # learns packs/00/
    assert vault.get(mine) == b"framework"
    (name, what), *rest = list(vault.versions_over_locks("packs/"))
    assert name == mine and "2 version(s) under a name regionvault writes once" in what
    assert not rest


def test_relocking_after_the_lock_ran_out_locks_the_framework_version(
    aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F5, the other side: with junk seeded under a write-once name and nothing over the
    framework's version, a fresh process re-locks the framework's version once the first lock
    ran out (not the oldest, not the newest)."""
    vault = aws.track(aws.provider.vault(aws.region(EAST)))
    s3 = aws.client("s3", EAST)
    vault.put("warm", b"w")  # the bucket
    key = vault._key("events/y")
    for n in range(2):
        s3.put_object(Bucket=vault.bucket_name, Key=key, Body=b"junk%d" % n)
    s3.delete_object(Bucket=vault.bucket_name, Key=key)
    vault.put("events/y", b"framework", if_absent=True)
    vault.set_retention("events/y", datetime.now(UTC) + timedelta(days=1))
    later = _run_out(monkeypatch)
    fresh = aws.track(aws.provider.vault(aws.region(EAST)))
    info = fresh.set_retention("events/y", later + timedelta(days=30))
    assert info.size == len(b"framework")
    retention = _retention(aws, vault, "events/y")
    until = retention[len(b"framework")][0]
    assert isinstance(until, datetime) and until > later + timedelta(days=29)
    assert retention[len(b"junk0")][0] is None  # the junk stays unlocked
