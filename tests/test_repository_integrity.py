"""Tampering and keys: a flipped bit anywhere is found by verify and by restore (naming the
object), nothing unverified is restored, and one region's keys cannot read another's."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from regionvault.core import IntegrityError, KeyAccessDenied, Region
from regionvault.core.repository import Repository
from regionvault.core.repository import _format as fmt
from repository_support import (
    capture,
    flip_bit,
    listing,
    object_path,
    repo_for,
    snapshot,
)


def make_source(root: Path) -> None:
    rng = random.Random(5)
    (root / "d").mkdir(parents=True)
    for i in range(6):
        (root / "d" / f"f{i}.bin").write_bytes(rng.randbytes(40_000 + i * 7_000))
    (root / "log.txt").write_text("".join(f"entry {i} {rng.random()}\n" for i in range(5000)))


def backed_up(east: Region, tmp_path: Path) -> tuple[Repository, str, Path]:
    src = tmp_path / "src"
    make_source(src)
    repo = repo_for(east)
    point = repo.backup(capture(src))
    assert repo.verify(read_data=True).ok
    return repo, point.id, src


def assert_nothing_unverified(out: Path, src: Path) -> None:
    """Every file under a restored name is exactly the source's; no temporary file is left."""
    if not out.exists():
        return
    assert not [p for p in out.rglob("*") if p.name.startswith(".rv-tmp-")]
    for p in out.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (src / p.relative_to(out)).read_bytes(), p


def pack_areas(path: Path) -> dict[str, int]:
    """Byte offsets inside a pack: its header, a blob, its blob table, its footer."""
    data = path.read_bytes()
    header = fmt.PackHeader.parse("pack", data)
    table_len, _ = fmt.PACK_FOOTER.unpack_from(data, len(data) - fmt.PACK_FOOTER.size)
    table_at = len(data) - fmt.PACK_FOOTER.size - table_len
    return {
        "header-salt": 30,
        "header-wrapped-key": header.size - 5,
        "blob": header.size + 100,
        "blob-tag": table_at - 3,
        "table": table_at + 10,
        "footer": len(data) - 6,
    }


@pytest.mark.parametrize(
    "area", ["header-salt", "header-wrapped-key", "blob", "blob-tag", "table", "footer"]
)
def test_flipped_bit_in_a_pack_is_found_by_verify(east: Region, tmp_path: Path, area: str) -> None:
    repo, _, _ = backed_up(east, tmp_path)
    name = listing(east, "packs/")[0]
    path = object_path(east, name)
    flip_bit(path, pack_areas(path)[area], bit=3)
    report = repo.verify(read_data=True)
    assert not report.ok
    assert {p.object for p in report.errors} == {name}, report.errors


@pytest.mark.parametrize("area", ["blob", "blob-tag"])
def test_flipped_bit_in_pack_data_stops_restore_before_any_bad_byte(
    east: Region, tmp_path: Path, area: str
) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    # damage the pack holding the last file's data, so earlier files restore first
    names = listing(east, "packs/")
    for name in names:
        path = object_path(east, name)
        flip_bit(path, pack_areas(path)[area], bit=5)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as caught:
        repo.restore(point_id, out)
    assert caught.value.object_name in names
    assert "failed authentication" in str(caught.value)
    assert_nothing_unverified(out, src)


def test_any_flipped_bit_in_packs_is_caught_by_restore_or_harmless(
    east: Region, tmp_path: Path
) -> None:
    """Flip bits at random offsets of every pack: a restore either fails naming the pack or
    (when the bit lies in bytes a restore never uses: the header copy kept in the index,
    the blob table) restores everything exactly; never anything else."""
    repo, point_id, src = backed_up(east, tmp_path)
    rng = random.Random(11)
    names = listing(east, "packs/")
    for trial in range(6):
        for name in names:
            path = object_path(east, name)
            original = path.read_bytes()
            flip_bit(path, rng.randrange(len(original)), bit=rng.randrange(8))
        out = tmp_path / f"out{trial}"
        try:
            repo.restore(point_id, out)
        except IntegrityError as exc:
            assert exc.object_name in names
            assert_nothing_unverified(out, src)
        else:
            assert snapshot(out) == snapshot(src)
        assert not repo.verify(read_data=True).ok
        # repair for the next trial
        for name in names:
            object_path(east, name).unlink()
        repo.forget([p.id for p in repo.points()])
        assert repo.prune().packs_deleted >= 0
        point_id = repo.backup(capture(src)).id
        names = listing(east, "packs/")


