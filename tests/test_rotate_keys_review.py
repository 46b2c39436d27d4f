"""Regressions of the key-rotation review (issue 19, part 6; /work/wt/review-rotate.md) on
the local provider: a rotation writes only under the key ``rotate()`` returned (H1), a copy
run's data key made before a rotation writes no pack after it (M1), a transient KeyService
error reading the keyring is an outage, not a damaged pack (M2), a copy payload that no
longer unseals is dropped and asked for again (M5), a keyring's repr shows no key (L1), a
damaged index stops a rotation before a key is made (L4), and verify names a pack under an
old master key that no keyring holds (L5)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from regionvault.core.errors import RegionVaultError, TransientError, TransitError
from regionvault.core.pipeline import Engine
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._keyring import Keyring, generations
from regionvault.core.repository._pipeline import Failure
from regionvault.core.repository.copy.ingest import RunKey
from regionvault.core.site import Region
from regionvault.core.types import Instance
from repository_support import SMALL, capture, repo_for, snapshot
from site_support import open_site
from test_copy import (  # noqa: F401  (fixtures)
    SETTINGS,
    FlakyTransit,
    dataset,
    direct_copy,
    engine,
    files_under,
    inbox_dir,
    instance,
    restore_in,
)
from test_rotate_keys import make_data


def keystore_path(region: Region) -> Path:
    return region.keys.keys_dir / "keystore.json"  # type: ignore[attr-defined,no-any-return]


def master_keys(region: Region) -> list[str]:
    return sorted(json.loads(keystore_path(region).read_text())["master_keys"])


def drop_all_but_current(region: Region) -> None:
    path = keystore_path(region)
    store = json.loads(path.read_text())
    cur = store["current_master"]
    store["master_keys"] = {cur: store["master_keys"][cur]}
    path.write_text(json.dumps(store))


@contextlib.contextmanager
def reopened(site_file: Path, name: str = "east") -> Iterator[tuple[Repository, Region]]:
    """The region's repository as a new process opens it (its own keystore read)."""
    with open_site(site_file) as site:
        region = site.region(name)
        yield Repository.open(region.vault, region.keys, region=region.name, settings=SMALL), region


def test_copy_run_key_made_before_a_rotation_writes_no_pack_after_it(
    site_file: Path, east: Region, tmp_path: Path
) -> None:
    repo = repo_for(east)
    repo.backup(capture(make_data(tmp_path / "d", seed=1)))
    store = repo._ensure_open()
    run = RunKey(store)
    made = run.data_key()  # a copy run's key; its first batch aborted before any pack
    repo.rotate_keys()
    writer = run.writer(store, Failure())  # the same run's next batch, after the rotation
    plain = os.urandom(5000)
    writer.add(store.chunk_id(plain), fmt.BlobType.DATA, 0, len(plain), plain)
    writer.close()
    assert run.data_key().key_id == east.keys.key_id != made.key_id
    drop_all_but_current(east)
    with reopened(site_file) as (fresh, _):
        report = fresh.verify(read_data=True)
    assert report.ok, report.errors


def test_an_aborted_batch_forgets_a_run_key_no_pack_uses(east: Region) -> None:
    store = repo_for(east)._ensure_open()
    run = RunKey(store)
    first = run.data_key()
    run_id = run.run_id
    run.aborted()
    assert run.data_key().wrapped != first.wrapped and run.run_id != run_id
    run.indexed()  # a pack under it is indexed: from now on the key is kept
    kept = run.data_key()
    run.aborted()
    assert run.data_key() is kept


def test_a_transient_error_reading_the_keyring_is_no_damaged_pack(
    site_file: Path, east: Region, tmp_path: Path
) -> None:
    repo = repo_for(east)
    data = make_data(tmp_path / "d", seed=1)
    point = repo.backup(capture(data)).id
    repo.rotate_keys()
    drop_all_but_current(east)
    with reopened(site_file) as (fresh, region):
        real = region.keys.unwrap
        outage = [True]

        def flaky(wrapped: bytes, context: dict[str, str]) -> bytes:
            if outage[0] and context.get("kind") == "keyring":
                raise TransientError("KMS throttled (simulated)", region=region.name)
            return real(wrapped, context)

        region.keys.unwrap = flaky  # type: ignore[method-assign]
        with pytest.raises(TransientError):
            fresh.restore(point, tmp_path / "out")
        outage[0] = False  # nothing was cached from the failed read: the next restore works
        fresh.restore(point, tmp_path / "out2")
    assert snapshot(tmp_path / "out2") == snapshot(data)


