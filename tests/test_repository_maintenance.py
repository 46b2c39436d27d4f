"""Forget, prune, WORM protection, locks and concurrent writers."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core import (
    Instance,
    IntegrityError,
    LockedError,
    ObjectNotFound,
    Region,
    RetentionLocked,
    RetentionMode,
)
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._locks import LockInfo
from repository_support import SMALL, capture, listing, repo_for, snapshot


def write_files(root: Path, seed: int, n: int = 5, size: int = 60_000) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{seed}-{i}.bin").write_bytes(rng.randbytes(size))


def pack_bytes(region: Region) -> int:
    return sum(info.size for info in region.vault.list("packs/"))


def test_forget_then_prune_removes_only_unreferenced_data(east: Region, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_files(a, 1)
    write_files(b, 2)
    write_files(b, 3)  # b holds a superset of its own data
    repo = repo_for(east)
    point_a = repo.backup(capture(a))
    point_b = repo.backup(capture(b))
    before = pack_bytes(east)

    # nothing to collect yet
    report = repo.prune()
    assert (report.packs_deleted, report.blobs_removed) == (0, 0)
    assert pack_bytes(east) == before

    assert repo.forget([point_a.id]) == [point_a.id]
    assert [p.id for p in repo.points()] == [point_b.id]
    with pytest.raises(ObjectNotFound):
        repo.forget([point_a.id])
    report = repo.prune()
    assert report.points == 1
    assert report.blobs_removed > 0 and report.packs_deleted > 0
    assert report.bytes_freed > 250_000  # a's 300 kB of random data went
    assert pack_bytes(east) < before - 250_000
    assert repo.verify(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(point_b.id, out)
    assert snapshot(out) == snapshot(b)

    # forgetting everything leaves nothing behind but the config and one empty index
    repo.forget([point_b.id])
    repo.prune()
    assert listing(east, "packs/") == []
    assert len(listing(east, "index/")) == 1
    assert repo.verify(read_data=True).ok


def test_prune_rewrites_partly_used_packs(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1, n=8, size=30_000)
    repo = repo_for(east)
    repo.backup(capture(src))
    for p in list(src.iterdir())[:4]:
        p.unlink()
    keep = repo.backup(capture(src))
    repo.forget([p.id for p in repo.points() if p.id != keep.id])
    report = repo.prune()
    assert report.packs_rewritten > 0 and report.packs_written > 0
    assert repo.verify(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(keep.id, out)
    assert snapshot(out) == snapshot(src)
    # a second prune finds nothing to do
    again = repo.prune()
    assert (again.packs_deleted, again.packs_rewritten, again.indexes_written) == (0, 0, 0)


def test_prune_respects_retain_until_and_legal_hold(east: Region, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_files(a, 1)
    write_files(b, 2)
    repo = repo_for(east)
    locked = repo.backup(capture(a))
    held = repo.backup(capture(b))
    until = datetime.now(UTC) + timedelta(days=30)
    report = repo.protect(locked.id, until=until)
    assert fmt.point_name(locked.id) == report.locked[-1]
    assert any(n.startswith("packs/") for n in report.locked)
    assert any(n.startswith("index/") for n in report.locked)
    repo.protect(held.id, legal_hold=True)

    with pytest.raises(RetentionLocked, match=r"retain|retention"):
        repo.forget([locked.id])
    with pytest.raises(RetentionLocked, match="legal hold"):
        repo.forget([held.id, locked.id])
    assert len(repo.points()) == 2  # refusing one forgets nothing

    # the index and data of a forgotten point can still be locked: prune skips them
    east.vault.set_legal_hold(fmt.point_name(held.id), False)
    repo.forget([held.id])
    report = repo.prune()
    assert report.skipped, report
    assert all("legal hold" in p.message or "retain" in p.message for p in report.skipped)
    assert repo.verify(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(locked.id, out)
    assert snapshot(out) == snapshot(a)

    # expired points are forgotten, except while locked
    assert repo.forget_expired(now=datetime.now(UTC) + timedelta(days=400)) == []


def test_protecting_a_newer_point_extends_shared_locks(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1)
    repo = repo_for(east)
    first = repo.backup(capture(src))
    second = repo.backup(capture(src), parent=False)
    soon = datetime.now(UTC) + timedelta(days=1)
    later = soon + timedelta(days=10)
    repo.protect(first.id, until=soon, mode=RetentionMode.GOVERNANCE)
    report = repo.protect(second.id, until=later, mode=RetentionMode.GOVERNANCE)
    shared = [n for n in report.locked if n.startswith("packs/")]
    assert shared
    for name in shared:
        assert east.vault.head(name).retain_until == later
    # locks never shrink through protect
    again = repo.protect(first.id, until=soon, mode=RetentionMode.GOVERNANCE)
    assert [n for n in again.locked if n.startswith("packs/")] == []
    with pytest.raises(ValueError):
        repo.protect(first.id)


def test_forget_expired(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1, n=1)
    repo = repo_for(east)
    now = datetime.now(UTC)
    old = repo.backup(capture(src), expires_at=now - timedelta(seconds=1))
    fresh = repo.backup(capture(src), expires_at=now + timedelta(days=1))
    never = repo.backup(capture(src))
    assert repo.forget_expired() == [old.id]
    assert [p.id for p in repo.points()] == [fresh.id, never.id]


# --------------------------------------------------------------------------- locks


def foreign_lock(repo: Repository, *, exclusive: bool, expires_in: float, host: str = "elsewhere",
                 pid: int = 4242, **identity: Any) -> str:  # fmt: skip
    store = repo._store
    name = fmt.lock_name(fmt.new_id())
    now = datetime.now(UTC)
    info = LockInfo(name, exclusive, "prune" if exclusive else "backup", host, pid, None, now,
                    now + timedelta(seconds=expires_in), **identity)  # fmt: skip
    store.put_sealed(fmt.ObjectKind.LOCK, name, info.encode(), if_absent=True)
    return name


def quick(region: Region, **changes: object) -> Repository:
    changes.setdefault("lock_wait", timedelta(seconds=0))
    return repo_for(region, replace(SMALL, **changes))  # type: ignore[arg-type]


def test_an_exclusive_lock_blocks_backup_until_it_expires(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1, n=1)
    repo = quick(east)
    name = foreign_lock(repo, exclusive=True, expires_in=0.6)
    with pytest.raises(LockedError, match=r"exclusive lock .* of prune by pid 4242 on elsewhere"):
        repo.backup(capture(src))
    assert listing(east, "locks/") == [name]  # the refused backup left no lock behind
    assert listing(east, "points/") == []
    patient = quick(east, lock_wait=timedelta(seconds=20))
    point = patient.backup(capture(src))  # waits for the expiry, then removes the stale lock
    assert listing(east, "locks/") == []
    assert patient.points() == [point]


def test_shared_locks_coexist_but_block_prune(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1, n=1)
    repo = quick(east)
    foreign_lock(repo, exclusive=False, expires_in=600)
    repo.backup(capture(src))  # shared with shared: fine
    with pytest.raises(LockedError, match="shared lock"):
        repo.prune()


def test_a_dead_processes_lock_is_stale_at_once(east: Region, tmp_path: Path) -> None:
    import socket

    src = tmp_path / "src"
    write_files(src, 1, n=1)
    repo = quick(east)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    name = foreign_lock(
        repo, exclusive=True, expires_in=3600, host=socket.gethostname(), pid=child.pid
    )
    report = repo.prune()
    assert report.stale_locks_removed == 1
    assert name not in listing(east, "locks/")
    repo.backup(capture(src))


def test_a_dead_pid_of_another_pid_namespace_is_not_stale(east: Region, tmp_path: Path) -> None:
    # a holder in a container that shares this host name: its pid says nothing here
    import socket

    repo = quick(east)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = ProcessIdentity.current()
    foreign_lock(repo, exclusive=True, expires_in=3600, host=socket.gethostname(),
                 pid=child.pid, boot_id=me.boot, pid_ns=(me.pid_ns or 0) + 1)  # fmt: skip
    with pytest.raises(LockedError, match="exclusive lock"):
        repo.prune()


def test_a_holder_of_another_boot_of_this_machine_id_is_not_stale(
    east: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    # clones of one image that kept its host name and machine id, sharing this vault: each
    # reads the other's boot as an earlier boot of its own, so a vault's lock of another
    # boot goes by its expiry, never broken as left over from a reboot
    import socket

    from regionvault.core import procs

    monkeypatch.setattr(procs, "machine_tag", lambda: "5eed" * 4)
    repo = quick(east)
    me = ProcessIdentity.current()
    foreign_lock(repo, exclusive=True, expires_in=3600, host=socket.gethostname(),
                 pid=me.pid, boot_id="00000000-0000-4000-8000-000000000000",
                 pid_ns=me.pid_ns, machine=me.machine)  # fmt: skip
    with pytest.raises(LockedError, match="exclusive lock"):
        repo.prune()


def test_lock_objects_carry_the_identity_and_read_without_it() -> None:
    me = ProcessIdentity.current()
    now = datetime.now(UTC)
    info = LockInfo("locks/x", True, "prune", me.host, me.pid, me.ticks, now, now,
                    boot_id=me.boot, pid_ns=me.pid_ns, machine=me.machine)  # fmt: skip
    assert LockInfo.decode("locks/x", info.encode()) == info
    # a lock object of an earlier version: no boot, namespace or machine
    old = json.loads(info.encode())
    for field in ("boot_id", "pid_ns", "machine"):
        del old[field]
    decoded = LockInfo.decode("locks/x", json.dumps(old).encode())
    assert (decoded.boot_id, decoded.pid_ns, decoded.machine) == (None, None, None)
    # and one of this version keeps every field an earlier version requires, as it was
    types = {k: type(v).__name__ for k, v in json.loads(info.encode()).items()}
    assert types.items() >= {
        "exclusive": "bool", "operation": "str", "host": "str", "pid": "int",
        "pid_ticks": "int", "created_at": "str", "expires_at": "str",
    }.items()  # fmt: skip


def test_unreadable_lock_counts_until_ttl(east: Region, tmp_path: Path) -> None:
    repo = quick(east, lock_ttl=timedelta(seconds=0.3))
    east.vault.put("locks/" + "ab" * 16, b"garbage")
    with pytest.raises(LockedError, match="unknown"):
        repo.prune()
    patient = quick(east, lock_ttl=timedelta(seconds=0.3), lock_wait=timedelta(seconds=20))
    patient.prune()
    assert listing(east, "locks/") == []


# --------------------------------------------------------------------------- concurrency


def test_concurrent_backups_into_one_vault(east: Region, tmp_path: Path) -> None:
    sources = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        write_files(src, 10 + i, n=4)
        write_files(src, 99, n=2)  # data all three share
        sources.append(src)
    points: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            repo = repo_for(east)
            inst = Instance(id=f"i-{i}", name=f"nf-{i}", region=east.name)
            points[i] = repo.backup(capture(sources[i], inst)).id
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    repo = repo_for(east)
    assert repo.verify(read_data=True).ok
    for i, src in enumerate(sources):
        out = tmp_path / f"out{i}"
        repo.restore(points[i], out)
        assert snapshot(out) == snapshot(src)
    assert listing(east, "locks/") == []
    # prune keeps all three (and may drop the chunks two backups stored twice)
    repo.prune()
    assert repo.verify(read_data=True).ok
    for i, src in enumerate(sources):
        out = tmp_path / f"again{i}"
        repo.restore(points[i], out)
        assert snapshot(out) == snapshot(src)


CONCURRENT = """
import sys
from pathlib import Path
from datetime import timedelta
from regionvault.core import Instance, Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository, RepositorySettings, ChunkerParams
from regionvault.providers.local import plugin
from regionvault.providers.local.compute import LocalFileCapture
from datetime import UTC, datetime
pm = make_plugin_manager(load_entry_points=False, plugins=[plugin])
registry = registry_from(pm)
site = Site(load_site(sys.argv[1], registry=registry), registry=registry, plugin_manager=pm)
east = site.region("east")
settings = RepositorySettings(pack_size=256 << 10, lock_wait=timedelta(seconds=60))
repo = Repository.init_or_open(east.vault, east.keys, region=east.name, settings=settings,
    chunker=ChunkerParams(min_size=2048, avg_size=8192, max_size=32768))
