"""Every golden vault under tests/golden/ (the local-provider state an older commit wrote,
made by scripts/make-golden-vault) is read, verified and restored byte-exact by today's
code, and today's code backs up and copies into it.

golden.json names the points and, for each, the tree it must restore: every path with its
type, permission bits, mtime (ns), size and SHA-256, symlink target, hard-link partner, and
from format version 2 on its owner and xattrs. From format version 3 on it also names a
block image of two disks (``images``: each disk's place, size and SHA-256) and the points
holding it, and each point's own format version (a point that records no disks stays of
version 2). From format version 4 on, ``rotation`` says how east's key was rotated
(rotate-keys after the copies, then a third point under the new key): its keyring is checked,
and the vault restores with the old key gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from regionvault.core import BlockCapture, Instance, Site
from regionvault.core.cli import cli
from regionvault.core.repository import FORMAT_VERSION, Repository, _keyring
from regionvault.core.types import Disk
from site_support import site_toml

GOLDEN = Path(__file__).parent / "golden"
VAULTS = sorted(p for p in GOLDEN.iterdir() if (p / "golden.json").is_file())

#: the site a golden vault is opened with: its regions' roots are the copied directories
SITE_TOML = site_toml({"local:east": "regions/east", "local:west": "regions/west"}, name="golden")


@dataclass(frozen=True)
class Golden:
    root: Path
    site: Path
    spec: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.spec["format_version"])

    def tree(self, name: str) -> list[dict[str, Any]]:
        return list(self.spec["trees"][name])

    @property
    def block_points(self) -> list[dict[str, Any]]:
        return [p for p in self.spec["points"] if "disks" in p]

    def disks(self, name: str) -> list[dict[str, Any]]:
        return list(self.spec["images"][name]["disks"])


def test_every_format_version_written_has_a_golden_vault() -> None:
    versions = {json.loads((p / "golden.json").read_text())["format_version"] for p in VAULTS}
    missing = sorted(set(range(1, FORMAT_VERSION + 1)) - versions)
    assert not missing, (
        f"no golden vault of format version {missing} under {GOLDEN}: make it with the code "
        f"that writes it, `./scripts/make-golden-vault COMMIT tests/golden/v{missing[-1]}`, "
        "and commit it (tests/golden/README.md)"
    )


#: the golden vaults holding a block image of several disks (format version 3 on)
DISK_VAULTS = [p for p in VAULTS if "images" in json.loads((p / "golden.json").read_text())]


@pytest.fixture(params=VAULTS, ids=[p.name for p in VAULTS])
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> Golden:
    """A copy of one golden vault (the committed one is never written), opened by a
    site.toml next to it."""
    return open_golden(request.param, tmp_path)


@pytest.fixture(params=DISK_VAULTS, ids=[p.name for p in DISK_VAULTS])
def golden_disks(request: pytest.FixtureRequest, tmp_path: Path) -> Golden:
    """A copy of one golden vault that holds a block image of several disks."""
    return open_golden(request.param, tmp_path)


def open_golden(source: Path, tmp_path: Path) -> Golden:
    root = tmp_path / "golden"
    shutil.copytree(source, root, symlinks=True)
    for keystore in root.glob("regions/*/keys/keystore.json"):
        keystore.chmod(0o600)  # as the local provider makes it (git keeps no such mode)
    site = root / "site.toml"
    site.write_text(SITE_TOML)
    return Golden(root, site, json.loads((source / "golden.json").read_text()))


def rv(golden: Golden, *args: str | Path) -> Result:
    result = CliRunner().invoke(
        cli, ["--site", str(golden.site), *map(str, args)], catch_exceptions=False
    )
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result


def describe(root: Path, *, owners_and_xattrs: bool) -> list[dict[str, Any]]:
    """The tree below ``root`` in golden.json's form (see scripts/make-golden-vault)."""
    found = [Path(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]
    inodes: dict[tuple[int, int], str] = {}
    out: list[dict[str, Any]] = []
    for path in sorted(found, key=os.fsencode):
        st = path.lstat()
        rel = str(path.relative_to(root))
        entry: dict[str, Any] = {
            "path": rel,
            "type": file_type(st.st_mode),
            "mode": stat.S_IMODE(st.st_mode),
            "mtime_ns": st.st_mtime_ns,
        }
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    entry["hardlink_to"] = first
        elif stat.S_ISLNK(st.st_mode):
            # as stored: Path.readlink would normalise it ("./x" -> "x")
            entry["target"] = os.readlink(path)  # noqa: PTH115
        if owners_and_xattrs:
            entry["uid"], entry["gid"] = st.st_uid, st.st_gid
            names = sorted(os.listxattr(path, follow_symlinks=False))
            if names:
                entry["xattrs"] = {
                    n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names
                }
        out.append(entry)
    return out


def file_type(mode: int) -> str:
    kinds = {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
        stat.S_IFCHR: "chardev",
        stat.S_IFBLK: "blockdev",
    }
    return kinds[stat.S_IFMT(mode)]


def comparable(tree: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tree`` without what a restore can only give back as root: owners."""
    if os.geteuid() == 0:
        return tree
    return [{k: v for k, v in e.items() if k not in ("uid", "gid")} for e in tree]


def assert_restores(golden: Golden, point: str, region: str, tree: str, target: Path) -> None:
    rv(golden, "restore", point, "--region", region, "--target", target)
    restored = describe(target, owners_and_xattrs=golden.version >= 2)
    assert comparable(restored) == comparable(golden.tree(tree)), f"{point} in {region}"


def points_by_id(golden: Golden) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in json.loads(rv(golden, "points", "--json").stdout)}


def test_verify_reads_every_byte(golden: Golden) -> None:
    report = json.loads(rv(golden, "verify", "--read-data", "--json").stdout)
    expected_points = {r: 0 for r in golden.spec["regions"]}
    for p in golden.spec["points"]:
        expected_points[p["region"]] += 1
    assert {r["region"]: r["points"] for r in report} == expected_points
    for row in report:
        assert row["ok"] and row["errors"] == [] and row["warnings"] == [], row
        assert row["read_data"] and row["bytes_read"] > 0


def test_its_points_are_of_the_format_version_it_stands_for(golden: Golden) -> None:
    """golden.json's ``format_version`` is what the vault's manifests say, so the check that
    every version has a golden vault cannot be met by a mislabelled one."""
    with Site.load(golden.site) as site:
        for point in golden.spec["points"]:
            region = site.region(point["region"])
            repo = Repository.init_or_open(region.vault, region.keys, region=region.name)
            expected = point.get("format_version", golden.version)
            assert repo.load_manifest(point["id"]).format_version == expected, point
    listed = {p.get("format_version", golden.version) for p in golden.spec["points"]}
    if golden.version < 4:
        assert max(listed) == golden.version
    else:
        # version 4 changed the config (and added keyrings), not the manifests: the config of
        # every region says the version
        assert max(listed) == 3
        with Site.load(golden.site) as site:
            for name in golden.spec["regions"]:
                region = site.region(name)
                repo = Repository.open(region.vault, region.keys, region=region.name)
                assert repo._ensure_open().read_config().version == golden.version, name


def test_points_are_listed_with_their_lineage(golden: Golden) -> None:
    listed = points_by_id(golden)
    assert {i: p["region"] for i, p in listed.items()} == {
        p["id"]: p["region"] for p in golden.spec["points"]
    }
    by_id = {p["id"]: p for p in golden.spec["points"]}
    for point in golden.spec["points"]:
        source = by_id.get(point.get("copy_of", ""))
        lineage = (
            None
            if source is None
            else {"source_region": source["region"], "source_recovery_point": source["id"]}
        )
        assert listed[point["id"]]["lineage"] == lineage, point


def assert_restores_disks(
    golden: Golden, point: str, region: str, image: str, target: Path
) -> None:
    """A point of several disks restores into ``target`` as one raw image file per disk,
    in order, each of its size and SHA-256."""
    rv(golden, "restore", point, "--region", region, "--target", target)
    disks = golden.disks(image)
    names = [f"disk{n}-{disk['name']}.img" for n, disk in enumerate(disks)]
    assert sorted(f.name for f in target.iterdir()) == sorted(names), f"{point} in {region}"
    for name, disk in zip(names, disks, strict=True):
        data = (target / name).read_bytes()
        assert len(data) == disk["size"], name
        assert hashlib.sha256(data).hexdigest() == disk["sha256"], f"{name} of {point}"


def test_every_point_restores_byte_exact(golden: Golden, tmp_path: Path) -> None:
    for n, point in enumerate(golden.spec["points"]):
        target = tmp_path / f"restored-{n}"
        if "disks" in point:
            assert_restores_disks(golden, point["id"], point["region"], point["disks"], target)
        else:
            assert_restores(golden, point["id"], point["region"], point["tree"], target)


def test_todays_code_backs_up_and_copies_into_an_old_vault(golden: Golden, tmp_path: Path) -> None:
    # the instance's data: the newest old point as restored, and one file more
    newest = golden.spec["points"][1]
    data = tmp_path / "data"
    assert_restores(golden, newest["id"], newest["region"], newest["tree"], data)
    (data / "written-today.txt").write_bytes(b"a point of today's format\n")
    expected = describe(data, owners_and_xattrs=golden.version >= 2)

    instance = rv(golden, "instances", "add", "-r", "local:east", "-n", "today", "--data", data)
    point = rv(golden, "backup", instance.stdout.splitlines()[-1]).stdout.splitlines()[-1]
    copy = rv(golden, "copy", point, "--to", "local:west").stdout.splitlines()[-1]

    listed = points_by_id(golden)
    assert set(listed) == {p["id"] for p in golden.spec["points"]} | {point, copy}
    report = json.loads(rv(golden, "verify", "--read-data", "--json").stdout)
    assert all(row["ok"] and row["errors"] == [] for row in report), report

    restored = tmp_path / "restored-copy"
    rv(golden, "restore", copy, "--region", "local:west", "--target", restored)
    assert comparable(describe(restored, owners_and_xattrs=golden.version >= 2)) == comparable(
        expected
    )
    # the old points are untouched by the new ones
    first = golden.spec["points"][0]
    assert_restores(golden, first["id"], first["region"], first["tree"], tmp_path / "old-first")


class GoldenDisks(BlockCapture):
    """The disks a golden vault's block point restored, one file each, changed a little:
    today's capture of the same VM."""

    def __init__(self, files: list[Path], disks: list[dict[str, Any]]) -> None:
        layout = [Disk(d["name"], d["offset"], d["size"]) for d in disks]
        size = layout[-1].end
        super().__init__(
            Instance("vm-golden-disks", "golden-disks", "aws:golden"),
            datetime.now(UTC),
            size=size,
            block_size=4096,
            disks=layout,
        )
        self.image = bytearray(size)
        for f, disk in zip(files, layout, strict=True):
            self.image[disk.offset : disk.end] = f.read_bytes()
        self.image[4096:4104] = b"today!!!"

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        for offset in range(0, self.size, 64 << 10):
            piece = bytes(self.image[offset : offset + (64 << 10)])
            if any(piece):
                yield offset, piece


def test_todays_code_backs_up_an_image_of_several_disks_into_an_old_vault(
    golden_disks: Golden, tmp_path: Path
) -> None:
    golden = golden_disks
    old = golden.block_points[0]
    restored = tmp_path / "old-image"
    assert_restores_disks(golden, old["id"], old["region"], old["disks"], restored)
    disks = golden.disks(old["disks"])
    files = [restored / f"disk{n}-{disk['name']}.img" for n, disk in enumerate(disks)]
    capture = GoldenDisks(files, disks)
    with Site.load(golden.site) as site:
        region = site.region(old["region"])
        repo = Repository.init_or_open(region.vault, region.keys, region=region.name)
        point = repo.backup(capture).id
        assert repo.load_manifest(point).format_version == 3
    copy = rv(golden, "copy", point, "--to", "local:west").stdout.splitlines()[-1]
    report = json.loads(rv(golden, "verify", "--read-data", "--json").stdout)
    assert all(row["ok"] and row["errors"] == [] for row in report), report
    target = tmp_path / "today"
    rv(golden, "restore", copy, "--region", "local:west", "--target", target)
    for n, disk in enumerate(capture.disks):
        f = target / f"disk{n}-{disk.name}.img"
        assert f.read_bytes() == bytes(capture.image[disk.offset : disk.end]), f
    assert_restores_disks(golden, old["id"], old["region"], old["disks"], tmp_path / "again")


#: the golden vaults whose east key was rotated by rotate-keys (format version 4 on)
ROTATED_VAULTS = [p for p in VAULTS if "rotation" in json.loads((p / "golden.json").read_text())]


@pytest.mark.parametrize("source", ROTATED_VAULTS, ids=[p.name for p in ROTATED_VAULTS])
def test_a_rotated_vault_holds_its_keyring_and_restores_without_the_old_key(
    source: Path, tmp_path: Path
) -> None:
    """golden.json's ``rotation``: the keyring of that generation is the only one, made
    under the new key and holding every run key of the points before the rotation; the
    config names the new key; with the old key gone from the keystore (as an operator
    disables it) verify passes without a warning and every point restores."""
    golden = open_golden(source, tmp_path)
    rotation = golden.spec["rotation"]
    with Site.load(golden.site) as site:
        region = site.region(rotation["region"])
        assert _keyring.generations(region.vault) == [rotation["generation"]]
        repo = Repository.open(region.vault, region.keys, region=region.name)
        ring = _keyring.read_keyring(
            region.vault, region.keys, repo.repository_id, rotation["generation"]
        )
        assert ring.key_id == rotation["new_key_id"] == region.keys.key_id
        assert len(ring.runs) == rotation["runs"] > 0
        assert repo._ensure_open().read_config().key_id == rotation["new_key_id"]
    keystore = golden.root / golden.spec["regions"][rotation["region"]] / "keys" / "keystore.json"
    store = json.loads(keystore.read_text())
    assert set(store["master_keys"]) == {rotation["old_key_id"], rotation["new_key_id"]}
    del store["master_keys"][rotation["old_key_id"]]
    keystore.write_text(json.dumps(store))
    report = json.loads(rv(golden, "verify", "--read-data", "--json").stdout)
    assert all(row["ok"] and row["errors"] == [] and row["warnings"] == [] for row in report)
    for n, point in enumerate(golden.spec["points"]):
        target = tmp_path / f"restored-{n}"
        if "disks" in point:
            assert_restores_disks(golden, point["id"], point["region"], point["disks"], target)
        else:
            assert_restores(golden, point["id"], point["region"], point["tree"], target)
