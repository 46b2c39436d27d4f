"""A copy run's use of the destination's KeyService (one data key per run, however many
batches), and prune collecting a destination's stale link tables (``links/``)."""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.errors import TransitError
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.jobs import copy_jobs_for
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository import _links as copy_links
from regionvault.core.repository._links import LINK_PREFIX, LinkTable
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance, RetentionMode
from regionvault.providers.local.keys import LocalKeyService
from repository_support import flip_bit, object_path, snapshot
from test_copy import (
    SETTINGS,
    FlakyTransit,
    data_chunk_ids,
    direct_copy,
    halves,
    pack_headers,
    restore_in,
    run_phase,
    write_mixed,
)

KiB = 1 << 10


class KeyCalls:
    """Counts every LocalKeyService call that needs a region's secrets, by (region,
    method), whichever site or engine makes it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        for method in ("unwrap", "unseal", "generate_data_key"):
            original = getattr(LocalKeyService, method)

            def counted(
                keys: LocalKeyService,
                *args: Any,
                _original: Callable[..., Any] = original,
                _method: str = method,
                **kwargs: Any,
            ) -> Any:
                self.calls[keys.region, _method] += 1
                return _original(keys, *args, **kwargs)

            monkeypatch.setattr(LocalKeyService, method, counted)

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counter[tuple[str, str]]]:
        """The calls made inside the block."""
        before = Counter(self.calls)
        found: Counter[tuple[str, str]] = Counter()
        try:
            yield found
        finally:
            found.update(self.calls)
            found.subtract(before)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> KeyCalls:
    return KeyCalls(monkeypatch)


@pytest.fixture
def engine(site: Site) -> Engine:
    return Engine(site, settings=SETTINGS)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "nf-data"
    write_mixed(root, files=6, file_size=512 << 10, seed=7)
    return root


@pytest.fixture
def instance(east: Region, dataset: Path) -> Instance:
    return east.compute.register_instance("nf-1", dataset, tags={"backup": "1-7"})


def run_ids(region: Region) -> Counter[bytes]:
    """How many of the region's packs carry each run's data key."""
    repo = Repository.open(region.vault, region.keys, region=region.name)
    return Counter(header.wrapped_key for _, header in pack_headers(repo))


# --------------------------------------------------------------------------- data keys


@pytest.mark.parametrize("batch_kib", [32, 256])
def test_a_copy_run_asks_for_one_data_key_however_many_batches(
    engine: Engine,
    calls: KeyCalls,
    west: Region,
    instance: Instance,
    dataset: Path,
    tmp_path: Path,
    batch_kib: int,
) -> None:
    point = engine.backup(instance.id)
    engine.repository(west.name)  # west's repository exists (its config has a key of its own)
    with calls.counting() as found:
        result = direct_copy(engine, point.id, batch_bytes=batch_kib * KiB)
    # many batches crossed, in one transit session: one unseal for the offer, one for the
    # session's transfer key, whatever the number of batches
    batches = result.bytes_forward // (batch_kib * KiB)
    assert batches >= (20 if batch_kib == 32 else 4), result
    assert found[west.name, "unseal"] == 2, found
    assert result.chunks_sent == result.chunks_total > 0
    # ... and one data key for every pack and tree blob of the run, not one per batch
    assert found[west.name, "generate_data_key"] == 1, found
    assert found[west.name, "unwrap"] == 0, found
    packs = run_ids(west)
    assert len(packs) == 1 and sum(packs.values()) > 1, packs

    # a restore in west unwraps the config's key and that one data key
    with calls.counting() as found:
        restore_in(west, result.point.id, tmp_path / "out")
    assert found[west.name, "unwrap"] == 2, found
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def test_a_commit_phase_ingesting_many_batches_asks_for_one_data_key(
    site: Site, calls: KeyCalls, east: Region, west: Region, instance: Instance, tmp_path: Path
) -> None:
    engine = Engine(site, settings=SETTINGS)
    point = engine.backup(instance.id)
    engine.repository(west.name)
    # the first three phases, each in a fresh engine, with batches of 256 KiB
    halves(Engine(site, settings=SETTINGS))[0].offer(point.id)
    halves(Engine(site, settings=SETTINGS))[1].request(point.id, east.name)
    halves(Engine(site, settings=SETTINGS))[0].send(point.id)
    commit = copy_jobs_for(east.name, point.id, west.name, expires_at=None)[3]
    with calls.counting() as found:
        result = run_phase(Engine(site, settings=SETTINGS), commit)
    assert result["batches_ingested"] >= 5
    assert found[west.name, "generate_data_key"] == 1, found
    assert not [key for key in found if key[0] == east.name and found[key]], found
    restore_in(west, result["copy"], tmp_path / "out")


def test_an_interrupted_run_and_its_resumption_use_a_data_key_each(
    engine: Engine,
    calls: KeyCalls,
    east: Region,
    west: Region,
    instance: Instance,
    dataset: Path,
    tmp_path: Path,
) -> None:
    point = engine.backup(instance.id)
    engine.repository(west.name)
    inner = engine.site.transit(east.name, west.name)
    with calls.counting() as found, pytest.raises(TransitError):
        direct_copy(engine, point.id, forward=FlakyTransit(inner, fail_at=4))
    assert found[west.name, "generate_data_key"] == 1, found
    west_repo = Repository.open(west.vault, west.keys, region=west.name)
    assert west_repo.points() == [] and west_repo.verify(read_data=True).ok
    with calls.counting() as found:
        resumed = direct_copy(engine, point.id)
    assert found[west.name, "generate_data_key"] == 1, found
    assert 0 < resumed.chunks_sent < resumed.chunks_total
    assert len(run_ids(west)) == 2
    restore_in(west, resumed.point.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)
    assert west_repo.verify(read_data=True).ok


# --------------------------------------------------------------------------- links and prune


def link_objects(region: Region) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every link object of ``region``'s vault: its ``(source id, own id)`` pairs."""
    store = Repository.open(region.vault, region.keys, region=region.name)._ensure_open()
    out = {}
    for info in region.vault.list(LINK_PREFIX):
        body = store.get_sealed(fmt.ObjectKind.LINKS, info.name)
        out[info.name] = [
            (body[i : i + 32], body[i + 32 : i + 64]) for i in range(0, len(body), 64)
        ]
    return out


