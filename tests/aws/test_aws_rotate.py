"""Key rotation on AWS (moto): ``rotate-keys`` makes a new KMS key (made like the current one)
current by moving the region's alias to it, and re-wraps the repository under it; every
wrapped key in the vault then names the new key, and with the old key disabled and scheduled
for deletion every point still restores and verifies, no Decrypt ever naming the old key
(moto does not refuse a disabled key's Decrypt, so the calls are what the test checks)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from aws_world import EAST, AwsWorld
from regionvault.core.errors import ConfigError
from regionvault.core.interfaces import PURPOSE_KEY
from regionvault.core.repository import ChunkerParams, Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._keyring import keyring_context
from regionvault.core.repository._store import config_context
from repository_support import SMALL, capture, snapshot

CHUNKER = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)


def make_data(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "subscribers.bin").write_bytes(rng.randbytes(300_000))
    (root / f"conf-{seed}.txt").write_text(f"apn = internet {seed}\n")
    return root


def objects(repo: Repository) -> dict[str, bytes]:
    return {info.name: repo.vault.get(info.name) for info in repo.vault.list("")}


def wrapping_key(
    kms: Any, data: bytes, name: str, kind: fmt.ObjectKind, ctx: dict[str, str]
) -> str:
    """The KMS key that wrapped the key in a sealed object's header: KMS's own answer to a
    Decrypt that names no key (the raw client, outside the provider)."""
    header = fmt.EnvelopeHeader.parse(name, data, kind)
    context = {**ctx, PURPOSE_KEY: "data-key"}
    answer = kms.decrypt(CiphertextBlob=header.wrapped_key, EncryptionContext=context)
    return str(answer["KeyId"])


def tags_of(kms: Any, key: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key)["Tags"]}


def test_rotate_keys_moves_the_alias_to_a_new_key_and_the_old_one_can_be_disabled(
    aws: AwsWorld, tmp_path: Path
) -> None:
    cfg = aws.region(EAST)
    keys = aws.track(aws.provider.key_service(cfg))
    vault = aws.track(aws.provider.vault(cfg))
    repo = Repository.init_or_open(vault, keys, region=cfg.name, chunker=CHUNKER, settings=SMALL)
    data = make_data(tmp_path / "data", 1)
    points = [(repo.backup(capture(data)).id, snapshot(data))]
    make_data(data, 2)
    points.append((repo.backup(capture(data)).id, snapshot(data)))
    kms = aws.client("kms", EAST)
    alias = cfg.settings["kms_key"]
    old = keys.key_id
    old_meta = kms.describe_key(KeyId=old)["KeyMetadata"]
    before = objects(repo)

    report = repo.rotate_keys()

    new = keys.key_id
    assert new != old and new.startswith(f"arn:aws:kms:{EAST}:")
    assert (report.old_key_id, report.new_key_id, report.generation) == (old, new, 1)
    assert report.runs == 2 and not report.resumed
    # the alias names the new key, made like the old one and naming it as its predecessor
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == new
    new_meta = kms.describe_key(KeyId=new)["KeyMetadata"]
    for field in ("Description", "KeyUsage", "KeySpec"):
        assert new_meta[field] == old_meta[field], field
    assert tags_of(kms, new) == {**tags_of(kms, old), "regionvault:previous-key": old}
    policy = kms.get_key_policy(KeyId=new, PolicyName="default")["Policy"]
    assert policy == kms.get_key_policy(KeyId=old, PolicyName="default")["Policy"]

    # every wrapped key in the vault names the new key; no pack or index object rewritten
    after = objects(repo)
    repository_id = repo.repository_id
    ring = fmt.keyring_name(1)
    assert set(after) - set(before) == {ring} and set(before) <= set(after)
    assert {n for n in before if before[n] != after[n]} == {"config"}
    config_ctx = config_context(vault.vault_id)
    ring_ctx = keyring_context(vault.vault_id, repository_id, 1)
    assert wrapping_key(kms, after["config"], "config", fmt.ObjectKind.CONFIG, config_ctx) == new
    assert wrapping_key(kms, after[ring], ring, fmt.ObjectKind.KEYRING, ring_ctx) == new

    # the old key disabled and on its way out: every point restores, verify reads every byte
    kms.disable_key(KeyId=old_meta["KeyId"])  # (moto's DisableKey takes no ARN)
    kms.schedule_key_deletion(KeyId=old_meta["KeyId"], PendingWindowInDays=7)
    assert kms.describe_key(KeyId=old)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    fresh_keys = aws.track(aws.provider.key_service(cfg))
    fresh_vault = aws.track(aws.provider.vault(cfg))
    used: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        used.append(str(params.get("KeyId")))

    fresh_keys._kms.meta.events.register("provide-client-params.kms.Decrypt", record)
    fresh = Repository.open(fresh_vault, fresh_keys, region=cfg.name, settings=SMALL)
    assert fresh_keys.key_id == new
    for n, (point, tree) in enumerate(points):
        out = tmp_path / f"restored-{n}"
        fresh.restore(point, out)
        assert snapshot(out) == tree
    assert fresh.verify(read_data=True).ok
    assert used and set(used) == {new}, used

    # a backup now wraps its run key under the new key
    make_data(data, 3)
    third = fresh.backup(capture(data))
    assert fresh.load_manifest(third.id).point.id == third.id
    assert set(used) == {new}


def test_rotation_needs_the_key_named_by_its_alias(aws: AwsWorld) -> None:
    cfg = aws.region(EAST)
    arn = aws.track(aws.provider.key_service(cfg)).key_id
    by_arn = aws.track(aws.provider.key_service(aws.region(EAST, kms_key=arn, create=False)))
    with pytest.raises(ConfigError, match=r"kms_key.*alias/<name>"):
        by_arn.rotate()
    assert by_arn.key_id == arn


def test_a_key_service_that_resolved_the_alias_before_another_rotation_reads_after_it(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """A long-lived KeyService (a `run` daemon's) resolved the alias before rotate-keys ran in
    another process: on a wrong-key answer it describes the alias again and opens the new
    config and keyring (review H2)."""
    cfg = aws.region(EAST)
    keys = aws.track(aws.provider.key_service(cfg))
    vault = aws.track(aws.provider.vault(cfg))
    repo = Repository.init_or_open(vault, keys, region=cfg.name, chunker=CHUNKER, settings=SMALL)
    data = make_data(tmp_path / "data", 1)
    point = repo.backup(capture(data)).id
    daemon_keys = aws.track(aws.provider.key_service(cfg))
    old = daemon_keys.key_id
    repo.rotate_keys()  # the operator's, in "another process"
    assert keys.key_id != old
    daemon = Repository.open(
        aws.track(aws.provider.vault(cfg)), daemon_keys, region=cfg.name, settings=SMALL
    )
    daemon.restore(point, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(data)
    assert daemon_keys.key_id == keys.key_id  # it follows the alias from now on


def test_rotate_keys_wraps_under_the_new_key_while_the_alias_still_lags(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """KMS is eventually consistent: right after UpdateAlias, GenerateDataKey by alias may
    still use the old key (simulated). The keyring and config are still wrapped under the new
    key, and the KeyService never moves back to the old one (review H1)."""
    cfg = aws.region(EAST)
    keys = aws.track(aws.provider.key_service(cfg))
    vault = aws.track(aws.provider.vault(cfg))
    repo = Repository.init_or_open(vault, keys, region=cfg.name, chunker=CHUNKER, settings=SMALL)
    repo.backup(capture(make_data(tmp_path / "data", 1)))
    old = keys.key_id
    alias = cfg.settings["kms_key"]

    def lagging(params: dict[str, Any], **_: Any) -> None:
        if params.get("KeyId") == alias:
            params["KeyId"] = old  # the alias as a lagging KMS front end still resolves it

    keys._kms.meta.events.register("provide-client-params.kms.GenerateDataKey", lagging)
    report = repo.rotate_keys()
    kms = aws.client("kms", EAST)
    new = kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]
    assert report.new_key_id == new != old and keys.key_id == new
    config_key = wrapping_key(
        kms, vault.get("config"), "config", fmt.ObjectKind.CONFIG, config_context(vault.vault_id)
    )
    ring = fmt.keyring_name(report.generation)
    ring_key = wrapping_key(
        kms,
        vault.get(ring),
        ring,
        fmt.ObjectKind.KEYRING,
        keyring_context(vault.vault_id, repo.repository_id, report.generation),
    )
    assert config_key == ring_key == new
    assert keys.generate_data_key({"k": "v"}).key_id == new


def test_the_previous_key_chain_names_only_keys_of_this_account_and_region(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """The previous-key tag is mutable: a key of another region (or account) named there is
    never used as a Decrypt KeyId (review L2)."""
    cfg = aws.region(EAST)
    keys = aws.track(aws.provider.key_service(cfg))
    keys.rotate()
    kms = aws.client("kms", EAST)
    arn = keys.key_id
    foreign = arn.replace(f":{EAST}:", ":eu-north-1:")
    assert foreign != arn
    kms.tag_resource(KeyId=arn, Tags=[{"TagKey": "regionvault:previous-key", "TagValue": foreign}])
    fresh = aws.track(aws.provider.key_service(cfg))
    assert fresh._previous_keys() == []


@pytest.mark.parametrize(
    ("origin", "what"),
    [({"Origin": "EXTERNAL"}, "origin is EXTERNAL"), ({"MultiRegion": True}, "multi-Region")],
)
def test_rotate_refuses_a_key_it_cannot_make_again(
    aws: AwsWorld, origin: dict[str, Any], what: str
) -> None:
    """A key with imported material, in a custom key store or multi-Region is not silently
    replaced by a plain AWS_KMS key (review L3): one line, nothing made."""
    cfg = aws.region(EAST)
    keys = aws.track(aws.provider.key_service(cfg))
    old = keys.key_id
    kms = aws.client("kms", EAST)
    before = len(kms.list_keys()["Keys"])

    def describe(parsed: dict[str, Any], **_: Any) -> None:
        parsed["KeyMetadata"].update(origin)

    keys._kms.meta.events.register("after-call.kms.DescribeKey", describe)
    with pytest.raises(ConfigError, match=what) as caught:
        keys.rotate()
    assert "\n" not in str(caught.value)
    assert len(kms.list_keys()["Keys"]) == before and keys.key_id == old
