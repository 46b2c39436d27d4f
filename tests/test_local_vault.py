"""The local Vault against the Vault contract: atomic and conditional puts, ranges, listing,
retention and legal hold."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from regionvault.core import (
    ObjectExists,
    ObjectNotFound,
    Region,
    RetentionLocked,
    RetentionMode,
    VaultError,
)
from regionvault.providers.local import LocalProvider, LocalVault


def local_vault(root: Path) -> LocalVault:
    return LocalVault(
        root=root, provider="local", region="local:east", capabilities=LocalProvider.capabilities
    )


def future(days: int = 1) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


# --------------------------------------------------------------------------- basics


def test_put_get_head_roundtrip(east: Region) -> None:
    vault = east.vault
    info = vault.put("packs/ab/abc", b"hello world")
    assert (info.name, info.size) == ("packs/ab/abc", 11)
    assert vault.get("packs/ab/abc") == b"hello world"
    head = vault.head("packs/ab/abc")
    assert head.size == 11
    assert head.modified.tzinfo is not None
    assert (head.retain_until, head.retention_mode, head.legal_hold) == (None, None, False)
    assert vault.exists("packs/ab/abc")
    assert not vault.exists("packs/ab/abd")

    vault.put("packs/ab/abc", memoryview(b"replaced"))
    assert vault.get("packs/ab/abc") == b"replaced"
    vault.put("empty", b"")
    assert vault.get("empty") == b""


def test_missing_objects(east: Region) -> None:
    with pytest.raises(ObjectNotFound, match="'nope'"):
        east.vault.get("nope")
    with pytest.raises(ObjectNotFound):
        east.vault.head("nope")
    east.vault.delete("nope")  # absent is not an error
    east.vault.put("dir/obj", b"x")
    with pytest.raises(ObjectNotFound):
        east.vault.get("dir")  # a directory of names is not an object
    with pytest.raises(ObjectNotFound):
        east.vault.head("dir/obj/deeper")


def test_ranged_get(east: Region) -> None:
    data = bytes(range(256)) * 4
    east.vault.put("blob", data)
    assert east.vault.get("blob", offset=10, length=5) == data[10:15]
    assert east.vault.get("blob", offset=1000) == data[1000:]
    assert east.vault.get("blob", offset=1020, length=100) == data[1020:]
    assert east.vault.get("blob", offset=len(data)) == b""
    assert east.vault.get("blob", length=0) == b""
    with pytest.raises(VaultError, match="past the end"):
        east.vault.get("blob", offset=len(data) + 1)
    for bad in ({"offset": -1}, {"length": -1}):
        with pytest.raises(VaultError, match="bad range"):
            east.vault.get("blob", **bad)


def test_list_by_prefix_in_name_order(east: Region) -> None:
    names = ["a-b", "a/b", "a/c/d", "a0", "b", "packs/ab/1", "packs/ab/2", "packs/ac/3", "z"]
    for name in reversed(names):
        east.vault.put(name, name.encode())
    assert [o.name for o in east.vault.list()] == sorted(names)
    assert [o.name for o in east.vault.list("a")] == ["a-b", "a/b", "a/c/d", "a0"]
    assert [o.name for o in east.vault.list("a/")] == ["a/b", "a/c/d"]
    assert [o.name for o in east.vault.list("packs/a")] == [
        "packs/ab/1",
        "packs/ab/2",
        "packs/ac/3",
    ]
    assert [o.name for o in east.vault.list("packs/ab/")] == ["packs/ab/1", "packs/ab/2"]
    assert [o.name for o in east.vault.list("packs/ab/2")] == ["packs/ab/2"]
    assert list(east.vault.list("q")) == []
    assert list(east.vault.list("nothing/here/")) == []
    assert {o.name: o.size for o in east.vault.list("packs/")}["packs/ac/3"] == len(b"packs/ac/3")
    with pytest.raises(VaultError, match="prefix"):
        list(east.vault.list("../"))


def test_delete_removes_object_and_empty_directories(east: Region) -> None:
    east.vault.put("x/y/z", b"1")
    east.vault.put("x/keep", b"2")
    east.vault.delete("x/y/z")
    assert not east.vault.exists("x/y/z")
    objects = east.config.path("root") / "vault" / "objects"
    assert not (objects / "x" / "y").exists()
    assert [o.name for o in east.vault.list()] == ["x/keep"]
    east.vault.put("x/y/z", b"3")  # the directory comes back on demand
    assert east.vault.get("x/y/z") == b"3"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/abs",
        "a//b",
        "trailing/",
        "../escape",
        "a/../b",
        "a/./b",
        "..",
        "nul\x00byte",
        "new\nline",
        "x" * 1025,
        "long/" + "s" * 256,
        ".rv-tmp-0123",
        "dir/.rv-tmp-x",
    ],
)
def test_bad_names_are_refused_by_name(east: Region, name: str) -> None:
    for call in (
        lambda: east.vault.put(name, b"x"),
        lambda: east.vault.get(name),
        lambda: east.vault.head(name),
        lambda: east.vault.delete(name),
    ):
        with pytest.raises(VaultError, match="bad object name") as err:
            call()
        assert repr(name)[:50] in str(err.value)


def test_names_that_collide_as_paths(east: Region) -> None:
    east.vault.put("a", b"1")
    with pytest.raises(VaultError, match="itself an object"):
        east.vault.put("a/b", b"2")
    east.vault.put("d/e", b"3")
    with pytest.raises(VaultError, match="start with 'd/'"):
        east.vault.put("d", b"4", if_absent=True)
    assert east.vault.get("a") == b"1"


def test_vault_id_is_stable(east: Region) -> None:
    vid = east.vault.vault_id
    assert vid.startswith("v-")
    assert local_vault(east.config.path("root")).vault_id == vid
    assert (east.config.path("root") / "vault" / "VAULT_ID").read_text().strip() == vid


def test_vault_id_created_once_under_a_race(tmp_path: Path) -> None:
    vaults = [local_vault(tmp_path) for _ in range(8)]
    barrier = threading.Barrier(len(vaults))
    ids: list[str] = []
    lock = threading.Lock()

    def read_id(v: LocalVault) -> None:
        barrier.wait(timeout=10)
        vid = v.vault_id
        with lock:
            ids.append(vid)

    threads = [threading.Thread(target=read_id, args=(v,)) for v in vaults]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ids) == 8
    assert len(set(ids)) == 1


# --------------------------------------------------------------------------- if-absent


def test_if_absent_put(east: Region) -> None:
    east.vault.put("manifest/1", b"first", if_absent=True)
    with pytest.raises(ObjectExists, match="manifest/1"):
        east.vault.put("manifest/1", b"second", if_absent=True)
    assert east.vault.get("manifest/1") == b"first"
    assert [o.name for o in east.vault.list()] == ["manifest/1"]


def test_if_absent_race_between_threads_has_one_winner(tmp_path: Path) -> None:
    contenders = 8
    barrier = threading.Barrier(contenders)
    outcomes: dict[int, str] = {}

    def contend(i: int) -> None:
        vault = local_vault(tmp_path)
        barrier.wait(timeout=10)
        try:
            vault.put("lock/owner", f"writer {i}".encode(), if_absent=True)
            outcomes[i] = "won"
        except ObjectExists:
            outcomes[i] = "lost"

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == contenders
    assert len(winners) == 1
    assert local_vault(tmp_path).get("lock/owner") == f"writer {winners[0]}".encode()


RACER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from regionvault.core import ObjectExists
    from regionvault.providers.local import LocalProvider, LocalVault

    vault = LocalVault(root=Path(sys.argv[1]), provider="local", region="local:east",
                       capabilities=LocalProvider.capabilities)
    data = sys.argv[2].encode() * 100_000
    vault.vault_id
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        vault.put("manifest/race", data, if_absent=True)
        print("won", flush=True)
    except ObjectExists:
        print("lost", flush=True)
    """
)