@pytest.mark.parametrize("offset", [0, 4, 10, 45, 75, -20, -1])
def test_flipped_bit_in_an_index_is_found(east: Region, tmp_path: Path, offset: int) -> None:
    repo, point_id, src = backed_up(east, tmp_path)
    names = listing(east, "index/")
    for name in names:
        flip_bit(object_path(east, name), offset)
    report = repo.verify()
    assert not report.ok
    assert set(names) <= {p.object for p in report.errors}
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as caught:
        repo.restore(point_id, out)
    assert caught.value.object_name in names
    assert_nothing_unverified(out, src)


@pytest.mark.parametrize("offset", [0, 4, 5, 10, 45, 75, -20, -1])
def test_flipped_bit_in_a_manifest_is_found(east: Region, tmp_path: Path, offset: int) -> None:
    repo, point_id, _ = backed_up(east, tmp_path)
    name = fmt.point_name(point_id)
    flip_bit(object_path(east, name), offset)
    report = repo.verify()
    assert [p.object for p in report.errors] == [name]
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as caught:
        repo.restore(point_id, out)
    assert caught.value.object_name == name
    assert not out.exists()
    with pytest.raises(IntegrityError, match=name):
        repo.points()


@pytest.mark.parametrize("offset", [0, 4, 5, 10, 45, 75, 100, -20, -1])
def test_flipped_bit_in_the_config_is_found(east: Region, tmp_path: Path, offset: int) -> None:
    repo, _, _ = backed_up(east, tmp_path)
    flip_bit(object_path(east, "config"), offset)
    report = repo.verify()
    assert [p.object for p in report.errors] == ["config"]
    # a flip in the wrapped key looks like a foreign key to the KeyService
    with pytest.raises((IntegrityError, KeyAccessDenied), match="config"):
        Repository.open(east.vault, east.keys, region=east.name)


def test_a_newer_format_version_is_refused_by_name(east: Region, tmp_path: Path) -> None:
    repo, point_id, _ = backed_up(east, tmp_path)
    name = fmt.point_name(point_id)
    path = object_path(east, name)
    data = bytearray(path.read_bytes())
    data[4] = fmt.FORMAT_VERSION + 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=rf"format version {fmt.FORMAT_VERSION + 1} is newer.*upgrade"
    ):
        repo.load_manifest(point_id)


def test_another_regions_keys_cannot_read_a_point(
    east: Region, west: Region, tmp_path: Path
) -> None:
    repo, _, _ = backed_up(east, tmp_path)
    # west's KeyService on east's vault
    with pytest.raises(KeyAccessDenied, match="config"):
        Repository.open(east.vault, west.keys, region=east.name)
    # east's whole vault copied into west's, opened with west's keys, then with east's
    west.vault.vault_id  # noqa: B018 (creates west's vault and its id)
    west_objects = object_path(west, "")
    shutil.rmtree(west_objects, ignore_errors=True)
    shutil.copytree(object_path(east, ""), west_objects)
    with pytest.raises(KeyAccessDenied, match="config"):
        Repository.open(west.vault, west.keys, region=west.name)
    with pytest.raises(KeyAccessDenied, match="config"):
        Repository.open(west.vault, east.keys, region=west.name)
    # the data keys in east's packs do not unwrap with west's KeyService either
    pack = object_path(east, listing(east, "packs/")[0]).read_bytes()
    header = fmt.PackHeader.parse("pack", pack)
    context = repo._store.data_key_context(header.run_id)
    assert east.keys.unwrap(header.wrapped_key, context)
    with pytest.raises(KeyAccessDenied):
        west.keys.unwrap(header.wrapped_key, context)


