"""``regionvault rotate-keys``: a new master key becomes current and every wrapped key the
region's vault holds (the config's, the keyring's) names it, without a pack or index object
rewritten; with the old key removed from the local keystore every point still restores
byte-exact and ``verify --read-data`` passes (issue 19, item 6)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from click.testing import Result
from regionvault.core import Instance, Site
from regionvault.core.repository import _format as fmt
from repository_support import capture, repo_for, snapshot
from site_support import open_site, region_root

POINT_LINE = 32  # a point id is the last line of `backup`


def last_line(result: Result) -> str:
    return result.stdout.splitlines()[-1]


def make_data(root: Path, *, seed: int, size: int = 400_000) -> Path:
    rng = random.Random(seed)
    (root / "db").mkdir(parents=True, exist_ok=True)
    (root / "db" / "subscribers.bin").write_bytes(rng.randbytes(size))
    (root / "conf.txt").write_text(f"apn = internet {seed}\n")
    return root


def region_dir(workdir: Path, region: str) -> Path:
    return workdir / "regions" / region


def vault_files(workdir: Path, region: str) -> dict[str, bytes]:
    """Every object of the region's vault: name -> bytes (temporaries left out)."""
    top = region_dir(workdir, region) / "vault" / "objects"
    return {
        str(p.relative_to(top)): p.read_bytes()
        for p in sorted(top.rglob("*"))
        if p.is_file() and not p.name.startswith(".rv-tmp-")
    }


def local_kid(wrapped: bytes) -> str:
    """The master key id a local KeyService's wrapped data key names (providers/local/keys.py:
    ``0x01 | len(kid) | kid | nonce | ciphertext``)."""
    assert wrapped[0] == 0x01, wrapped[:2]
    return wrapped[2 : 2 + wrapped[1]].decode("ascii")


def sealed_kid(data: bytes, name: str, kind: fmt.ObjectKind) -> str:
    header = fmt.EnvelopeHeader.parse(name, data, kind)
    assert header.key_source == fmt.KEY_SOURCE_WRAPPED
    return local_kid(header.wrapped_key)


def pack_kids(files: dict[str, bytes]) -> dict[str, str]:
    return {
        name: local_kid(fmt.PackHeader.parse(name, data).wrapped_key)
        for name, data in files.items()
        if name.startswith(fmt.PACK_PREFIX)
    }


def keystore(workdir: Path, region: str) -> tuple[Path, dict[str, Any]]:
    path = region_dir(workdir, region) / "keys" / "keystore.json"
    return path, json.loads(path.read_text())


def drop_master_keys(workdir: Path, region: str, keep: str) -> list[str]:
    """Remove every master key but ``keep`` from the region's keystore; the removed ids."""
    path, store = keystore(workdir, region)
    gone = sorted(k for k in store["master_keys"] if k != keep)
    store["master_keys"] = {keep: store["master_keys"][keep]}
    assert store["current_master"] == keep
    path.write_text(json.dumps(store, indent=1, sort_keys=True))
    return gone


def rotate(region: str = "east") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ok("rotate-keys", "--region", region, "--json").stdout)
    return out


def restores(workdir: Path, point: str, data: dict[str, tuple[object, ...]], tag: str) -> None:
    out = workdir / f"out-{tag}"
    ok("restore", point, "--region", "east", "--target", out)
    assert snapshot(out) == data


def verified(region: str = "east") -> None:
    rows = json.loads(run("verify", "--json", "--read-data", "--region", region).stdout)
    assert rows[0]["ok"], rows[0]["errors"]
    assert rows[0]["warnings"] == [], rows[0]["warnings"]


@pytest.fixture
def two_points(workdir: Path) -> tuple[Path, list[tuple[str, dict[str, tuple[object, ...]]]]]:
    """An instance in east backed up twice (its data changed between), the first point
    copied to west: ``(data dir, [(point, its tree snapshot)])``."""
    data = make_data(workdir / "nf-data", seed=1)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    first = last_line(ok("backup", "nf1"))
    first_tree = snapshot(data)
    make_data(data, seed=2, size=300_000)
    second = last_line(ok("backup", "nf1"))
    ok("copy", first, "--to", "west")
    return data, [(first, first_tree), (second, snapshot(data))]