def test_a_keyring_repr_shows_no_run_key() -> None:
    from datetime import UTC, datetime

    secret = bytes(range(32))
    text = repr(Keyring(1, "k1", datetime.now(UTC), {b"\1" * 16: secret}))
    assert secret.hex() not in text and repr(secret) not in text and "k1" in text


def test_a_rotation_writes_only_under_the_key_rotate_returned(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = repo_for(east)
    repo.backup(capture(make_data(tmp_path / "d", seed=1)))
    keys = east.keys
    real_rotate = type(keys).rotate

    def answered_late(self: object) -> str:
        real_rotate(self)  # type: ignore[arg-type]
        return "a-key-the-service-does-not-wrap-under"  # what the KMS has not caught up with

    monkeypatch.setattr(type(keys), "rotate", answered_late)
    with pytest.raises(RegionVaultError, match="run rotate-keys again"):
        repo.rotate_keys()
    assert generations(east.vault) == []  # nothing written under a key not asked for
    monkeypatch.undo()
    report = repo.rotate_keys()  # run again: it finishes, under the key now current
    assert report.resumed and report.new_key_id == keys.key_id
    assert len(master_keys(east)) == 2


def test_a_damaged_index_stops_a_rotation_before_a_key_is_made(
    east: Region, tmp_path: Path
) -> None:
    repo = repo_for(east)
    repo.backup(capture(make_data(tmp_path / "d", seed=1)))
    before = master_keys(east)
    (index,) = [i for i in east.vault.list(fmt.INDEX_PREFIX)][:1]
    data = bytearray(east.vault.get(index.name))
    data[-5] ^= 1
    east.vault.put(index.name, bytes(data))
    with pytest.raises(RegionVaultError):
        repo_for(east).rotate_keys()
    assert master_keys(east) == before


def test_verify_warns_of_a_run_under_an_old_key_that_no_keyring_holds(
    east: Region, tmp_path: Path
) -> None:
    """A run written under a master key that is no longer current, and that no keyring
    holds (a writer that had not followed a rotation yet; here the key service rotated
    outside rotate-keys), is named by verify with its key: that key must stay enabled. A
    rotate-keys run puts the run in the keyring and the warning goes (review L5)."""
    repo = repo_for(east)
    repo.backup(capture(make_data(tmp_path / "d", seed=1)))
    old = east.keys.key_id
    assert repo.verify().warnings == []
    east.keys.rotate()
    report = repo.verify()
    assert report.ok
    (warning,) = report.warnings
    assert old in warning.message and "in no keyring" in warning.message
    assert warning.object.startswith(fmt.PACK_PREFIX)
    repo.rotate_keys()
    assert repo.verify(read_data=True).warnings == []


def test_a_leftover_payload_that_no_longer_unseals_is_dropped_and_sent_again(
    engine: Engine,  # noqa: F811
    east: Region,
    west: Region,
    instance: Instance,  # noqa: F811
    dataset: Path,  # noqa: F811
    site_file: Path,
    tmp_path: Path,
) -> None:
    """A batch in west's inbox sealed to west's key before west rotated and dropped that key
    no longer unseals: the next copy drops it and asks for its chunks again instead of
    failing every retry (review M5)."""
    point = engine.backup(instance.id)
    flaky = FlakyTransit(
        engine.site.transit(east.name, west.name), fail_at=1, delivered_then_fail=True
    )
    with pytest.raises(TransitError):
        direct_copy(engine, point.id, forward=flaky)
    (leftover,) = [p for p in files_under(inbox_dir(west)) if "batch-" in p.name]
    engine.repository("west").rotate_keys()
    path = keystore_path(west)
    store = json.loads(path.read_text())
    store["master_keys"] = {store["current_master"]: store["master_keys"][store["current_master"]]}
    seal = store["current_sealing"]  # the sealing key the batch was sealed to goes too
    store["sealing_keys"] = {seal: store["sealing_keys"][seal]}
    path.write_text(json.dumps(store))
    with open_site(site_file) as fresh:  # a new process: nothing unsealed is remembered
        again = Engine(fresh, settings=SETTINGS)
        resumed = direct_copy(again, point.id)  # before the fix: KeyAccessDenied, every retry
        assert not resumed.existing and resumed.chunks_sent > 0
        assert not leftover.exists()
        restore_in(fresh.region("west"), resumed.point.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)
