"""One data key per copy run (issue #22 item 6), counted against the moto server: the KMS
calls of a backup, of its copy to another region and of a restore of that copy do not grow
with the data. The issue's sizes (64 MiB and 512 MiB, batches of 16 MiB) are scaled down
by 512 (128 KiB and 1 MiB of incompressible data, chunks of about 5 KiB, packs of 128 KiB,
batches of 32 KiB), so that the copy's batches grow eightfold, as they would, in seconds."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.repository import ChunkerParams, Repository, RepositorySettings, copy_point
from regionvault.core.repository.copy.names import batch_prefix
from regionvault.core.types import Instance, Tags
from regionvault.providers.aws.s3 import AwsTransit
from regionvault.providers.local.compute import LocalFileCapture

KiB = 1024
SETTINGS = RepositorySettings(workers=2, pack_size=128 * KiB)
CHUNKER = ChunkerParams(min_size=1 * KiB, avg_size=4 * KiB, max_size=16 * KiB)
BATCH = 32 * KiB
SMALL, LARGE = 128 * KiB, 1024 * KiB  # 64 MiB and 512 MiB, over 512


def _run(aws: AwsWorld, tmp_path: Path, size: int, batches: Counter[str]) -> dict[str, Any]:
    """Back up ``size`` bytes in us-east-1, copy the point to eu-west-1 and restore the copy
    there, each with services as a fresh process has them (buckets of this size's own):
    each phase's KMS calls by operation, the copy's batches, and the restored bytes."""
    name = f"{size // KiB}k"
    # without Object Lock: KMS calls do not depend on it, and it spares requests
    east = aws.region(EAST, bucket=f"rv-test-{aws.tag}-{name}-{EAST}", object_lock=False)
    west = aws.region(WEST, bucket=f"rv-test-{aws.tag}-{name}-{WEST}", object_lock=False)
    p = aws.provider

    def repo(cfg: Any) -> Repository:
        vault, keys = aws.track(p.vault(cfg)), aws.track(p.key_service(cfg))
        return Repository.init_or_open(
            vault, keys, region=cfg.name, settings=SETTINGS, chunker=CHUNKER
        )

    source, destination = repo(east), repo(west)
    data = tmp_path / name / "data"
    data.mkdir(parents=True)
    rng = random.Random(size)
    files = {f"f{n}.bin": rng.randbytes(size // 4) for n in range(4)}
    for file, body in files.items():
        (data / file).write_bytes(body)
    inst = Instance(id="i-1", name="vcu", region=east.name, tags=Tags({"backup": "1-7"}))
    kms: dict[str, dict[str, int]] = {}

    def counted(phase: str, before: Any) -> None:
        used = p.metrics.since(before).by_operation()
        kms[phase] = {op: n for op, n in used.items() if op.startswith("kms.")}

    before = p.metrics.snapshot()
    point = source.backup(LocalFileCapture(inst, datetime.now(UTC), data), instance=inst)
    counted("backup", before)

    before = p.metrics.snapshot()
    result = copy_point(
        source=source,
        destination=destination,
        forward=aws.track(p.transit(east, west)),
        backward=aws.track(p.transit(west, east)),
        seal_to_destination=p.sealer(west),
        seal_to_source=p.sealer(east),
        point_id=point.id,
        expires_at=None,
        batch_bytes=BATCH,
    )
    counted("copy", before)
    assert result.chunks_sent == result.chunks_total > 0

    # the copy restored by a process of its own: the vault and the KeyService fresh
    fresh = Repository.open(
        aws.track(p.vault(west)), aws.track(p.key_service(west)), region=west.name
    )
    out = tmp_path / name / "out"
    before = p.metrics.snapshot()
    fresh.restore(result.point.id, out)
    counted("restore", before)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files
    return {"kms": kms, "batches": batches[point.id]}


def test_kms_calls_per_copy_do_not_grow_with_the_data(
    aws: AwsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: Counter[str] = Counter()
    send = AwsTransit.send

    def counting_send(self: AwsTransit, name: str, payload: bytes | memoryview) -> None:
        point_id = name.split("/")[1] if name.startswith("copy/") else ""
        if name.startswith(batch_prefix(point_id)):
            batches[point_id] += 1
        send(self, name, payload)

    monkeypatch.setattr(AwsTransit, "send", counting_send)
    small = _run(aws, tmp_path, SMALL, batches)
    large = _run(aws, tmp_path, LARGE, batches)

    # the data did grow eightfold on the wire: so did the batches
    assert small["batches"] >= 4 and large["batches"] >= 7 * small["batches"], (small, large)
    # and KMS did not: the same calls, operation by operation, in every phase
    assert large["kms"] == small["kms"], (small, large)
    copy = large["kms"]["copy"]
    # us-east-1 seals the offer and the batches' session key for eu-west-1 (two Encrypts)
    # and opens the request's; eu-west-1 opens both and the repository config, and asks
    # one data key for the whole run
    assert copy.get("kms.GenerateDataKey") == 1, copy
    assert sum(copy.values()) <= 12, copy
    # a restore of the copy unwraps its config's key and the run's one data key
    assert large["kms"]["restore"].get("kms.Decrypt", 0) <= 3, large["kms"]["restore"]
    assert large["kms"]["backup"].get("kms.GenerateDataKey") == 1, large["kms"]["backup"]