def test_rotate_keys_rewraps_everything_and_the_old_key_can_go(
    workdir: Path, two_points: tuple[Path, list[tuple[str, dict[str, tuple[object, ...]]]]]
) -> None:
    data, points = two_points
    _, store = keystore(workdir, "east")
    old_key = store["current_master"]
    before = vault_files(workdir, "east")
    assert sealed_kid(before["config"], "config", fmt.ObjectKind.CONFIG) == old_key
    assert set(pack_kids(before).values()) == {old_key}
    west_before = vault_files(workdir, "west")

    report = rotate()

    _, store = keystore(workdir, "east")
    new_key = store["current_master"]
    assert new_key != old_key
    assert report["old_key_id"] == old_key and report["new_key_id"] == new_key
    assert report["generation"] == 1 and not report["resumed"]
    # both backups' runs: each is one run of the backup, and nothing else wrote packs
    assert report["runs"] == len({fmt.PackHeader.parse(n, d).run_id for n, d in before.items()
                                  if n.startswith(fmt.PACK_PREFIX)}) == 2  # fmt: skip
    after = vault_files(workdir, "east")
    # every wrapped key in the region names the new master key
    assert sealed_kid(after["config"], "config", fmt.ObjectKind.CONFIG) == new_key
    assert sealed_kid(after["keyring/00000001"], "keyring/00000001", fmt.ObjectKind.KEYRING) == (
        new_key
    )
    # no pack, index, manifest or other object rewritten: only the config and the keyring,
    # and the rotation's own entry in the event log (sealed under the repository's secret)
    changed = {n for n in before.keys() & after.keys() if before[n] != after[n]}
    assert changed == {"config"}
    added = set(after) - set(before)
    (event,) = {n for n in added if n.startswith(fmt.EVENT_PREFIX)}
    assert added - {event} == {"keyring/00000001"}
    assert set(before) - set(after) == set()
    assert vault_files(workdir, "west") == west_before  # another region is not touched

    assert drop_master_keys(workdir, "east", keep=new_key) == [old_key]
    for n, (point, tree) in enumerate(points):
        restores(workdir, point, tree, f"a{n}")
    verified()
    ok("points", "--region", "east")

    # a backup after the rotation wraps its run key under the new key
    make_data(data, seed=3, size=200_000)
    third = last_line(ok("backup", "nf1"))
    points.append((third, snapshot(data)))
    new_packs = {n for n in vault_files(workdir, "east") if n.startswith(fmt.PACK_PREFIX)}
    new_packs -= set(after)
    assert new_packs
    assert set(pack_kids({n: vault_files(workdir, "east")[n] for n in new_packs}).values()) == {
        new_key
    }

    # a second rotation re-wraps again: generation 2, generation 1 gone
    second = rotate()
    _, store = keystore(workdir, "east")
    newer_key = store["current_master"]
    assert second["generation"] == 2 and second["old_key_id"] == new_key
    assert second["new_key_id"] == newer_key != new_key
    assert second["runs"] == 3 and second["deleted"] == ["keyring/00000001"]
    final = vault_files(workdir, "east")
    assert [n for n in final if n.startswith(fmt.KEYRING_PREFIX)] == ["keyring/00000002"]
    assert sealed_kid(final["config"], "config", fmt.ObjectKind.CONFIG) == newer_key
    assert sealed_kid(final["keyring/00000002"], "keyring/00000002", fmt.ObjectKind.KEYRING) == (
        newer_key
    )
    assert drop_master_keys(workdir, "east", keep=newer_key) == [new_key]
    for n, (point, tree) in enumerate(points):
        restores(workdir, point, tree, f"b{n}")
    verified()