if sys.argv[2] == "prune":
    repo.prune()
else:
    inst = Instance(id=sys.argv[3], name=sys.argv[3], region=east.name)
    print(repo.backup(LocalFileCapture(inst, datetime.now(UTC), Path(sys.argv[2]))).id)
"""


def test_concurrent_processes_backing_up_and_pruning(
    east: Region, tmp_path: Path, site_file: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(CONCURRENT)
    repo = repo_for(east)
    old = tmp_path / "old"
    write_files(old, 50, n=3)
    repo.forget([repo.backup(capture(old)).id])  # garbage for the pruner
    sources = []
    for i in range(3):
        src = tmp_path / f"p{i}"
        write_files(src, 20 + i, n=3)
        sources.append(src)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(site_file), str(src), f"i-{i}"],
            stdout=subprocess.PIPE, text=True,
        )
        for i, src in enumerate(sources)
    ] + [
        subprocess.Popen([sys.executable, str(script), str(site_file), "prune"])
    ]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    repo = repo_for(east)
    assert repo.verify(read_data=True).ok
    for i, src in enumerate(sources):
        out = tmp_path / f"out{i}"
        repo.restore(outs[i].strip().splitlines()[-1], out)
        assert snapshot(out) == snapshot(src)
    assert listing(east, "locks/") == []


def test_rebuild_index_recovers_lost_index_objects(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, 1)
    repo = repo_for(east)
    point = repo.backup(capture(src))
    for name in listing(east, "index/"):
        east.vault.delete(name)
    report = repo.verify()
    assert not report.ok  # the points' chunks are in no index now
    packs = listing(east, "packs/")
    with pytest.raises(IntegrityError, match=r"in any index|in no index"):
        repo.prune()  # never deletes on partial knowledge
    assert listing(east, "packs/") == packs
    assert repo.rebuild_index() == len(listing(east, "packs/"))
    assert repo.verify(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)