def test_if_absent_race_between_processes_has_one_winner(tmp_path: Path) -> None:
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    }
    for p in procs.values():
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    for p in procs.values():  # release both as close together as we can
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = {tag: p.communicate(timeout=60)[0].strip() for tag, p in procs.items()}
    assert sorted(results.values()) == ["lost", "won"]
    winner = next(tag for tag, r in results.items() if r == "won")
    assert local_vault(tmp_path).get("manifest/race") == winner.encode() * 100_000


# --------------------------------------------------------------------------- kill


KILLED_WRITER = textwrap.dedent(
    """
    import os, stat, sys, time
    from pathlib import Path
    from regionvault.providers.local import LocalProvider, LocalVault

    root, point, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    vault = LocalVault(root=root, provider="local", region="local:east",
                       capabilities=LocalProvider.capabilities)
    data = b"N" * size

    def halt():
        print("halted", flush=True)
        time.sleep(120)  # the test kills us here
        os._exit(3)

    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace
    writes = 0
    def write(fd, chunk):
        global writes
        writes += 1
        if point == "writing" and writes == 2:
            halt()
        return real_write(fd, chunk)
    def fsync(fd):
        if point == "fsync" and stat.S_ISREG(os.fstat(fd).st_mode):
            halt()  # the object's bytes are written, not yet synced
        return real_fsync(fd)
    def replace(src, dst):
        if point == "rename":
            halt()
        real_replace(src, dst)
        if point == "renamed":
            halt()
    os.write, os.fsync, os.replace = write, fsync, replace

    if point == "before":
        halt()
    vault.put("packs/big", data)
    if point == "after":
        halt()
    """
)
#: the content the object must have after a kill at each point, given that it held the old
#: content before (None: the old content, or absent if there was none)
EXPECTED_AFTER_KILL = {
    "before": None,
    "writing": None,
    "fsync": None,
    "rename": None,
    "renamed": "new",
    "after": "new",
}
#: points at which the put is under way, so its temporary file is left behind
MID_PUT = {"writing", "fsync", "rename"}
BIG = 20 << 20  # several write(2) calls of 8 MiB