def links_of(region: Region, source: Region) -> dict[bytes, bytes]:
    repo = Repository.open(region.vault, region.keys, region=region.name)
    return LinkTable(repo._ensure_open(), source.name).links


def indexed(region: Region) -> set[bytes]:
    repo = Repository.open(region.vault, region.keys, region=region.name)
    return set(repo._ensure_open().load_index().index.chunk_ids())


def change_two_files(dataset: Path) -> dict[Path, bytes]:
    """Give two files new content; returns their old content."""
    rng = random.Random(99)
    old = {}
    for name in ("random-00.bin", "text-01.txt"):
        path = dataset / name
        old[path] = path.read_bytes()
        path.write_bytes(rng.randbytes(len(old[path])))
    return old


def test_prune_drops_the_links_of_collected_chunks_and_a_later_copy_sends_them_again(
    engine: Engine, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    east_repo, west_repo = engine.repository(east.name), engine.repository(west.name)
    p1 = engine.backup(instance.id)
    c1 = direct_copy(engine, p1.id).point
    old = change_two_files(dataset)
    p2 = engine.backup(instance.id)
    c2 = direct_copy(engine, p2.id)
    ids1, ids2 = data_chunk_ids(east_repo, p1.id), data_chunk_ids(east_repo, p2.id)
    only1 = ids1 - ids2
    assert only1 and ids2 - ids1 and 0 < c2.chunks_sent < c2.chunks_total
    before = link_objects(west)
    assert len(before) > 2 and set(links_of(west, east)) >= ids1 | ids2

    # c1 goes: the chunks only it used are collected, and so are their links
    west_repo.forget([c1.id])
    report = west_repo.prune()
    assert report.blobs_removed > 0 and report.skipped == []
    live = indexed(west)
    links = links_of(west, east)
    assert not set(links) & only1
    assert set(links) >= ids2 and set(links.values()) <= live
    after = link_objects(west)
    stale_objects = {n for n, pairs in before.items() if any(a in only1 for a, _ in pairs)}
    assert stale_objects and not stale_objects & set(after)  # rewritten, then deleted
    assert all(mine in live for pairs in after.values() for _, mine in pairs)
    # a prune with nothing stale leaves the link objects as they are
    west_repo.prune()
    assert link_objects(west) == after

    # the old content comes back in a new point: its copy sends exactly what west lost
    for path, content in old.items():
        path.write_bytes(content)
    p3 = engine.backup(instance.id)
    assert data_chunk_ids(east_repo, p3.id) == ids1
    c3 = direct_copy(engine, p3.id)
    assert c3.chunks_sent == len(only1)
    restore_in(west, c3.point.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)
    assert west_repo.verify(read_data=True).ok

    # with every copy forgotten, no link object is left
    west_repo.forget([p.id for p in west_repo.points()])
    west_repo.prune()
    assert link_objects(west) == {}


@pytest.mark.parametrize("protection", ["legal hold", "retention"])
def test_prune_keeps_a_protected_link_object(
    engine: Engine, east: Region, west: Region, instance: Instance, tmp_path: Path, protection: str
) -> None:
    west_repo = engine.repository(west.name)
    p1 = engine.backup(instance.id)
    c1 = direct_copy(engine, p1.id).point
    objects = sorted(link_objects(west))
    assert len(objects) > 2
    held = objects[1]
    if protection == "legal hold":
        west.vault.set_legal_hold(held, True)
    else:
        west.vault.set_retention(
            held, datetime.now(UTC) + timedelta(days=30), RetentionMode.COMPLIANCE
        )
    west_repo.forget([c1.id])
    report = west_repo.prune()
    assert [p.object for p in report.skipped] == [held]
    assert list(link_objects(west)) == [held]
    # its stale links are not trusted: copying the point again sends every chunk
    again = direct_copy(engine, p1.id)
    assert again.chunks_sent == again.chunks_total
    restore_in(west, again.point.id, tmp_path / "out")
    if protection == "legal hold":
        west.vault.set_legal_hold(held, False)
        west_repo.forget([again.point.id])
        west_repo.prune()
        assert link_objects(west) == {}


def test_a_prune_killed_while_rewriting_links_loses_no_live_link(
    engine: Engine,
    east: Region,
    west: Region,
    instance: Instance,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    east_repo, west_repo = engine.repository(east.name), engine.repository(west.name)
    p1 = engine.backup(instance.id)
    c1 = direct_copy(engine, p1.id).point
    change_two_files(dataset)
    p2 = engine.backup(instance.id)
    direct_copy(engine, p2.id)
    ids2 = data_chunk_ids(east_repo, p2.id)
    before = set(link_objects(west))
    west_repo.forget([c1.id])

    real_delete = west.vault.delete

    def dies_on_links(name: str, **kwargs: Any) -> None:
        if name.startswith(LINK_PREFIX):
            raise KeyboardInterrupt("killed")  # the process dies here
        real_delete(name, **kwargs)

    monkeypatch.setattr(west.vault, "delete", dies_on_links)
    with pytest.raises(KeyboardInterrupt):
        west_repo.prune()
    monkeypatch.setattr(west.vault, "delete", real_delete)
    # the new objects were written before any old one went: every live link is there
    between = link_objects(west)
    assert set(between) > before
    links = links_of(west, east)
    assert set(links) >= ids2
    assert all(links[a] in indexed(west) for a in ids2)

    # the copy of p2 still needs nothing; the next prune finishes the job
    assert direct_copy(engine, p2.id).existing
    p3 = engine.backup(instance.id)
    assert direct_copy(engine, p3.id).chunks_sent == 0
    west_repo.prune()
    after = link_objects(west)
    assert not set(after) & before
    pairs = [a for objects in after.values() for a, _ in objects]
    assert len(pairs) == len(set(pairs))  # the duplicates were merged
    assert set(pairs) == set(links_of(west, east)) >= ids2
    restore_in(west, west_repo.points()[-1].id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def test_prune_merges_a_link_table_of_many_objects(
    engine: Engine,
    east: Region,
    west: Region,
    instance: Instance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    west_repo = engine.repository(west.name)
    point = engine.backup(instance.id)
    direct_copy(engine, point.id)
    before = link_objects(west)
    links = links_of(west, east)
    assert len(before) > 3
    west_repo.prune()
    assert link_objects(west) == before  # nothing stale, not many objects: left alone
    monkeypatch.setattr(copy_links, "LINK_OBJECTS_MERGED_AT", 2)
    monkeypatch.setattr(copy_links, "LINKS_PER_OBJECT", 1000)
    west_repo.prune()
    after = link_objects(west)
    assert not set(after) & set(before)
    assert len(after) == -(-len(links) // 1000) < len(before)
    assert links_of(west, east) == links
    assert direct_copy(engine, point.id).existing


def test_prune_leaves_a_damaged_link_object_alone(
    engine: Engine,
    east: Region,
    west: Region,
    instance: Instance,
    caplog: pytest.LogCaptureFixture,
) -> None:
    west_repo = engine.repository(west.name)
    c1 = direct_copy(engine, engine.backup(instance.id).id).point
    objects = sorted(link_objects(west))
    damaged = objects[0]
    flip_bit(object_path(west, damaged), 100)
    west_repo.forget([c1.id])
    with caplog.at_level(logging.WARNING):
        report = west_repo.prune()
    assert report.skipped == []
    assert damaged in caplog.text
    assert [info.name for info in west.vault.list(LINK_PREFIX)] == [damaged]
