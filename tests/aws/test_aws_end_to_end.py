"""The whole pipeline on AWS, against the moto server: a two-region site (us-east-1
replicating to eu-west-1, a KMS key and an Object Lock bucket in each, eu-west-1's inbox in
a bucket of its own), one EC2 instance tagged ``backup=1-7`` in us-east-1.

moto does not tie a volume's contents to the snapshots taken of it, so the instance's root
disk is seeded as an EBS snapshot through the EBS direct APIs and named by the instance tag
``regionvault:capture-snapshot``: the provider's "back up from an existing snapshot" feature.
Snapshotting a running instance's volume is covered by the live suite
(``REGIONVAULT_AWS_LIVE=1``).

Shown here: the tagger and the scheduler (``Service.tick`` over an engine with an injected
clock) find the instance, back it up and copy the point to eu-west-1 under eu-west-1's KMS
key; a restore there writes a new snapshot whose blocks equal the original's (read back with
the EBS direct APIs), registers an image and launches an instance of the original's type with
its tags.
us-east-1's key opens nothing in eu-west-1's bucket or inbox, and no object in any bucket,
no version and no inbox payload holds plaintext disk content or key material.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, WEST, AwsWorld
from botocore.exceptions import ClientError
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.interfaces import KeyService
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY, RETENTION, TAG
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository, open_payload
from regionvault.core.site import Site
from regionvault.core.types import DataKey
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG, INTERNAL_PREFIX
from regionvault.providers.aws.errors import error_code
from regionvault.providers.aws.kms import AwsKeyService, AwsSealer
from regionvault.providers.aws.s3 import AwsTransit
from regionvault.providers.aws.testing import (
    EBS_BLOCK_SIZE,
    live_mode,
    mixed_disk_blocks,
    seed_snapshot,
)

pytestmark = pytest.mark.skipif(
    live_mode(),
    reason="moto only: it launches instances and leaves snapshots (the live suite covers "
    "capture of a running instance in test_aws_ec2.py)",
)

A, B = f"aws:{EAST}", f"aws:{WEST}"
#: the last block of the 1 GiB volume: the restore must put data at the very end too
LAST_BLOCK = 1024**3 // EBS_BLOCK_SIZE - 1
ZERO_BLOCK = bytes(EBS_BLOCK_SIZE)
RUN = 64
#: what KMS answers when a key cannot open a ciphertext of another region's key
_KMS_REFUSALS = ("AccessDeniedException", "InvalidCiphertextException", "NotFoundException")


# --------------------------------------------------------------------------- recording


@dataclass
class Secrets:
    """Every plaintext key the test saw: data keys from KMS (generated and unwrapped), the
    transfer keys sealed for another region, and the repositories' own secrets."""

    keys: set[bytes] = field(default_factory=set)

    def needles(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for n, key in enumerate(sorted(self.keys)):
            out[f"key {n} (raw)"] = key
            out[f"key {n} (hex)"] = key.hex().encode()
            out[f"key {n} (base64)"] = base64.b64encode(key)
        return out


@dataclass(frozen=True)
class InboxObject:
    bucket: str
    key: str
    name: str
    source: str
    destination: str
    data: bytes


@pytest.fixture
def recorded(
    aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Secrets, list[InboxObject]]]:
    """Record every plaintext key the provider hands out or seals, and every inbox object as
    it is in S3 just before the destination discards it (a copy discards every payload it
    sent, so this is every object that was ever in an inbox)."""
    secrets = Secrets()
    inbox: list[InboxObject] = []
    generate, unwrap, seal = (
        AwsKeyService.generate_data_key,
        AwsKeyService.unwrap,
        AwsSealer.seal,
    )
    discard = AwsTransit.discard

    def recording_generate(self: AwsKeyService, context: Any) -> DataKey:
        key = generate(self, context)
        secrets.keys.add(bytes(key.plaintext))
        return key

    def recording_unwrap(self: AwsKeyService, wrapped: bytes, context: Any) -> bytes:
        plain = unwrap(self, wrapped, context)
        secrets.keys.add(bytes(plain))
        return plain

    def recording_seal(self: AwsSealer, secret: bytes, context: Any) -> bytes:
        secrets.keys.add(bytes(secret))
        return seal(self, secret, context)

    def recording_discard(self: AwsTransit, name: str) -> None:
        key = self._key(name)
        s3 = aws.client("s3", self._settings.aws_region)  # outside the provider's metrics
        data = s3.get_object(Bucket=self.bucket_name, Key=key)["Body"].read()
        inbox.append(InboxObject(self.bucket_name, key, name, self.source, self.region, data))
        discard(self, name)

    monkeypatch.setattr(AwsKeyService, "generate_data_key", recording_generate)
    monkeypatch.setattr(AwsKeyService, "unwrap", recording_unwrap)
    monkeypatch.setattr(AwsSealer, "seal", recording_seal)
    monkeypatch.setattr(AwsTransit, "discard", recording_discard)
    yield secrets, inbox


