"""verify authenticates every object kind (links and copy records too); verify --repair
mends what it can prove bad or unreferenced (damaged links and copy records, a damaged or
lost index, temporaries killed writers left in vaults and inboxes) and nothing a live writer
may still be writing; rebuild-index; prune removes killed runs' temporaries too."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from click.testing import Result
from regionvault.core.errors import LockedError
from regionvault.core.names import TEMP_PREFIX
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.site import Site
from regionvault.providers.local import _fs
from repository_support import flip_bit, snapshot

POINT_ID = re.compile(r"[0-9a-f]{32}")


def fails(result: Result, *words: str) -> str:
    """Exit 1, one ``regionvault: error:`` line naming ``words``, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regionvault: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def last_line(result: Result) -> str:
    return result.stdout.splitlines()[-1]


def verify_json(*args: str) -> dict[str, Any]:
    result = run("verify", "--json", *args)
    return {r["region"]: r for r in json.loads(result.stdout)}


def make_data(root: Path, *, seed: int = 1, size: int = 300_000) -> Path:
    rng = random.Random(seed)
    (root / "db").mkdir(parents=True, exist_ok=True)
    (root / "db" / "subscribers.bin").write_bytes(rng.randbytes(size))
    (root / "conf.txt").write_text("apn = internet\n")
    return root


def vault_objects(workdir: Path, region: str) -> Path:
    return workdir / "regions" / region / "vault" / "objects"


def temporaries(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob(f"{TEMP_PREFIX}*") if p.is_file())


@pytest.fixture
def copied(workdir: Path) -> tuple[Path, str, str]:
    """An instance in east with one point, copied to west: ``(data, point, copy)``."""
    data = make_data(workdir / "nf-data")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = last_line(ok("backup", "nf1"))
    copy = last_line(ok("copy", point, "--to", "west"))
    assert POINT_ID.fullmatch(point) and POINT_ID.fullmatch(copy)
    return data, point, copy


# --------------------------------------------------------------------------- links, copy records