@pytest.mark.parametrize("old", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("point", list(EXPECTED_AFTER_KILL))
def test_put_is_atomic_when_the_writer_is_killed(tmp_path: Path, point: str, old: bool) -> None:
    vault = local_vault(tmp_path)
    if old:
        vault.put("packs/big", b"O" * 1000)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), point, str(BIG)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "halted"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL

    vault = local_vault(tmp_path)
    if EXPECTED_AFTER_KILL[point] == "new":
        assert vault.get("packs/big") == b"N" * BIG
    elif old:
        assert vault.get("packs/big") == b"O" * 1000
    else:
        assert not vault.exists("packs/big")
    assert [o.name for o in vault.list()] == (
        ["packs/big"] if old or EXPECTED_AFTER_KILL[point] else []
    )
    # what the killed writer left is a temporary file only, and it can be swept
    leftovers = list((tmp_path / "vault").rglob(".rv-tmp-*"))
    assert len(leftovers) == (1 if point in MID_PUT else 0)
    assert vault.ex_remove_stale_temp(older_than=0) == len(leftovers)
    assert not list((tmp_path / "vault").rglob(".rv-tmp-*"))


def test_listing_skips_temporary_files(east: Region) -> None:
    east.vault.put("packs/one", b"1")
    objects = east.config.path("root") / "vault" / "objects"
    (objects / "packs" / ".rv-tmp-deadbeef").write_bytes(b"partial")
    assert [o.name for o in east.vault.list()] == ["packs/one"]
    sweeper = local_vault(east.config.path("root"))
    assert sweeper.ex_remove_stale_temp(older_than=3600) == 0  # too young to sweep
    assert sweeper.ex_remove_stale_temp(older_than=0) == 1


# --------------------------------------------------------------------------- retention


def test_compliance_retention_refuses_delete_overwrite_and_shortening(east: Region) -> None:
    vault = east.vault
    vault.put("manifests/rp1", b"rp")
    until = future(2)
    info = vault.set_retention("manifests/rp1", until, RetentionMode.COMPLIANCE)
    assert info.retain_until == until.astimezone(UTC)
    assert info.retention_mode is RetentionMode.COMPLIANCE
    assert vault.head("manifests/rp1").retain_until == until.astimezone(UTC)

    for bypass in (False, True):
        with pytest.raises(RetentionLocked, match="compliance retention") as err:
            vault.delete("manifests/rp1", bypass_governance=bypass)
        assert err.value.name == "manifests/rp1"
    with pytest.raises(RetentionLocked, match="cannot be overwritten"):
        vault.put("manifests/rp1", b"changed")
    with pytest.raises(RetentionLocked, match="only be extended"):
        vault.set_retention("manifests/rp1", future(1), bypass_governance=True)
    with pytest.raises(RetentionLocked, match="cannot become governance"):
        vault.set_retention("manifests/rp1", future(3), RetentionMode.GOVERNANCE)

    longer = future(5)
    assert vault.set_retention("manifests/rp1", longer).retain_until == longer.astimezone(UTC)
    assert vault.get("manifests/rp1") == b"rp"
    # the lock is on disk, not in this object
    with pytest.raises(RetentionLocked):
        local_vault(east.config.path("root")).delete("manifests/rp1")
    listed = next(iter(vault.list("manifests/")))
    assert (listed.retain_until, listed.retention_mode) == (
        longer.astimezone(UTC),
        RetentionMode.COMPLIANCE,
    )


