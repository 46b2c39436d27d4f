"""``regionvault rotate-keys`` killed with SIGKILL after each of its steps (the new master
key made current, keyring N+1 written, the config rewritten before older keyrings go): the
repository stays valid (``verify --read-data`` passes, every point restores), and the same
command run again finishes the rotation without making another key; then the old key can
be removed and every point still restores. Also: a repository that format 3 code created
(the golden vault v3) is rotated and restores without its old key, and a format 3 reader
refuses a rotated repository's config with the usual message."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok
from regionvault.core import Site
from regionvault.core.errors import IntegrityError
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from repository_support import snapshot
from test_golden_vaults import assert_restores, assert_restores_disks, open_golden, rv
from test_rotate_keys import (
    drop_master_keys,
    keystore,
    last_line,
    make_data,
    sealed_kid,
    vault_files,
    verified,
)

GOLDEN_V3 = Path(__file__).parent / "golden" / "v3"

# ``regionvault ARGS`` that kills itself with SIGKILL the moment rotate-keys completes the
# step named first (Repository.rotate_keys's ``step``): no cleanup, no lock released
_KILLED_ROTATION = textwrap.dedent(
    """
    import os, signal, sys
    from regionvault.core.repository import _rotate
    at, args = sys.argv[1], sys.argv[2:]
    real = _rotate.rotate_keys

    def killing(store, **kwargs):
        def step(name):
            print("step", name, flush=True)
            if name == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(store, **{**kwargs, "step": step})

    _rotate.rotate_keys = killing
    from regionvault.core.cli import main
    main(args)
    """
)


def killed_rotation(workdir: Path, at: str) -> list[str]:
    """Run rotate-keys in a process killed after step ``at``; the steps it completed."""
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_ROTATION, at, "rotate-keys", "--region", "east"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, (child.stdout, child.stderr)
    steps = [line.split()[1] for line in child.stdout.splitlines() if line.startswith("step ")]
    assert steps[-1] == at
    return steps


def master_keys(workdir: Path) -> list[str]:
    return sorted(keystore(workdir, "east")[1]["master_keys"])


@pytest.mark.parametrize(
    ("rotations_before", "at"),
    # after the config of a first rotation, or the one delete of a later one, the rotation
    # is complete: a run again is a new rotation (the last assertion below shows one)
    [(0, "rotated"), (0, "keyring"), (1, "rotated"), (1, "keyring"), (1, "config")],
)  # fmt: skip
def test_a_rotation_killed_after_each_step_leaves_a_valid_repository_and_is_finished(
    workdir: Path, rotations_before: int, at: str
) -> None:
    data = make_data(workdir / "nf-data", seed=1)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    points = [(last_line(ok("backup", "nf1")), snapshot(data))]
    for n in range(rotations_before):
        ok("rotate-keys", "--region", "east")
        make_data(data, seed=10 + n, size=250_000)
        points.append((last_line(ok("backup", "nf1")), snapshot(data)))
    keys_before = master_keys(workdir)
    generation = rotations_before + 1

    old_key = keystore(workdir, "east")[1]["current_master"]
    steps = killed_rotation(workdir, at)
    assert steps[0] == "rotated"

    # whatever the moment, the repository is valid and every point restores
    rows = json.loads(ok("verify", "--json", "--read-data", "--region", "east").stdout)
    assert rows[0]["ok"], rows[0]["errors"]
    if at == "rotated":
        # the new key is current but no keyring holds the runs yet: verify says the old key
        # must stay enabled (the newest run, at least, is under it and in no keyring)
        assert rows[0]["warnings"], "verify does not say the old key is still needed"
        for warning in rows[0]["warnings"]:
            assert "in no keyring" in warning and old_key in warning, warning
    else:
        assert rows[0]["warnings"] == [], rows[0]["warnings"]
    for n, (point, tree) in enumerate(points):
        out = workdir / f"after-kill-{n}"
        ok("restore", point, "--region", "east", "--target", out)
        assert snapshot(out) == tree
    rotated_to = keystore(workdir, "east")[1]["current_master"]
    assert len(master_keys(workdir)) == len(keys_before) + 1

    report = json.loads(ok("rotate-keys", "--region", "east", "--json").stdout)

    # the run again finished the killed rotation: no third key, the key the kill left current
    assert report["resumed"] and report["new_key_id"] == rotated_to
    assert report["generation"] == generation
    assert len(master_keys(workdir)) == len(keys_before) + 1
    files = vault_files(workdir, "east")
    assert [n for n in files if n.startswith(fmt.KEYRING_PREFIX)] == [fmt.keyring_name(generation)]
    assert sealed_kid(files["config"], "config", fmt.ObjectKind.CONFIG) == rotated_to
    ring = fmt.keyring_name(generation)
    assert sealed_kid(files[ring], ring, fmt.ObjectKind.KEYRING) == rotated_to
    drop_master_keys(workdir, "east", keep=rotated_to)
    verified()
    for n, (point, tree) in enumerate(points):
        out = workdir / f"after-rerun-{n}"
        ok("restore", point, "--region", "east", "--target", out)
        assert snapshot(out) == tree
    # and a rotation after it is a new one
    again = json.loads(ok("rotate-keys", "--region", "east", "--json").stdout)
    assert not again["resumed"] and again["generation"] == generation + 1


def golden_keystore(root: Path, region: str) -> tuple[Path, dict[str, Any]]:
    path = root / "regions" / region / "keys" / "keystore.json"
    return path, json.loads(path.read_text())


def test_a_format_3_repository_is_rotated_and_restores_without_its_old_key(
    tmp_path: Path,
) -> None:
    golden = open_golden(GOLDEN_V3, tmp_path)
    for region in ("east", "west"):
        old = golden_keystore(golden.root, region)[1]["current_master"]
        report = json.loads(rv(golden, "rotate-keys", "--region", region, "--json").stdout)
        path, store = golden_keystore(golden.root, region)
        new = store["current_master"]
        assert report["old_key_id"] == old and report["new_key_id"] == new != old
        assert report["generation"] == 1 and report["runs"] >= 2
        store["master_keys"] = {new: store["master_keys"][new]}
        path.write_text(json.dumps(store))
    with Site.load(golden.site) as site:
        for name in ("local:east", "local:west"):
            region = site.region(name)
            repo = Repository.open(region.vault, region.keys, region=region.name)
            assert repo._store.config.version == fmt.FORMAT_VERSION_CONFIG == 4
    report = json.loads(rv(golden, "verify", "--read-data", "--json").stdout)
    assert all(row["ok"] and row["errors"] == [] and row["warnings"] == [] for row in report)
    for n, point in enumerate(golden.spec["points"]):
        target = tmp_path / f"restored-{n}"
        if "disks" in point:
            assert_restores_disks(golden, point["id"], point["region"], point["disks"], target)
        else:
            assert_restores(golden, point["id"], point["region"], point["tree"], target)


def test_a_format_3_reader_refuses_a_rotated_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_data(workdir / "nf-data", seed=1)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ok("backup", "nf1")
    ok("rotate-keys", "--region", "east")
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)  # what a reader of version 3 checks
    with Site.load(workdir / "site.toml") as site:
        east = site.region("east")
        with pytest.raises(IntegrityError) as caught:
            Repository.open(east.vault, east.keys, region=east.name)
    assert caught.value.object_name == "config"
    assert "format version 4 is newer than this regionvault reads (up to 3); upgrade" in str(
        caught.value
    )


def test_a_format_3_first_rotation_killed_after_its_new_key_is_finished(tmp_path: Path) -> None:
    """A config of format 1-3 names no key: it is re-wrapped (naming the current key) before
    the new key is made, so a run after a kill finishes that rotation instead of making a
    third key, and names the real old key (the one to disable)."""
    golden = open_golden(GOLDEN_V3, tmp_path)
    k1 = golden_keystore(golden.root, "east")[1]["current_master"]
    child = subprocess.run(
        [
            *(sys.executable, "-c", _KILLED_ROTATION, "rotated", "--site", str(golden.site)),
            *("rotate-keys", "--region", "east"),
        ],
        cwd=golden.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, (child.stdout, child.stderr)
    report = json.loads(rv(golden, "rotate-keys", "--region", "east", "--json").stdout)
    store = golden_keystore(golden.root, "east")[1]
    assert report["resumed"] and report["old_key_id"] == k1
    assert report["new_key_id"] == store["current_master"] != k1
    assert len(store["master_keys"]) == 2