def test_vault_holds_no_plaintext(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "secret-dir").mkdir(parents=True)
    (src / "secret-dir" / "password-file-name.txt").write_text("hunter2 " * 5000)
    repo = repo_for(east)
    repo.backup(capture(src), policy="very-secret-policy")
    for info in east.vault.list(""):
        data = object_path(east, info.name).read_bytes()
        for needle in (b"hunter2", b"password-file-name", b"secret-dir", b"very-secret-policy",
                       b"test-nf", b"i-test"):  # fmt: skip
            assert needle not in data, (info.name, needle)


def test_a_wrong_key_fails_on_the_commitment_not_on_garbage() -> None:
    import os

    from regionvault.core.repository import _crypto

    sealed = _crypto.seal(
        vault_id="v-1", kind=fmt.ObjectKind.MANIFEST, name="points/x", body=b"{}" * 100,
        secret=os.urandom(32),
    )  # fmt: skip
    header = fmt.EnvelopeHeader.parse("points/x", sealed, fmt.ObjectKind.MANIFEST)
    with pytest.raises(IntegrityError, match="key commitment does not match"):
        _crypto.open_sealed(
            vault_id="v-1", name="points/x", data=sealed, header=header, secret=os.urandom(32)
        )


def test_objects_are_bound_to_their_name(east: Region, tmp_path: Path) -> None:
    """A manifest (or index) moved to another name does not authenticate there."""
    repo, point_id, _ = backed_up(east, tmp_path)
    other = "f" * 32
    data = object_path(east, fmt.point_name(point_id)).read_bytes()
    east.vault.put(fmt.point_name(other), data)
    with pytest.raises(IntegrityError, match=f"points/{other}: authentication failed"):
        repo.load_manifest(other)


class CountingKeys:
    """Wraps a KeyService and counts the calls that reach it."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name in ("generate_data_key", "unwrap", "unseal", "seal"):

            def counted(*args: object, **kwargs: object) -> object:
                self.calls.append(name)
                return attr(*args, **kwargs)

            return counted
        return attr


def test_a_handful_of_key_service_calls_per_point(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    keys = CountingKeys(east.keys)
    repo = Repository.init_or_open(
        east.vault, keys, region=east.name,  # type: ignore[arg-type]
        settings=repo_for(east).settings,
    )  # fmt: skip
    keys.calls.clear()
    point = repo.backup(capture(src))
    assert len(listing(east, "packs/")) >= 2
    manifest = repo.load_manifest(point.id)
    assert manifest.stats["chunks"] > 20  # (chunk boundaries depend on the random seed)
    assert keys.calls == ["generate_data_key"]  # one data key for the whole run
    keys.calls.clear()
    repo.restore(point.id, tmp_path / "out")
    assert keys.calls == ["unwrap"]  # one unwrap for all the run's packs
    keys.calls.clear()
    repo.backup(capture(src))
    assert len(keys.calls) <= 2


def test_a_damaged_index_costs_dedup_not_backups(east: Region, tmp_path: Path) -> None:
    repo, point_id, _ = backed_up(east, tmp_path)
    damaged = listing(east, "index/")
    for name in damaged:
        flip_bit(object_path(east, name), -5)
    newer = tmp_path / "newer"
    make_source(newer)  # the same data: with the index unreadable it is stored again
    point = repo.backup(capture(newer))
    out = tmp_path / "out"
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(newer)
    with pytest.raises(IntegrityError) as caught:
        repo.restore(point_id, tmp_path / "old")
    assert caught.value.object_name in damaged
    with pytest.raises(IntegrityError, match="authentication failed"):
        repo.prune()  # refuses to run on a damaged index
    assert {p.object for p in repo.verify().errors} >= set(damaged)
