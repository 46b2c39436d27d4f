"""The control plane scales (issue #21 item 4): the local Compute answers from its index
(providers/local/_index.py), so listing is one index query per page and registering reads no
record; a process killed between a record's write and its index update leaves an index that
the next open repairs; a tick with nothing due makes O(pages) provider calls. Counted in
provider calls, index queries and record reads, never timed; the times are
benchmarks/control_plane.py's (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core import Region, Site
from regionvault.core.errors import AmbiguousName, ComputeError
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP
from regionvault.providers.local._index import INDEX
from regionvault.providers.local.compute import RECORD, LocalCompute
from regionvault.providers.local.provider import LocalProvider

T0 = datetime(2026, 11, 25, 0, 1, tzinfo=UTC)


def local(region: Region) -> LocalCompute:
    compute = region.compute
    assert isinstance(compute, LocalCompute)
    return compute


def fresh(compute: LocalCompute) -> LocalCompute:
    """Another LocalCompute on the same directory, as a new process opens it."""
    return LocalCompute(
        root=compute.compute_dir.parent,
        provider=compute.provider,
        region=compute.region,
        capabilities=LocalProvider.capabilities,
    )


class Calls:
    """Counts a LocalCompute's provider calls and its record reads from disk."""

    def __init__(self, compute: LocalCompute, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        for name in ("list_instances_page", "get_instance", "set_tags", "_read"):
            original = getattr(compute, name)

            def counted(*args: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
                self.counts[_name] += 1
                return _f(*args, **kw)

            monkeypatch.setattr(compute, name, counted)


def bulk_records(compute: LocalCompute, data: Path, count: int, tags: dict[str, str]) -> None:
    """Records up to ``count`` written as an earlier release left them (no index), in bulk:
    the index is built from them all when the Compute is next used."""
    data.mkdir(parents=True, exist_ok=True)
    compute.index.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{compute.compute_dir / INDEX}{suffix}").unlink(missing_ok=True)
    for i in range(len(compute._ids()), count):
        instance_id = f"i-{i:016x}"
        folder = compute.instances_dir / instance_id
        folder.mkdir(parents=True)
        record = compute._new_record(
            instance_id,
            name=f"nf-{i:05d}",
            tags=compute._tags(tags),
            function=None,
            data_dir=data,
            owned=False,
            state="running",
        )
        (folder / RECORD).write_text(json.dumps(record))


# --------------------------------------------------------------------------- listing


def test_listing_makes_one_index_query_per_page_and_reads_no_record(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = local(east)
    bulk_records(compute, tmp_path / "d", 250, {"backup": "1-7"})
    for i in range(250, 260):  # and some registered the ordinary way, half tagged "x"
        compute.register_instance(f"nf-{i:05d}", tmp_path / "d", tags={"x": "1"})
    compute.set_tags("i-0000000000000003", {"x": "1"})
    opened = fresh(compute)
    calls = Calls(opened, monkeypatch)
    listed = [i.name for i in opened.list_instances(page_size=100)]
    # every instance once, in name order, across ceil(260 / 100) pages; no record read
    assert listed == [f"nf-{i:05d}" for i in range(260)]
    assert calls.counts["list_instances_page"] == math.ceil(260 / 100)
    assert calls.counts["_read"] == 0 and opened.index.stats.records_read == 0
    # per page: is it usable, the page; and at the first, its rows counted against instances/
    assert opened.index.stats.queries <= 2 * math.ceil(260 / 100) + 1

    # a tag filter: still one query per page of matches
    calls.counts.clear()
    tagged = [i.name for i in opened.list_instances(tag_filters={"x": "1"}, page_size=4)]
    assert tagged == ["nf-00003"] + [f"nf-{i:05d}" for i in range(250, 260)]
    assert calls.counts["list_instances_page"] == math.ceil(11 / 4)
    assert calls.counts["_read"] == 0
    # a key alone, and a key with another value
    assert [i.name for i in opened.list_instances(tag_filters={"x": None})] == tagged
    assert list(opened.list_instances(tag_filters={"x": "2"})) == []
    assert len(list(opened.list_instances(tag_filters={"backup": "1-7"}))) == 250


def test_a_page_token_resumes_after_its_instance_and_a_forged_one_is_refused(
    east: Region, tmp_path: Path
) -> None:
    compute = local(east)
    for name in ("b", "a", "c"):
        compute.register_instance(name, tmp_path)
    first = compute.list_instances_page(page_size=2)
    assert [i.name for i in first.instances] == ["a", "b"] and first.next_token
    compute.register_instance("aa", tmp_path)  # before the token's place: not seen now
    rest = compute.list_instances_page(page_token=first.next_token, page_size=2)
    assert [i.name for i in rest.instances] == ["c"] and rest.next_token is None
    with pytest.raises(ComputeError, match="bad page token"):
        compute.list_instances_page(page_token="not-a-token")


# --------------------------------------------------------------------------- registering


def test_registering_reads_no_record_and_queries_the_index_a_constant_number_of_times(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = local(east)
    counted: list[tuple[int, int, int]] = []
    for size in (50, 400):
        bulk_records(compute, tmp_path / f"d{size}", size, {})
        opened = fresh(compute)
        opened.list_instances_page(page_size=1)  # the index built from the records
        before = opened.index.stats.queries
        calls = Calls(opened, monkeypatch)
        opened.register_instance(f"more-{size}", tmp_path)
        counted.append((calls.counts["_read"], opened.index.stats.queries - before, size))
        # the name check is the index's: a second one is refused, naming the holder
        with pytest.raises(AmbiguousName, match=f"more-{size}"):
            opened.register_instance(f"more-{size}", tmp_path)
    (reads_small, queries_small, _), (reads_big, queries_big, _) = counted
    assert reads_small == reads_big == 0
    # is it usable; its rows counted against instances/ (the lock holder's); the name
    assert queries_small == queries_big <= 3


def test_concurrent_registrations_of_one_name_admit_exactly_one(
    east: Region, tmp_path: Path
) -> None:
    """Eight Computes (each its own lock descriptor, as processes have) race to register
    the same four names: each name is taken once, and the index agrees with the records."""
    compute = local(east)
    computes = [fresh(compute) for _ in range(8)]
    won: list[str] = []
    refused: list[str] = []
    guard = threading.Lock()

    def race(c: LocalCompute) -> None:
        for name in ("n0", "n1", "n2", "n3"):
            try:
                c.register_instance(name, tmp_path)
            except AmbiguousName:
                with guard:
                    refused.append(name)
            else:
                with guard:
                    won.append(name)

    threads = [threading.Thread(target=race, args=(c,)) for c in computes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(won) == ["n0", "n1", "n2", "n3"] and len(refused) == 28
    on_disk = sorted(
        json.loads((compute.instances_dir / i / RECORD).read_text())["name"] for i in compute._ids()
    )
    assert on_disk == sorted(i.name for i in fresh(compute).list_instances())


# --------------------------------------------------------------------------- crashes

CHILD = """
import os, signal, sys
from pathlib import Path
from regionvault.providers.local import _fs
from regionvault.providers.local.compute import LocalCompute
from regionvault.providers.local.provider import LocalProvider

compute = LocalCompute(root=Path(sys.argv[1]), provider="local", region="local:east",
                       capabilities=LocalProvider.capabilities)
when = sys.argv[2]
write = _fs.atomic_write

def dying_write(path, data, **kw):
    if path.name == "instance.json":
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    return write(path, data, **kw)

if sys.argv[3] == "register":
    _fs.atomic_write = dying_write
    compute.register_instance("crashed", Path(sys.argv[1]))
else:
    (instance,) = compute.list_instances()
    _fs.atomic_write = dying_write
    compute.set_tags(instance.id, {"backup": "none"})
"""


def killed(compute: LocalCompute, when: str, what: str) -> None:
    """Run ``what`` (register, tag) in a child killed with SIGKILL ``when`` (before,
    after) the record is written: the index update after it never runs."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(compute.compute_dir.parent), when, what],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_registration_killed_at_its_record_leaves_an_index_the_next_open_repairs(
    east: Region, tmp_path: Path, when: str
) -> None:
    compute = local(east)
    compute.register_instance("kept", tmp_path, tags={"backup": "1-7"})
    killed(compute, when, "register")

    opened = fresh(compute)
    names = [i.name for i in opened.list_instances()]
    repaired = opened.index.stats.repaired
    assert len(repaired) == 1  # the one id the crash left marked, and no full rebuild
    assert opened.index.stats.rebuilds == 0
    if when == "after":  # the record is the truth: the instance is there, its name taken
        assert names == ["crashed", "kept"]
        with pytest.raises(AmbiguousName):
            opened.register_instance("crashed", tmp_path)
    else:  # no record: nothing listed, the name free
        assert names == ["kept"]
        assert opened.register_instance("crashed", tmp_path).name == "crashed"
    # repaired once: the next Compute finds nothing to repair
    again = fresh(compute)
    assert [i.name for i in again.list_instances()] == ["crashed", "kept"]
    assert again.index.stats.repaired == []


def test_a_tag_change_killed_after_its_record_is_listed_as_written(
    east: Region, tmp_path: Path
) -> None:
    compute = local(east)
    compute.register_instance("one", tmp_path, tags={"backup": "1-7"})
    killed(compute, "after", "tag")
    (listed,) = fresh(compute).list_instances()
    assert listed.tags["backup"] == "none"


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_missing_or_damaged_index_is_rebuilt_from_the_records(
    east: Region, tmp_path: Path, damage: str
) -> None:
    compute = local(east)
    made = [compute.register_instance(f"n{i}", tmp_path).id for i in range(3)]
    compute.index.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{compute.compute_dir / INDEX}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        (compute.compute_dir / INDEX).write_bytes(b"not a database " * 100)
    opened = fresh(compute)
    assert sorted(i.id for i in opened.list_instances()) == sorted(made)
    assert opened.index.stats.rebuilds == 1
    with pytest.raises(AmbiguousName):
        opened.register_instance("n1", tmp_path)


# ----------------------------------------------- an index that does not match the records


def index_files(compute: LocalCompute) -> list[Path]:
    compute.index.close_all()
    return [
        Path(f"{compute.compute_dir / INDEX}{suffix}")
        for suffix in ("", "-wal", "-shm")
        if Path(f"{compute.compute_dir / INDEX}{suffix}").exists()
    ]


def put_back(files: dict[str, bytes], compute: LocalCompute) -> None:
    compute.index.close_all()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{compute.compute_dir / INDEX}{suffix}").unlink(missing_ok=True)
    for name, data in files.items():
        (compute.compute_dir / name).write_bytes(data)


def on_disk(compute: LocalCompute) -> list[str]:
    records = (
        json.loads((d / RECORD).read_bytes())
        for d in compute.instances_dir.iterdir()
        if (d / RECORD).exists()
    )
    return sorted(r["name"] for r in records if r["state"] not in ("terminated", "pending"))


def test_an_older_index_put_back_beside_newer_records_is_brought_in_step(
    east: Region, tmp_path: Path
) -> None:
    """A root copied non-atomically (the index before instances/): the instance made after
    the copy is listed, found by its tag, and its name is held (review rev4 #1)."""
    compute = local(east)
    compute.register_instance("a", tmp_path)
    old = {f.name: f.read_bytes() for f in index_files(compute)}
    b = compute.register_instance("b", tmp_path, tags={"backup": "1-7"})
    put_back(old, compute)

    opened = fresh(compute)
    assert [i.name for i in opened.list_instances()] == on_disk(compute) == ["a", "b"]
    assert [i.id for i in opened.list_instances(tag_filters={"backup": None})] == [b.id]
    with pytest.raises(AmbiguousName, match=b.id):
        opened.register_instance("b", tmp_path)


def test_an_index_copied_in_from_another_root_is_rebuilt(east: Region, tmp_path: Path) -> None:
    """Another root's index names other records: it is rebuilt, not trusted (rev4 #1)."""
    compute = local(east)
    beta = compute.register_instance("beta", tmp_path)
    other = LocalCompute(
        root=tmp_path / "other",
        provider=compute.provider,
        region=compute.region,
        capabilities=LocalProvider.capabilities,
    )
    other.register_instance("alpha", tmp_path)
    put_back({f.name: f.read_bytes() for f in index_files(other)}, compute)

    opened = fresh(compute)
    assert [i.id for i in opened.list_instances()] == [beta.id]
    assert opened.index.stats.rebuilds == 1
    with pytest.raises(AmbiguousName, match=beta.id):
        opened.register_instance("beta", tmp_path)
    assert opened.register_instance("alpha", tmp_path).name == "alpha"


def test_records_changed_or_removed_without_the_index_are_listed_as_they_are(
    east: Region, tmp_path: Path
) -> None:
    """Records terminated, retagged or removed by hand (or by an earlier release) while an
    index exists: listed as on disk, their names freed (review rev4 #2)."""
    compute = local(east)
    made = {n: compute.register_instance(n, tmp_path, tags={"backup": "1-7"}) for n in "cdefg"}
    compute.close()

    def edit(name: str, **changes: Any) -> None:
        path = compute.instances_dir / made[name].id / RECORD
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    edit("c", state="terminated")
    edit("d", tags={"backup": "none"})
    (compute.instances_dir / made["e"].id / RECORD).unlink()  # an older unregister, cut short
    shutil.rmtree(compute.instances_dir / made["f"].id)  # an older unregister

    opened = fresh(compute)
    # a page's rows are checked whichever page it is: the second page of two here
    first = opened.list_instances_page(page_size=1)
    assert [i.name for i in first.instances] == ["d"]
    assert first.instances[0].tags["backup"] == "none"
    assert [i.name for i in opened.list_instances()] == on_disk(compute) == ["d", "g"]
    assert [i.name for i in opened.list_instances(tag_filters={"backup": "1-7"})] == ["g"]
    for name in "cef":
        assert opened.register_instance(name, tmp_path).name == name
    # and a name check alone (no listing first) sees a record changed behind it
    edit("g", state="terminated")
    assert fresh(compute).register_instance("g", tmp_path).name == "g"


def test_sqlite_errors_are_compute_errors_naming_the_index(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index that cannot be opened or written (disk full, size limit, locked) is a
    one-line ComputeError naming it, for every locked operation too (review rev4 #3)."""
    compute = local(east)
    made = compute.register_instance("one", tmp_path)
    compute.close()

    def failing(*args: Any, **kw: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite3, "connect", failing)
    index = str(compute.compute_dir / INDEX)
    for attempt in (
        lambda: compute.register_instance("two", tmp_path),
        lambda: compute.set_tags(made.id, {"backup": "1-7"}),
        lambda: compute.unregister_instance(made.id),
        lambda: list(compute.list_instances()),
    ):
        with pytest.raises(ComputeError, match=f"{re.escape(index)}: disk I/O error"):
            attempt()
    monkeypatch.undo()
    assert [i.name for i in fresh(compute).list_instances()] == ["one"]


def test_a_change_on_disk_is_not_reported_failed_when_its_index_row_is_not(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written: a failed row update is left to the dirty mark, repaired by
    the next holder of the lock, and the change reported done (review rev4 #4)."""
    compute = local(east)
    compute.register_instance("x", tmp_path)
    put = compute.index._put

    def failing(db: Any, instance_id: str, record: Any, *rest: Any) -> None:
        if record is not None and record["name"] == "y":
            raise sqlite3.OperationalError("database or disk is full")
        put(db, instance_id, record, *rest)

    monkeypatch.setattr(compute.index, "_put", failing)
    made = compute.register_instance("y", tmp_path)  # does not raise
    monkeypatch.undo()

    opened = fresh(compute)
    assert [i.name for i in opened.list_instances()] == ["x", "y"]
    assert opened.index.stats.repaired == [made.id]
    with pytest.raises(AmbiguousName, match=made.id):
        opened.register_instance("y", tmp_path)


# --------------------------------------------------------------------------- the tick


def tick_calls(
    site: Site, east: Region, tmp_path: Path, count: int, mp: pytest.MonkeyPatch
) -> Counter[str]:
    compute = local(east)
    bulk_records(compute, tmp_path / f"d{count}", count, {"backup": "none"})
    compute.list_instances_page(page_size=1)  # the index built from the records first
    calls = Calls(compute, mp)
    # a day apart, so that no step of the first tick's slots is taken as done
    at = T0 + timedelta(days=count // 1000)
    report = Service(Engine(site, clock=lambda: at)).tick()
    assert report.ok, report.problems
    assert not [o for o in report.jobs if o.kind == BACKUP]
    (east_schedule,) = [s for s in report.schedule if s.region == east.name]
    assert len(east_schedule.opted_out) == count
    return Counter(calls.counts)


def test_a_tick_with_nothing_due_makes_provider_calls_linear_in_pages(
    site: Site, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 then 2,000 instances, none due (opted out): the tick lists the region a fixed
    number of times, a page at a time, and asks for no instance one by one."""
    small = tick_calls(site, east, tmp_path, 500, monkeypatch)
    big = tick_calls(site, east, tmp_path, 2000, monkeypatch)
    for counts in (small, big):
        assert counts["get_instance"] == 0 and counts["set_tags"] == 0
        assert counts["_read"] == 0
    listings = (big["list_instances_page"] - small["list_instances_page"]) / (20 - 5)
    assert listings == int(listings) and 1 <= listings <= 4, (small, big)
    assert big["list_instances_page"] <= 4 * small["list_instances_page"]