def test_a_flipped_bit_in_a_links_object_is_named_and_repaired(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    data, _, _ = copied
    links = sorted(p for p in (vault_objects(workdir, "west") / "links").rglob("*") if p.is_file())
    assert links, "a copy destination keeps link objects"
    link = links[0]
    flip_bit(link, link.stat().st_size // 2)
    name = link.relative_to(vault_objects(workdir, "west")).as_posix()

    for args in ((), ("--read-data",)):
        report = verify_json("--region", "west", *args)["local:west"]
        assert not report["ok"]
        assert any(name in e and "--repair" in e for e in report["errors"]), report["errors"]
    # the damage stops the next copy into west, naming the object
    (data / "conf.txt").write_text("apn = ims\n")
    second = last_line(ok("backup", "nf1"))
    fails(run("copy", second, "--to", "west"), name)

    repaired = ok("verify", "--repair", "--region", "west")
    assert name in repaired.stdout and "sends the chunks it linked again" in repaired.stdout
    assert not link.exists()
    assert verify_json("--region", "west", "--read-data")["local:west"]["ok"]
    # the next copy sends again what the lost links had mapped, and restores byte-exact
    copy2 = last_line(ok("copy", second, "--to", "west"))
    out = workdir / "out"
    ok("restore", copy2, "--region", "west", "--target", out)
    assert snapshot(out) == snapshot(data)
    assert verify_json("--read-data")["local:west"]["ok"]


def test_a_flipped_bit_in_a_copy_record_is_named_and_repaired(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    ok("tick", "--region", "east")  # the source records its offers and receipts
    records = sorted(
        p for p in (vault_objects(workdir, "east") / "copies").rglob("*") if p.is_file()
    )
    assert records, "a copy source keeps copy records"
    record = records[0]
    flip_bit(record, record.stat().st_size - 3)
    name = record.relative_to(vault_objects(workdir, "east")).as_posix()
    report = verify_json("--region", "east")["local:east"]
    assert not report["ok"] and any(name in e for e in report["errors"])
    repaired = verify_json("--region", "east", "--repair")["local:east"]
    assert repaired["ok"] and any(name in r for r in repaired["repaired"])
    assert verify_json("--region", "east", "--read-data")["local:east"]["ok"]
    ok("tick", "--region", "east")  # and the tick goes on


# --------------------------------------------------------------------------- the index


def test_rebuild_index_after_an_index_object_is_lost(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    data, point, _ = copied
    index_dir = vault_objects(workdir, "east") / "index"
    for path in [p for p in index_dir.rglob("*") if p.is_file()]:
        path.unlink()
    assert not verify_json("--region", "east")["local:east"]["ok"]
    fails(run("prune", "--region", "east"), "no index")  # deletes nothing on partial knowledge
    rebuilt = ok("rebuild-index", "--region", "east")
    assert "local:east: index rebuilt from" in rebuilt.stdout
    assert verify_json("--region", "east", "--read-data")["local:east"]["ok"]
    out = workdir / "out"
    ok("restore", point, "--region", "east", "--target", out)
    assert snapshot(out) == snapshot(data)


def test_verify_repair_rebuilds_a_damaged_index(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    data, point, _ = copied
    index = next(p for p in (vault_objects(workdir, "east") / "index").rglob("*") if p.is_file())
    flip_bit(index, index.stat().st_size // 2)
    name = index.relative_to(vault_objects(workdir, "east")).as_posix()
    report = verify_json("--region", "east")["local:east"]
    assert not report["ok"] and any(name in e for e in report["errors"])
    repaired = verify_json("--region", "east", "--repair", "--read-data")["local:east"]
    assert repaired["ok"], repaired["errors"]
    assert any(r.startswith("index: rebuilt") for r in repaired["repaired"])
    assert not index.exists()
    out = workdir / "out"
    ok("restore", point, "--region", "east", "--target", out)
    assert snapshot(out) == snapshot(data)


# --------------------------------------------------------------------------- temporaries

# A child that starts a put into ``vault`` (or a send into ``inbox``) and is killed with
# SIGKILL once the temporary file holds data: what a kill -9 at that moment leaves.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from regionvault.providers.local import _fs
    fd, tmp = _fs.create_temp(Path(sys.argv[1]))
    os.write(fd, os.urandom(int(sys.argv[2])))
    os.fsync(fd)
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def killed_writer(directory: Path, size: int) -> Path:
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(directory), str(size)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    tmp = Path(child.stdout.strip())
    assert tmp.is_file() and tmp.stat().st_size == size
    return tmp


def test_temporary_names_carry_their_writer_and_only_dead_or_old_ones_are_stale(
    tmp_path: Path,
) -> None:
    top = tmp_path / "vault"
    dead = killed_writer(top / "packs" / "ab", 4096)
    fd, live = _fs.create_temp(top / "packs" / "cd")  # this process: alive
    os.close(fd)
    legacy = top / "index" / f"{TEMP_PREFIX}{os.urandom(8).hex()}"  # no owner recorded
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"x")
    owner = _fs.temp_owner(live.name)
    assert owner == ProcessIdentity.current()
    assert _fs.temp_owner(legacy.name) is None

    stale = {t.handle: t for t in _fs.stale_temps(top, timedelta(minutes=30))}
    assert list(stale) == [dead.relative_to(top).as_posix()]
    assert "is gone" in stale[dead.relative_to(top).as_posix()].reason
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    os.utime(live, (old, old))
    stale = {t.handle for t in _fs.stale_temps(top, timedelta(minutes=30))}
    assert stale == {p.relative_to(top).as_posix() for p in (dead, legacy, live)}


def test_verify_repair_and_prune_remove_what_a_killed_copy_left(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    data, point, _ = copied
    west = workdir / "regions" / "west"
    inbox = west / "inbox" / "local:east"
    # what a copy killed mid-put and mid-send leaves: a pack's temporary in west's vault,
    # a partial payload in west's inbox from east (the sizes of a pack and a batch)
    pack_tmp = killed_writer(vault_objects(workdir, "west") / "packs" / "7f", 1 << 20)
    inbox_tmp = killed_writer(inbox / "copy" / point, 256 << 10)
    # one that a live writer is writing now is never taken
    fd, live_tmp = _fs.create_temp(vault_objects(workdir, "west") / "packs" / "7e")
    os.close(fd)

    # the leftovers trip nothing: listings skip them, a re-run of a copy goes through
    (data / "conf.txt").write_text("apn = ims\n")
    second = last_line(ok("backup", "nf1"))
    ok("copy", second, "--to", "west")
    assert pack_tmp.exists() and inbox_tmp.exists()
    plain = verify_json("--region", "west")["local:west"]
    assert plain["ok"]  # leftovers are no error, but they are named
    assert any(pack_tmp.name in w and "--repair" in w for w in plain["warnings"])

    report = verify_json("--region", "west", "--repair")["local:west"]
    assert report["ok"]
    repaired = "\n".join(report["repaired"])
    assert pack_tmp.name in repaired and inbox_tmp.name in repaired
    assert not pack_tmp.exists() and not inbox_tmp.exists()
    assert live_tmp.exists()
    live_tmp.unlink()
    assert temporaries(west) == []

    # prune removes them too
    pack_tmp = killed_writer(vault_objects(workdir, "west") / "packs" / "7f", 1 << 20)
    inbox_tmp = killed_writer(inbox / "copy" / second, 1 << 10)
    pruned = json.loads(ok("prune", "--region", "west", "--json").stdout)
    assert pruned[0]["temporaries_removed"] == 2
    assert temporaries(west) == []
    assert verify_json("--read-data")["local:west"]["ok"]


def test_verify_repair_takes_the_exclusive_lock_and_changes_nothing_on_a_sound_vault(
    workdir: Path, copied: tuple[Path, str, str]
) -> None:
    before = sorted(p.relative_to(workdir) for p in (workdir / "regions").rglob("*"))
    report = verify_json("--repair", "--read-data")
    assert all(r["ok"] and r["repaired"] == [] for r in report.values())
    after = sorted(p.relative_to(workdir) for p in (workdir / "regions").rglob("*"))
    # nothing changes but the locks and the event log, which records the verify itself
    assert [p for p in after if not {"locks", "events"} & set(p.parts)] == [
        p for p in before if not {"locks", "events"} & set(p.parts)
    ]
    new_events = {p.parts[1] for p in set(after) - set(before) if "events" in p.parts}
    assert new_events == {"east", "west"}
    site = Site.load(workdir / "site.toml")
    try:
        west = site.region("west")
        repo = Repository.open(
            west.vault,
            west.keys,
            region=west.name,
            settings=RepositorySettings(lock_wait=timedelta(seconds=0.2)),
        )
        with repo._lock(exclusive=False, operation="backup"), pytest.raises(LockedError):
            repo.verify(repair=True)  # waits for writers, like prune
        assert repo.verify().ok  # a plain verify runs beside them
    finally:
        site.close()


# --------------------------------------------------------------------------- one-line errors

PYTHON_CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Errno")


def one_line_failure(result: Result, *words: str) -> str:
    line = fails(result, *words)
    assert not PYTHON_CLASS_NAME.search(result.stderr), result.stderr
    return line


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A function mounting a tmpfs of ``size`` at a directory (unmounted after the test)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "16m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for a real disk-full ({done.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file leaving about ``leave`` bytes free on ``disk``."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with ballast.open("wb") as f:
        remaining = max(0, free - leave)
        while remaining:
            n = min(remaining, 1 << 20)
            try:
                f.write(b"\0" * n)
                f.flush()
            except OSError:
                break
            remaining -= n
    return ballast


def test_disk_full_is_one_line_and_loses_nothing(workdir: Path, small_disk: Any) -> None:
    disk = small_disk(workdir / "regions", "24m")
    data = make_data(workdir / "nf-data", size=4 << 20)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    first = last_line(ok("backup", "nf1"))

    # backup: the packs do not fit
    (data / "db" / "more.bin").write_bytes(random.Random(2).randbytes(3 << 20))
    ballast = fill(disk, 1 << 20)
    one_line_failure(run("backup", "nf1"), "No space left on device", "local:east")
    ballast.unlink()
    assert verify_json("--region", "east", "--read-data")["local:east"]["ok"]
    assert temporaries(disk) == []
    second = last_line(ok("backup", "nf1"))

    # copy: west's vault fills up
    ballast = fill(disk, 1 << 20)
    one_line_failure(run("copy", second, "--to", "west"), "No space left on device")
    ballast.unlink()
    ok("verify", "--repair")  # whatever the failed copy left in the inbox goes
    assert all(r["ok"] for r in verify_json("--read-data").values())
    copy = last_line(ok("copy", second, "--to", "west"))

    # prune: rewriting a partly used pack does not fit
    site = Site.load(workdir / "site.toml")
    try:
        east = site.region("east")
        Repository.open(east.vault, east.keys, region=east.name).forget([first])
    finally:
        site.close()
    ballast = fill(disk, 64 << 10)
    one_line_failure(run("prune", "--region", "east"), "No space left on device")
    ballast.unlink()
    assert verify_json("--region", "east", "--read-data")["local:east"]["ok"]
    ok("prune", "--region", "east")
    assert temporaries(disk) == []

    # restore: the target's disk is too small
    target_disk = small_disk(workdir / "small-target", "2m")
    target = target_disk / "out"
    one_line_failure(
        run("restore", copy, "--region", "west", "--target", target), "No space left on device"
    )
    grown = subprocess.run(
        ["mount", "-o", "remount,size=32m", str(target_disk)], capture_output=True, text=True
    )
    assert grown.returncode == 0, grown.stderr
    ok("restore", copy, "--region", "west", "--target", target)  # the same, with room now
    assert snapshot(target) == snapshot(data)
    assert all(r["ok"] for r in verify_json("--read-data").values())


def test_a_full_state_directory_is_one_line_naming_the_file(workdir: Path, small_disk: Any) -> None:
    data = make_data(workdir / "nf-data")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    state = small_disk(workdir / ".regionvault", "1m")  # the site's state_dir
    ballast = fill(state, 0)
    line = one_line_failure(run("tick"), "No space left on device")
    assert str(state) in line  # names the file it could not write
    ballast.unlink()
    ticked = ok("tick")
    assert "failed 0" in ticked.stdout


# The console script with the AWS SDK hidden, as after a plain `pip install .`
_WITHOUT_SDK = textwrap.dedent(
    """
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("boto3", "botocore", "s3transfer"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Hide())
    from regionvault.core.cli import main
    main(sys.argv[1:])
    """
)


def test_a_missing_aws_sdk_is_one_line_in_every_command(workdir: Path) -> None:
    site = workdir / "site.toml"
    site.write_text(
        site.read_text()
        + textwrap.dedent(
            """
            [regions."aws:us-east-1"]
            bucket = "rv-east"
            kms_key = "alias/rv"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    commands = [
        ["points"],
        ["verify"],
        ["verify", "--repair", "--region", "aws:us-east-1"],
        ["prune"],
        ["rebuild-index", "--region", "aws:us-east-1"],
        ["status"],
        ["instances", "--region", "aws:us-east-1"],
        ["restore", "0" * 32, "--region", "aws:us-east-1", "--target", "out"],
    ]
    for args in commands:
        done = subprocess.run(
            [sys.executable, "-c", _WITHOUT_SDK, *args],
            capture_output=True,
            text=True,
            cwd=workdir,
            env=env,
            timeout=120,
        )
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.splitlines() == [
            "regionvault: error: [aws:us-east-1] the aws provider needs boto3: "
            "pip install 'regionvault[aws]'"
        ], (args, done.stderr)
    regions = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SDK, "regions"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=120,
    )
    assert regions.returncode == 0 and "aws:us-east-1" in regions.stdout


@pytest.mark.parametrize("damage", ["truncated", "garbled", "emptied", "a key removed"])
def test_a_damaged_keystore_is_one_line_naming_the_file(workdir: Path, damage: str) -> None:
    data = make_data(workdir / "nf-data")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = last_line(ok("backup", "nf1"))
    keystore = workdir / "regions" / "east" / "keys" / "keystore.json"
    text = keystore.read_bytes()
    if damage == "truncated":
        keystore.write_bytes(text[: len(text) // 2])
    elif damage == "garbled":
        keystore.write_bytes(bytes(b ^ 0x5A for b in text[:64]) + text[64:])
    elif damage == "emptied":
        keystore.write_bytes(b"")
    else:
        doc = json.loads(text)
        del doc["master_keys"]
        keystore.write_text(json.dumps(doc))
    for args in (
        ("backup", "nf1"),
        ("verify", "--region", "east"),
        ("restore", point, "--region", "east", "--target", workdir / "out"),
        ("copy", point, "--to", "west"),
    ):
        one_line_failure(run(*args), str(keystore))


# ``regionvault ARGS`` killed with SIGKILL right after it fsyncs its first temporary file
# under KILL_UNDER: a put or send cut off between writing its bytes and publishing them
_KILLED_COMMAND = textwrap.dedent(
    """
    import os, signal, sys
    kill_under = sys.argv[1]
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if path.startswith(kill_under) and "/.rv-tmp-" in path:
            os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = fsync
    from regionvault.core.cli import main
    main(sys.argv[2:])
    """
)


@pytest.mark.parametrize(
    ("cut_off", "cleaner"),
    [("vault", "verify --repair"), ("inbox", "verify --repair"), ("vault", "prune")],
)
def test_a_copy_killed_mid_write_is_rerun_and_its_leftovers_removed(
    workdir: Path, cut_off: str, cleaner: str
) -> None:
    data = make_data(workdir / "nf-data", size=3 << 20)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = last_line(ok("backup", "nf1"))
    west = (workdir / "regions" / "west").resolve()
    under = west / ("vault/objects/packs" if cut_off == "vault" else "inbox")
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_COMMAND, str(under), "copy", point, "--to", "west"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = temporaries(west)
    assert left and all(under in p.parents for p in left)

    copy = last_line(ok("copy", point, "--to", "west"))  # the re-run does not trip over them
    if cleaner == "prune":
        pruned = json.loads(ok("prune", "--region", "west", "--json").stdout)
        assert pruned[0]["temporaries_removed"] == len(left)
    else:
        report = verify_json("--region", "west", "--repair")["local:west"]
        assert report["ok"] and len(report["repaired"]) == len(left)
    assert temporaries(west) == []
    assert verify_json("--region", "west", "--read-data")["local:west"]["ok"]
    out = workdir / "out"
    ok("restore", copy, "--region", "west", "--target", out)
    assert snapshot(out) == snapshot(data)