# --------------------------------------------------------------------------- helpers


def _site_file(aws: AwsWorld, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """site.toml of the two regions; returns it and the bucket of each role."""
    east, west = aws.settings(EAST), aws.settings(WEST)
    # us-east-1's inbox is the prefix inbox/ of its own bucket; eu-west-1's a bucket of its own
    west["inbox_bucket"] = f"rv-test-{aws.tag}-{WEST}-inbox"
    doc = {
        "site": {"name": "e2e-aws", "state_dir": str(tmp_path / "state")},
        "regions": {A: east, B: west},
        "replication": [{"from": A, "to": B}],
    }
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path, {
        "east": east["bucket"],
        "west": west["bucket"],
        "west-inbox": west["inbox_bucket"],
    }


def _disk() -> dict[int, bytes]:
    """6 MiB of mixed content at the start of the volume, and one random block at its end."""
    blocks = mixed_disk_blocks(6 * 1024 * 1024, seed=20261125)
    blocks[LAST_BLOCK] = mixed_disk_blocks(EBS_BLOCK_SIZE, seed=7)[0]
    return blocks


def _known_runs(blocks: dict[int, bytes]) -> dict[str, bytes]:
    """Distinctive 64-byte runs of the disk: from random, text, half-written, duplicated and
    the last block, at offsets that differ from block to block."""
    runs: dict[str, bytes] = {}
    for index, data in sorted(blocks.items()):
        for n, offset in enumerate((0, (index * 7919 + 4096) % (EBS_BLOCK_SIZE // 2 - RUN))):
            run = data[offset : offset + RUN]
            assert run.count(0) < RUN // 2, "a known run must be distinctive, not zeros"
            runs[f"block {index} offset {offset} ({n})"] = run
    return runs


def _snapshot_blocks(aws: AwsWorld, aws_region: str, snapshot_id: str) -> dict[int, bytes]:
    """Every block of a snapshot, read with the EBS direct APIs (outside the provider)."""
    ebs = aws.client("ebs", aws_region)
    out: dict[int, bytes] = {}
    token: str | None = None
    for _page in range(100):
        kwargs: dict[str, Any] = {"SnapshotId": snapshot_id}
        if token:
            kwargs["NextToken"] = token
        listed = ebs.list_snapshot_blocks(**kwargs)
        for block in listed["Blocks"]:
            answer = ebs.get_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=block["BlockIndex"],
                BlockToken=block["BlockToken"],
            )
            out[int(block["BlockIndex"])] = answer["BlockData"].read()
        token = listed.get("NextToken")
        if not token:
            break
    return out


def _image(blocks: dict[int, bytes]) -> dict[int, bytes]:
    """Blocks as a disk sees them: zero-padded to 512 KiB, all-zero blocks dropped (a block
    never written and a block written with zeros read the same)."""
    padded = {i: d.ljust(EBS_BLOCK_SIZE, b"\0") for i, d in blocks.items()}
    return {i: d for i, d in padded.items() if d != ZERO_BLOCK}


def _every_object(aws: AwsWorld, aws_region: str, bucket: str) -> Iterator[tuple[str, bytes]]:
    """(key@version, bytes) of every version of every object in ``bucket``."""
    s3 = aws.client("s3", aws_region)
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            answer = s3.get_object(
                Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"]
            )
            yield f"{version['Key']}@{version['VersionId']}", answer["Body"].read()


# format.md sections 3 and 5: the cleartext headers of sealed objects and packs
_ENVELOPE = struct.Struct(">4sBBBB32s32sH")
_PACK = struct.Struct(">4sB3s16s32s32sH")


def _wrapped_keys(
    name: str, data: bytes, *, vault_id: str, repository_id: str
) -> list[tuple[bytes, dict[str, str]]]:
    """The KMS-wrapped data keys an object of a vault carries, each with the encryption
    context the format binds it to (docs/format.md): the config's, and each pack's run key.
    Every other object is sealed under the repository's master key (inside the config)."""
    if data[:4] == b"RVPK":
        *_, run_id, _salt, _commitment, w = _PACK.unpack_from(data)
        wrapped = data[_PACK.size : _PACK.size + w]
        context = {"vault": vault_id, "kind": "pack", "repository": repository_id}
        return [(wrapped, {**context, "run": run_id.hex()})]
    assert data[:4] == b"RVLT", f"{name} is neither a sealed object nor a pack"
    _magic, _version, kind, source, _flags, _salt, _commitment, w = _ENVELOPE.unpack_from(data)
    if name.startswith("config@"):
        assert (kind, source, w > 0) == (1, 1, True), f"{name}: not a wrapped-key config"
        wrapped = data[_ENVELOPE.size : _ENVELOPE.size + w]
        return [
            (wrapped, {"vault": vault_id, "kind": "config", "purpose": "regionvault-repository"})
        ]
    assert (source, w) == (0, 0), f"{name}: expected a master-key object"
    return []


def _payload_kind(name: str) -> str:
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


def _open(keys: KeyService, item: InboxObject) -> Callable[[], bytes]:
    return lambda: open_payload(
        keys,
        item.name,
        item.data,
        kind=_payload_kind(item.name),
        source=item.source,
        destination=item.destination,
    )


# --------------------------------------------------------------------------- the test


def test_tag_schedule_backup_copy_restore_launch_across_regions(
    aws: AwsWorld, tmp_path: Path, recorded: tuple[Secrets, list[InboxObject]]
) -> None:
    secrets, inbox = recorded
    disk = _disk()
    runs = _known_runs(disk)
    assert len(runs) >= 20
    seeded = seed_snapshot(aws.client("ebs", EAST), disk, volume_size_gib=1)
    assert _image(_snapshot_blocks(aws, EAST, seeded)) == _image(disk)
    tags = {"backup": "1-7", "Name": "vcu-1", "function": "vCU", "cell-site": "cs-0042"}
    instance_id = aws.run_instance(
        EAST, {**tags, CAPTURE_SNAPSHOT_TAG: seeded}, instance_type="m5.large"
    )
    opted_out = aws.run_instance(EAST, {"backup": "none", "Name": "ims-lab"})

    site_path, buckets = _site_file(aws, tmp_path)
    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, clock=lambda: now)

        # ---- tag and schedule: the instance is found, backed up, copied, in one tick
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        schedule = {s.region: s for s in report.schedule}
        assert [d.instance.id for d in schedule[A].due] == [instance_id]
        assert [n.instance_id for n in schedule[A].opted_out] == [opted_out]
        assert schedule[A].due[0].policy.source == "1-7"
        assert [str(r) for r in schedule[A].due[0].copy_to] == [B]
        assert schedule[B].due == ()
        kinds = [o.kind for o in report.jobs]
        assert sorted(kinds) == sorted([TAG, TAG, BACKUP, COPY, RETENTION, RETENTION])
        backup = next(o for o in report.jobs if o.kind == BACKUP)
        assert backup.key.startswith(f"backup/{A}/{instance_id}/")
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        assert copy_job.result["bytes_moved"] > 0 and not copy_job.result["existing"]
        point = engine.find_point(backup.result["point"], A)
        copy = engine.find_point(copy_job.result["copy"], B)
        assert (point.instance_id, point.region, copy.region) == (instance_id, A, B)
        assert copy.lineage is not None
        assert (copy.lineage.source_region, copy.lineage.source_recovery_point) == (A, point.id)
        # the explicit tag was kept, nothing was tagged
        after = site.region(A).compute.get_instance(instance_id)
        assert after.tags == tags

        # ---- a second tick in the same slot: nothing is due, nothing is copied again
        again = Service(engine).tick()
        assert again.ok
        assert [o.kind for o in again.jobs if o.kind in (BACKUP, COPY)] == []
        assert [n.instance.id for s in again.schedule for n in s.not_due] == [instance_id]

        # ---- restore in eu-west-1 and launch
        result = engine.restore(copy.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        launched = result.instance
        assert launched.region == B
        west_ec2 = aws.client("ec2", WEST)
        raw = west_ec2.describe_instances(InstanceIds=[launched.id])["Reservations"][0]
        raw_instance = raw["Instances"][0]
        assert raw_instance["InstanceType"] == "m5.large"
        raw_tags = {t["Key"]: t["Value"] for t in raw_instance["Tags"]}
        assert {k: v for k, v in raw_tags.items() if not k.startswith(INTERNAL_PREFIX)} == tags
        assert CAPTURE_SNAPSHOT_TAG not in raw_tags  # it named us-east-1's seed, not this disk
        assert launched.tags == tags
        image = west_ec2.describe_images(ImageIds=[raw_instance["ImageId"]])["Images"]
        assert len(image) == 1 and image[0]["State"] == "available"
        image_tags = {t["Key"]: t["Value"] for t in image[0].get("Tags", [])}
        restored = image_tags["regionvault:restore-snapshot"]
        assert restored != seeded
        snapshot = west_ec2.describe_snapshots(SnapshotIds=[restored])["Snapshots"][0]
        assert snapshot["State"] == "completed"
        with pytest.raises(Exception, match=r"InvalidSnapshot\.NotFound"):
            aws.client("ec2", EAST).describe_snapshots(SnapshotIds=[restored])
        # the restored disk, block for block, is the original
        assert _image(_snapshot_blocks(aws, WEST, restored)) == _image(disk)

        # ---- key isolation: us-east-1's key opens nothing eu-west-1 holds
        east_keys, west_keys = site.region(A).keys, site.region(B).keys
        west_vault = site.region(B).vault
        with pytest.raises(KeyAccessDenied):
            Repository.open(west_vault, east_keys, region=B)
        repository_id = engine.repository(B).repository_id
        west_objects = dict(_every_object(aws, WEST, buckets["west"]))
        wrapped: list[tuple[str, bytes, dict[str, str]]] = []
        for name, data in west_objects.items():
            if name.startswith(".regionvault/vault-id@"):
                continue  # a random id, not data
            for blob, context in _wrapped_keys(
                name, data, vault_id=west_vault.vault_id, repository_id=repository_id
            ):
                wrapped.append((name, blob, context))
        assert any(n.startswith("config@") for n, _, _ in wrapped)
        assert any(n.startswith("packs/") for n, _, _ in wrapped)
        for name, blob, context in wrapped:
            with pytest.raises(KeyAccessDenied):
                east_keys.unwrap(blob, context)
            # the same call through eu-west-1's own key works: the refusal above is the key's
            assert len(west_keys.unwrap(blob, context)) == 32, name
        east_kms = aws.client("kms", EAST)
        for name, blob, _context in wrapped:
            with pytest.raises(ClientError) as refused:
                east_kms.decrypt(CiphertextBlob=blob)
            assert error_code(refused.value) in _KMS_REFUSALS, name
        # the inbox: what crossed into eu-west-1 opens only there, and the reverse
        into_west = [i for i in inbox if i.destination == B]
        into_east = [i for i in inbox if i.destination == A]
        assert {_payload_kind(i.name) for i in into_west} == {"offer", "batch"}
        assert [_payload_kind(i.name) for i in into_east] == ["request"]
        assert {i.bucket for i in into_west} == {buckets["west-inbox"]}
        assert {i.bucket for i in into_east} == {buckets["east"]}
        for item in into_west:
            with pytest.raises(KeyAccessDenied):
                _open(east_keys, item)()
            assert _open(west_keys, item)()
        for item in into_east:
            with pytest.raises(KeyAccessDenied):
                _open(west_keys, item)()
            _open(east_keys, item)()
        # a copy leaves its inboxes empty (so the recorded payloads are all there were)
        s3_west, s3_east = aws.client("s3", WEST), aws.client("s3", EAST)
        assert s3_west.list_objects_v2(Bucket=buckets["west-inbox"]).get("KeyCount") == 0
        east_inbox = s3_east.list_object_versions(Bucket=buckets["east"], Prefix="inbox/")
        assert not east_inbox.get("Versions") and not east_inbox.get("DeleteMarkers")

        # ---- nothing at rest is plaintext
        for region in (A, B):
            config = engine.repository(region)._store.config  # the repository's secrets
            secrets.keys.update((config.chunk_id_key, config.master_key))
        needles = {**runs, **secrets.needles()}
        assert len(secrets.keys) >= 8  # config, run and transfer keys of both regions
        scanned: dict[str, bytes] = {f"{buckets['west']}/{k}": v for k, v in west_objects.items()}
        for aws_region, bucket in ((EAST, buckets["east"]), (WEST, buckets["west-inbox"])):
            scanned.update({f"{bucket}/{k}": v for k, v in _every_object(aws, aws_region, bucket)})
        scanned.update({f"inbox {i.bucket}/{i.key}": i.data for i in inbox})
        east_packs = [k for k in scanned if k.startswith(f"{buckets['east']}/packs/")]
        west_packs = [k for k in scanned if k.startswith(f"{buckets['west']}/packs/")]
        assert east_packs and west_packs
        # the random half of the disk cannot compress: at least that much was scanned
        random_bytes = sum(1 for i in disk if i % 8 in (0, 1, 2)) * EBS_BLOCK_SIZE
        for packs in (east_packs, west_packs):
            assert sum(len(scanned[k]) for k in packs) >= random_bytes
        leaks = [
            f"{what} in {where}"
            for where, data in scanned.items()
            for what, needle in needles.items()
            if needle in data
        ]
        assert leaks == []
        # the scan itself finds what it looks for
        assert all(needle in disk[int(what.split()[1])] for what, needle in runs.items())