def test_the_old_key_removed_without_a_rotation_fails_naming_the_pack(
    workdir: Path, two_points: tuple[Path, list[tuple[str, dict[str, tuple[object, ...]]]]]
) -> None:
    """The counter-test: dropping the old key is safe only because of the re-wrap."""
    _, points = two_points
    _, store = keystore(workdir, "east")
    old = store["current_master"]
    ok("rotate-keys", "--region", "east")
    # the keyring is lost: the packs' run keys are under the old key alone
    (region_dir(workdir, "east") / "vault" / "objects" / "keyring" / "00000001").unlink()
    drop_master_keys(workdir, "east", keep=keystore(workdir, "east")[1]["current_master"])
    result = run("restore", points[0][0], "--region", "east", "--target", workdir / "out")
    assert result.exit_code != 0
    assert "packs/" in result.stderr and "in no keyring" in result.stderr
    assert old in result.stderr
    rows = json.loads(run("verify", "--json", "--region", "east").stdout)
    assert not rows[0]["ok"]
    assert any("packs/" in e and "in no keyring" in e for e in rows[0]["errors"])


def test_verify_names_a_damaged_keyring(
    workdir: Path, two_points: tuple[Path, list[tuple[str, dict[str, tuple[object, ...]]]]]
) -> None:
    ok("rotate-keys", "--region", "east")
    path = region_dir(workdir, "east") / "vault" / "objects" / "keyring" / "00000001"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x01
    path.write_bytes(bytes(raw))
    rows = json.loads(run("verify", "--json", "--region", "east").stdout)
    assert not rows[0]["ok"]
    assert any(e.startswith("keyring/00000001") for e in rows[0]["errors"]), rows[0]["errors"]
    # a rotation refuses to build on a keyring it cannot read (its keys would be lost)
    result = run("rotate-keys", "--region", "east")
    assert result.exit_code == 1 and "keyring/00000001" in result.stderr
    assert "Traceback" not in result.stderr


def test_rotate_keys_of_a_region_without_a_repository_rotates_nothing(workdir: Path) -> None:
    _, before = (
        keystore(workdir, "east")
        if (region_dir(workdir, "east") / "keys").exists()
        else (
            None,
            None,
        )
    )
    result = run("rotate-keys", "--region", "east")
    assert result.exit_code == 1
    assert "nothing to re-wrap" in result.stderr and "Traceback" not in result.stderr
    if before is not None:
        assert keystore(workdir, "east")[1]["current_master"] == before["current_master"]


def test_a_process_that_opened_the_keystore_before_a_rotation_wraps_under_the_new_key(
    site: Site, site_file: Path, tmp_path: Path
) -> None:
    """A long-running process (a ``run`` daemon) whose KeyService read the keystore before
    another process ran rotate-keys wraps its next backup's run key under the new key, so
    the old one can still be removed."""
    east = site.region("east")
    repo = repo_for(east)
    data = make_data(tmp_path / "data", seed=1)
    repo.backup(capture(data))
    old = east.keys.key_id
    with open_site(site_file) as other:  # the administrator's process
        repo_for(other.region("east")).rotate_keys()
        new = other.region("east").keys.key_id
    assert new != old
    # another instance: its backup reads no parent's packs (whose keyring, under the new
    # key, would make the key service read the keystore again by the way)
    data = make_data(tmp_path / "other", seed=2, size=100_000)
    point = repo.backup(capture(data, Instance(id="i-other", name="other", region=east.name)))
    root = region_root(east)
    store = json.loads((root / "keys" / "keystore.json").read_text())
    kids = {
        local_kid(fmt.PackHeader.parse(p.name, p.read_bytes()).wrapped_key)
        for p in (root / "vault" / "objects" / "packs").rglob("*")
        if p.is_file()
    }
    assert kids == {old, new}
    store["master_keys"] = {new: store["master_keys"][new]}
    (root / "keys" / "keystore.json").write_text(json.dumps(store))
    with open_site(site_file) as later:
        fresh = repo_for(later.region("east"))
        out = tmp_path / "out"
        fresh.restore(point.id, out)
        assert snapshot(out) == snapshot(data)
        assert fresh.verify(read_data=True).ok