def test_governance_retention_yields_only_to_bypass(east: Region) -> None:
    vault = east.vault
    vault.put("rp", b"x")
    vault.set_retention("rp", future(3), RetentionMode.GOVERNANCE)
    with pytest.raises(RetentionLocked, match="bypass_governance"):
        vault.delete("rp")
    with pytest.raises(RetentionLocked, match="only be shortened"):
        vault.set_retention("rp", future(1), RetentionMode.GOVERNANCE)
    assert vault.set_retention("rp", future(1), RetentionMode.GOVERNANCE, bypass_governance=True)
    vault.delete("rp", bypass_governance=True)
    assert not vault.exists("rp")


def test_governance_may_be_removed_with_bypass_and_strengthened_freely(east: Region) -> None:
    vault = east.vault
    vault.put("a", b"x")
    vault.set_retention("a", future(3), RetentionMode.GOVERNANCE)
    past = datetime.now(UTC) - timedelta(seconds=1)
    vault.set_retention("a", past, RetentionMode.GOVERNANCE, bypass_governance=True)
    vault.delete("a")  # the lock has passed: no bypass needed
    vault.put("b", b"x")
    vault.set_retention("b", future(1), RetentionMode.GOVERNANCE)
    vault.set_retention("b", future(1), RetentionMode.COMPLIANCE)
    with pytest.raises(RetentionLocked, match="compliance"):
        vault.delete("b", bypass_governance=True)


def test_legal_hold_blocks_until_lifted(east: Region) -> None:
    vault = east.vault
    vault.put("rp", b"x")
    assert vault.set_legal_hold("rp", True).legal_hold
    for bypass in (False, True):
        with pytest.raises(RetentionLocked, match="legal hold"):
            vault.delete("rp", bypass_governance=bypass)
    with pytest.raises(RetentionLocked, match="legal hold"):
        vault.put("rp", b"y")
    assert vault.head("rp").legal_hold
    assert not vault.set_legal_hold("rp", False).legal_hold
    vault.delete("rp")
    assert not vault.exists("rp")


def test_a_new_object_does_not_inherit_old_protection(east: Region) -> None:
    vault = east.vault
    vault.put("rp", b"x")
    vault.set_retention("rp", future(1), RetentionMode.GOVERNANCE)
    vault.delete("rp", bypass_governance=True)
    vault.put("rp", b"new", if_absent=True)
    assert vault.head("rp").retain_until is None
    vault.delete("rp")


def test_retention_input_errors(east: Region) -> None:
    vault = east.vault
    with pytest.raises(ObjectNotFound):
        vault.set_retention("absent", future())
    with pytest.raises(ObjectNotFound):
        vault.set_legal_hold("absent", True)
    vault.put("rp", b"x")
    with pytest.raises(VaultError, match="timezone-aware"):
        vault.set_retention("rp", datetime.now() + timedelta(days=1))
    with pytest.raises(VaultError, match="retention mode"):
        vault.set_retention("rp", future(), "forever")  # type: ignore[arg-type]


def test_damaged_retention_record_locks_rather_than_unlocks(east: Region) -> None:
    east.vault.put("rp", b"x")
    east.vault.set_legal_hold("rp", True)
    (east.config.path("root") / "vault" / "meta" / "rp").write_text("{garbage")
    with pytest.raises(VaultError, match="malformed"):
        east.vault.delete("rp")
    assert (east.config.path("root") / "vault" / "objects" / "rp").read_bytes() == b"x"


def test_concurrent_put_and_delete_in_one_directory_raise_nothing(east: Region) -> None:
    """Deletes empty their parent directory and remove it; a racing put or delete in the same
    directory must neither fail nor lose an object (the repository's lock objects do this)."""
    vault = east.vault
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            for i in range(60):
                name = f"locks/{worker}-{i}"
                vault.put(name, b"x")
                vault.delete(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert list(vault.list("locks/")) == []
