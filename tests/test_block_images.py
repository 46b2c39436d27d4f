"""Block images of several disks (docs/interfaces.md, "Capture kinds and image formats";
docs/format.md, version 3): the layout rules, the default ``BlockCapture.read_ranges``, the
manifest that records the disks (format version 3 only then), copy, verify and restore of
such a point (into a sink holding its disks, or a directory of one file per disk), and the
one error a region gets for a point of a kind its compute cannot launch."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cli_support import run
from regionvault.core import BlockCapture, Instance, Region, Site
from regionvault.core.errors import (
    ComputeError,
    IntegrityError,
    RegionVaultError,
    UnlaunchableKind,
)
from regionvault.core.pipeline import Engine
from regionvault.core.repository import Repository, _disks
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._restore_blocks import DiskFilesSink
from regionvault.core.repository.copy.offer import CopyOffer, make_offer
from regionvault.core.types import CaptureKind, Disk, LaunchSpec, disk_layout, split_by_disk
from repository_support import SMALL, MemorySink, repo_for

KiB = 1024
BS = 4096

#: a VM's instance (it ran in another cloud: the points are made in local regions)
VM = Instance(id="i-0disks", name="vm-three-disks", region="aws:us-east-1")

#: three disks: the OS disk, a gap (alignment), then two data disks back to back
DISKS = (
    Disk("os", 0, 256 * KiB),
    Disk("lun0", 512 * KiB, 192 * KiB),
    Disk("/dev/xvdc", 704 * KiB, 64 * KiB),
)
IMAGE_SIZE = 1024 * KiB  # a hole after the last disk too


class DisksCapture(BlockCapture):
    """An image given as ``{offset: bytes}`` holding ``disks``."""

    def __init__(
        self,
        blocks: Mapping[int, bytes],
        *,
        disks: Sequence[Disk] | None = DISKS,
        size: int = IMAGE_SIZE,
        instance: Instance = VM,
    ) -> None:
        super().__init__(instance, datetime.now(UTC), size=size, block_size=BS, disks=disks)
        self._blocks = dict(blocks)

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        for offset in sorted(self._blocks):
            data = self._blocks[offset]
            for i in range(0, len(data), 3 * BS):  # uneven pieces, as a device reader gives
                yield offset + i, data[i : i + 3 * BS]

    def image(self) -> bytes:
        out = bytearray(self.size)
        for offset, data in self._blocks.items():
            out[offset : offset + len(data)] = data
        return bytes(out)


def three_disk_blocks(seed: int = 15) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {
        0: rng.randbytes(100 * KiB),  # boot sector and more
        200 * KiB: rng.randbytes(56 * KiB),  # up to the OS disk's end
        512 * KiB: b"lun0 starts here " * 400,
        # one run across the boundary of lun0 and /dev/xvdc: a restore splits it
        688 * KiB: rng.randbytes(32 * KiB),
        760 * KiB: rng.randbytes(8 * KiB),  # the last disk's last blocks
    }


def disk_bytes(image: bytes, disk: Disk) -> bytes:
    return image[disk.offset : disk.end]


def manifest_doc(repo: Repository, point_id: str) -> dict[str, Any]:
    """The manifest as stored (decrypted, not interpreted)."""
    store = repo._ensure_open()
    body = store.get_sealed(fmt.ObjectKind.MANIFEST, fmt.point_name(point_id))
    doc: dict[str, Any] = json.loads(body)
    return doc


class DiskSink(MemorySink):
    """A memory sink that makes the disks it is asked for."""

    def __init__(self, size: int, disks: Sequence[Disk] | None) -> None:
        super().__init__(size, BS)
        self.disks = disk_layout(disks, size, BS)


# --------------------------------------------------------------------------- the layout


def test_no_disks_means_one_disk_that_is_the_whole_image() -> None:
    assert disk_layout(None, 8192, BS) == (Disk("disk", 0, 8192),)
    assert disk_layout(DISKS, IMAGE_SIZE, BS) == DISKS
    # a disk need not end on a block boundary; only where it starts matters
    assert disk_layout([Disk("a", 0, 100), Disk("b", BS, 1)], 2 * BS, BS)[1].end == BS + 1


@pytest.mark.parametrize(
    ("disks", "message"),
    [
        ([], "at least one disk"),
        ([Disk("a", 0, BS), Disk("b", BS + 512, BS)], r"'b' starts at 4608, not a multiple"),
        ([Disk("a", 0, 2 * BS), Disk("b", BS, BS)], r"'b' at 4096 overlaps"),
        ([Disk("a", BS, BS), Disk("b", 0, BS)], r"'b' at 0 overlaps"),  # not ascending
        ([Disk("a", 0, BS), Disk("b", BS, 4 * BS)], r"'b' ends at 20480, past the 16384"),
    ],
)
def test_a_layout_that_cannot_be_is_refused_naming_the_disk(
    disks: list[Disk], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        disk_layout(disks, 4 * BS, BS)


def test_a_disk_has_a_size() -> None:
    with pytest.raises(ValueError, match="'x': offset 0, size 0"):
        Disk("x", 0, 0)


def test_what_lies_off_the_disks_is_found() -> None:
    assert _disks.off_disks(DISKS, 0, 256 * KiB) is None
    assert _disks.off_disks(DISKS, 688 * KiB, 32 * KiB) is None  # across two adjacent disks
    assert _disks.off_disks(DISKS, 250 * KiB, 8 * KiB) == 256 * KiB  # into the gap
    assert _disks.off_disks(DISKS, 300 * KiB, 4 * KiB) == 300 * KiB
    assert _disks.off_disks(DISKS, 764 * KiB, 8 * KiB) == 768 * KiB  # past the last


def test_disk_file_names_keep_the_order_and_are_safe() -> None:
    assert _disks.disk_file_names(DISKS) == ["disk0-os.img", "disk1-lun0.img", "disk2-dev-xvdc.img"]
    assert _disks.disk_file_names([Disk("../..", 0, 1)]) == ["disk0.img"]


# --------------------------------------------------------------------------- read_ranges


def reference_ranges(
    blocks: list[tuple[int, bytes]], spans: list[tuple[int, int]]
) -> list[tuple[int, bytes]]:
    """What ``read_ranges`` must give, byte by byte: the written bytes inside the spans, as
    maximal runs within each (block, span) pair."""
    out = []
    for offset, data in blocks:
        for start, length in spans:
            lo, hi = max(offset, start), min(offset + len(data), start + length)
            if lo < hi:
                out.append((lo, data[lo - offset : hi - offset]))
    return out


def random_spans(rng: random.Random, size: int) -> list[tuple[int, int]]:
    points = sorted(rng.sample(range(0, size // BS + 1), rng.randrange(0, 9) * 2))
    return [
        (points[i] * BS, (points[i + 1] - points[i]) * BS)
        for i in range(0, len(points), 2)
        if points[i + 1] > points[i]
    ]


def test_the_default_read_ranges_gives_the_written_data_within_the_spans() -> None:
    rng = random.Random(1515)
    for _ in range(200):  # bounded: 200 random images and span sets
        blocks: dict[int, bytes] = {}
        pos = 0
        while pos < 60 * BS:
            pos += rng.randrange(0, 6) * BS
            n = rng.randrange(1, 5) * BS + rng.choice((0, 0, 100))
            blocks[pos] = rng.randbytes(n)
            pos += n + BS
        capture = DisksCapture(blocks, disks=None, size=pos + BS)
        spans = random_spans(rng, pos)
        got = list(capture.read_ranges(spans))
        assert got == reference_ranges(list(capture.blocks()), spans)
        # ascending, inside the spans
        assert all(a[0] + len(a[1]) <= b[0] for a, b in itertools.pairwise(got))


def test_read_ranges_stops_reading_after_the_last_span() -> None:
    read: list[int] = []

    class Counting(DisksCapture):
        def blocks(self) -> Iterator[tuple[int, bytes]]:
            for offset, data in super().blocks():
                read.append(offset)
                yield offset, data

    capture = Counting({0: bytes(range(256)) * 16 * 40}, disks=None, size=IMAGE_SIZE)
    assert list(capture.read_ranges([(BS, BS)])) == [(BS, (bytes(range(256)) * 16))]
    assert len(read) == 1  # the first 3-block piece held the span: nothing more was read
    assert list(capture.read_ranges([])) == []


# --------------------------------------------------------------------------- the manifest


def test_a_point_of_several_disks_records_them_in_a_version_3_manifest(east: Region) -> None:
    repo = repo_for(east)
    capture = DisksCapture(three_disk_blocks())
    point = repo.backup(capture)
    manifest = repo.load_manifest(point.id)
    assert manifest.format_version == 3
    assert manifest.disks == DISKS
    doc = manifest_doc(repo, point.id)
    assert doc["format"] == 3
    assert doc["image"] == {
        "size": IMAGE_SIZE,
        "block_size": BS,
        "disks": [
            {"name": "os", "offset": 0, "size": 256 * KiB},
            {"name": "lun0", "offset": 512 * KiB, "size": 192 * KiB},
            {"name": "/dev/xvdc", "offset": 704 * KiB, "size": 64 * KiB},
        ],
    }
    sink = DiskSink(IMAGE_SIZE, manifest.disks)
    repo.restore(point.id, sink)
    assert bytes(sink.data) == capture.image()


def test_a_point_of_one_disk_is_written_as_version_2_wrote_it(east: Region) -> None:
    repo = repo_for(east)
    whole = repo.backup(DisksCapture({0: b"x" * BS}, disks=None))
    named = repo.backup(DisksCapture({0: b"x" * BS}, disks=[Disk("os", 0, IMAGE_SIZE)]))
    for point in (whole, named):
        doc = manifest_doc(repo, point.id)
        assert doc["format"] == 2
        assert doc["image"] == {"size": IMAGE_SIZE, "block_size": BS}  # no "disks" key
        assert repo.load_manifest(point.id).disks == (Disk("disk", 0, IMAGE_SIZE),)
    # a file tree's manifest is version 2's too (the config is version 4's: key rotation)
    assert repo._ensure_open().config.version == fmt.FORMAT_VERSION_CONFIG == 4


def test_a_reader_of_version_2_refuses_a_point_of_several_disks_and_reads_the_rest(
    east: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = repo_for(east)
    several = repo.backup(DisksCapture(three_disk_blocks()))
    one = repo.backup(DisksCapture({0: b"y" * BS}, disks=None))
    offer = make_offer(repo._ensure_open(), repo.load_manifest(several.id)).encode()
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)  # what a reader of version 2 checks
    with pytest.raises(IntegrityError, match=r"format version 3 is newer.*upgrade"):
        repo.load_manifest(several.id)
    with pytest.raises(IntegrityError, match=r"format version 3 is newer.*upgrade"):
        CopyOffer.decode("offer", offer)
    assert repo.load_manifest(one.id).format_version == 2
    # a repository created since format 4 (which may hold keyrings) it does not open at all
    with pytest.raises(IntegrityError, match=r"config: format version 4 is newer.*upgrade"):
        Repository.open(east.vault, east.keys, region=east.name)


def test_disks_recorded_by_a_version_2_manifest_are_refused(east: Region) -> None:
    with pytest.raises(ValueError, match="by format version 2"):
        _disks.decode_disks(_disks.encode_disks(DISKS), version=2, size=IMAGE_SIZE, block_size=BS)
    with pytest.raises(ValueError, match="past the"):
        _disks.decode_disks(_disks.encode_disks(DISKS), version=3, size=512 * KiB, block_size=BS)


# --------------------------------------------------------------------------- backup, verify


def test_a_capture_with_data_between_its_disks_is_refused(east: Region) -> None:
    repo = repo_for(east)
    with pytest.raises(ComputeError, match=r"i-0disks.*data at 262144, which lies on none"):
        repo.backup(DisksCapture({252 * KiB: b"z" * (8 * KiB)}))
    assert repo.points() == []


def test_verify_and_restore_refuse_an_extent_off_the_disks(
    east: Region, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A point whose tree puts data in the hole between disks (as a damaged or forged
    point could: backup refuses to write one) is reported by verify and never restored."""
    from regionvault.core.repository import _backup

    repo = repo_for(east)
    good = repo.backup(DisksCapture(three_disk_blocks()))
    assert repo.verify(read_data=True).ok
    monkeypatch.setattr(_backup, "off_disks", lambda *args: None)
    bad = repo.backup(DisksCapture({300 * KiB: b"q" * BS}))
    report = repo.verify()
    assert [(p.object, p.message) for p in report.errors] == [
        (fmt.point_name(bad.id), f"extent at {300 * KiB} holds data at {300 * KiB}, on none "
         "of the image's disks"),
    ]  # fmt: skip
    with pytest.raises(IntegrityError, match="on none of the image's disks"):
        repo.restore(bad.id, DiskSink(IMAGE_SIZE, DISKS))
    with pytest.raises(IntegrityError, match="on none of the image's disks"):
        repo.restore(bad.id, tmp_path / "out" / "disks")
    assert list((tmp_path / "out").iterdir()) == []  # no staging left behind
    repo.restore(good.id, DiskSink(IMAGE_SIZE, DISKS))


# --------------------------------------------------------------------------- restore


def test_a_point_of_several_disks_restores_into_a_directory_of_one_file_per_disk(
    east: Region, tmp_path: Path
) -> None:
    repo = repo_for(east)
    capture = DisksCapture(three_disk_blocks())
    point = repo.backup(capture)
    target = tmp_path / "out" / "restored"
    report = repo.restore(point.id, target)
    assert report.bytes == IMAGE_SIZE
    files = sorted(target.iterdir())
    assert [f.name for f in files] == ["disk0-os.img", "disk1-lun0.img", "disk2-dev-xvdc.img"]
    image = capture.image()
    for f, disk in zip(files, DISKS, strict=True):
        assert f.read_bytes() == disk_bytes(image, disk), f.name
    # the OS disk's hole (100 KiB to 200 KiB) stays a hole
    assert files[0].stat().st_blocks * 512 < 200 * KiB
    assert [p.name for p in target.parent.iterdir()] == ["restored"]  # staging renamed away


def test_a_restore_of_several_disks_into_an_empty_directory_and_not_into_a_full_one(
    east: Region, tmp_path: Path
) -> None:
    repo = repo_for(east)
    point = repo.backup(DisksCapture(three_disk_blocks()))
    empty = tmp_path / "out" / "empty"
    empty.mkdir(parents=True)
    repo.restore(point.id, empty)
    assert len(list(empty.iterdir())) == 3
    with pytest.raises(RegionVaultError, match=r"is not a new or empty directory: an image of 3"):
        repo.restore(point.id, empty)
    assert len(list(empty.parent.iterdir())) == 1


def test_a_sink_without_the_image_s_disks_is_refused(east: Region) -> None:
    repo = repo_for(east)
    point = repo.backup(DisksCapture(three_disk_blocks()))
    for disks in (None, DISKS[:2], [*DISKS[:2], Disk("small", 704 * KiB, 60 * KiB)]):
        sink = DiskSink(IMAGE_SIZE, disks)
        with pytest.raises(RegionVaultError, match=r"the block sink holds .*not the image's 3"):
            repo.restore(point.id, sink)
        assert sink.writes == []
    bigger = DiskSink(IMAGE_SIZE, [*DISKS[:2], Disk("bigger", 704 * KiB, 320 * KiB)])
    repo.restore(point.id, bigger)  # a disk may be made larger than it was


# --------------------------------------------------------------------------- copy


@pytest.fixture
def engine(site: Site) -> Engine:
    return Engine(site, settings=SMALL)


def three_disk_point_and_copy(engine: Engine) -> tuple[DisksCapture, str, str]:
    capture = DisksCapture(three_disk_blocks())
    point = engine.repository("east").backup(capture)
    copy = engine.copy(point.id, to="west")
    return capture, point.id, copy.point.id


def test_a_copy_carries_the_disks(engine: Engine, tmp_path: Path) -> None:
    capture, _, copy_id = three_disk_point_and_copy(engine)
    west = engine.repository("west", create=False)
    manifest = west.load_manifest(copy_id)
    assert manifest.disks == DISKS
    assert manifest.format_version == 3
    assert west.verify(read_data=True).ok
    west.restore(copy_id, tmp_path / "copy")
    image = capture.image()
    for n, disk in enumerate(DISKS):
        (f,) = (tmp_path / "copy").glob(f"disk{n}-*.img")
        assert f.read_bytes() == disk_bytes(image, disk)


# --------------------------------------------------------------------------- launch


def test_restore_and_launch_gives_the_compute_the_image_s_disks(
    engine: Engine, east: Region, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compute that launches block images gets ``disks=`` (here: the test's stand-in
    compute writes each disk to a file; its launch reads them and stops there)."""
    capture = DisksCapture(three_disk_blocks())
    point = engine.repository("east").backup(capture)
    caps = dataclasses.replace(
        east.compute.capabilities, launch_kinds=frozenset({CaptureKind.BLOCKS})
    )
    monkeypatch.setattr(east.compute, "capabilities", caps)
    asked: list[tuple[CaptureKind, int | None, Sequence[Disk] | None]] = []
    launched: dict[str, bytes] = {}

    def open_restore_sink(
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> DiskFilesSink:
        asked.append((kind, size, disks))
        assert size is not None and disks is not None
        return DiskFilesSink(tmp_path / "vm", size, BS, disks)

    def launch(spec: LaunchSpec, sink: DiskFilesSink) -> Instance:
        launched.update({f.name: f.read_bytes() for f in sink.files()})
        raise ComputeError("stand-in compute: launched nothing", region=east.name)

    monkeypatch.setattr(east.compute, "open_restore_sink", open_restore_sink)
    monkeypatch.setattr(east.compute, "launch", launch)
    with pytest.raises(ComputeError, match="launched nothing"):
        engine.restore(point.id, region="east", launch=True)
    assert asked == [(CaptureKind.BLOCKS, IMAGE_SIZE, DISKS)]
    image = capture.image()
    names = _disks.disk_file_names(DISKS)
    assert launched == {n: disk_bytes(image, d) for n, d in zip(names, DISKS, strict=True)}


def test_a_point_the_region_cannot_launch_gets_one_error_before_anything_is_made(
    engine: Engine, west: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, copy_id = three_disk_point_and_copy(engine)
    before = [i.id for i in west.compute.list_instances()]

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be made for a point the region cannot launch")

    monkeypatch.setattr(west.compute, "open_restore_sink", never)
    monkeypatch.setattr(west.compute, "launch", never)
    with pytest.raises(UnlaunchableKind) as raised:
        engine.restore(copy_id, region="west", launch=True)
    assert str(raised.value) == (
        f"region local:west (local) cannot launch blocks point {copy_id} of i-0disks "
        "(copied from local:east): its compute launches files"
    )
    assert [i.id for i in west.compute.list_instances()] == before
    assert engine.state.last_drill(west.name, VM.id) is None


def test_the_command_says_so_in_one_line(
    engine: Engine, site_file: Path, west: Region, tmp_path: Path
) -> None:
    _, point_id, copy_id = three_disk_point_and_copy(engine)
    before = [i.id for i in west.compute.list_instances()]
    result = run("--site", site_file, "restore", copy_id, "--region", "local:west", "--launch")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"regionvault: error: region local:west (local) cannot launch blocks point {copy_id} of "
        "i-0disks (copied from local:east): its compute launches files"
    ]
    assert [i.id for i in west.compute.list_instances()] == before
    # the same point restores into a path: one file per disk
    out = tmp_path / "out"
    result = run("--site", site_file, "restore", point_id, "-r", "local:east", "-t", out)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == _disks.disk_file_names(DISKS)


def test_the_regions_say_what_they_launch(site_file: Path) -> None:
    data = json.loads(run("--site", site_file, "regions", "--json").stdout)
    assert {r["id"]: r["capabilities"]["launch_kinds"] for r in data} == {
        "local:east": ["files"],
        "local:west": ["files"],
    }


def test_layouts_compare_by_place_and_size_not_name() -> None:
    assert _disks.same_layout([Disk("os", 0, IMAGE_SIZE)], disk_layout(None, IMAGE_SIZE, BS))
    assert not _disks.same_layout(DISKS, DISKS[:2])
    assert not _disks.same_layout([Disk("a", 0, BS)], [Disk("a", 0, 2 * BS)])


def test_a_disk_that_ends_inside_a_block_restores_to_its_own_size(
    east: Region, tmp_path: Path
) -> None:
    """The sink's write that ends such a disk carries zero padding into the hole after it
    (to the block boundary): the files take the disk's bytes only."""
    disks = [Disk("short", 0, BS + 100), Disk("next", 2 * BS, BS)]
    rng = random.Random(7)
    capture = DisksCapture(
        {0: rng.randbytes(BS + 100), 2 * BS: rng.randbytes(BS)}, disks=disks, size=3 * BS
    )
    repo = repo_for(east)
    point = repo.backup(capture)
    repo.restore(point.id, tmp_path / "out")
    image = capture.image()
    assert (tmp_path / "out" / "disk0-short.img").read_bytes() == image[: BS + 100]
    assert (tmp_path / "out" / "disk1-next.img").read_bytes() == image[2 * BS :]


def test_an_empty_image_has_no_disks_and_is_backed_up_as_version_2_wrote_it(
    east: Region,
) -> None:
    assert disk_layout(None, 0, BS) == ()
    repo = repo_for(east)
    point = repo.backup(DisksCapture({}, disks=None, size=0))
    assert manifest_doc(repo, point.id)["image"] == {"size": 0, "block_size": BS}
    manifest = repo.load_manifest(point.id)
    assert (manifest.format_version, manifest.disks) == (2, ())
    sink = DiskSink(0, None)
    repo.restore(point.id, sink)
    assert sink.writes == []


@pytest.mark.parametrize("where", ["short", "shifted"])
def test_one_disk_that_is_not_the_whole_image_restores_into_a_path_as_that_disk(
    east: Region, tmp_path: Path, where: str
) -> None:
    """Review 15a, 4: the file is the disk's bytes, not the image's (no padding after a
    short disk, no leading zeros before a shifted one)."""
    rng = random.Random(3)
    disk = Disk("os", 0, BS + 100) if where == "short" else Disk("os", BS, BS)
    data = rng.randbytes(disk.size)
    capture = DisksCapture({disk.offset: data}, disks=[disk], size=3 * BS)
    repo = repo_for(east)
    point = repo.backup(capture)
    manifest = repo.load_manifest(point.id)
    assert manifest.format_version == 3 and manifest.odd_disks
    out = tmp_path / "restored"
    out.mkdir()
    (out / "disk.img").write_bytes(b"an older file in the way")
    repo.restore(point.id, out / "disk.img")
    assert (out / "disk.img").read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["disk.img"]  # nothing staged stays


def test_split_by_disk_cuts_a_write_at_the_disks_and_drops_zeros_between_them() -> None:
    """The routing every provider's block sink uses: a write across two disks and the gap
    between them becomes one piece per disk at its own offsets; zeros in the gap are
    dropped; data in a gap or past the last disk refuses the write whole, naming where."""
    disks = (Disk("os", 0, 8), Disk("data", 16, 8))
    data = b"abcdefgh" + bytes(8) + b"ijklmnop"
    pieces = split_by_disk(disks, 0, data)
    assert [(i, at, bytes(p)) for i, at, p in pieces] == [(0, 0, b"abcdefgh"), (1, 0, b"ijklmnop")]
    assert [(i, at, bytes(p)) for i, at, p in split_by_disk(disks, 4, data[4:12])] == [
        (0, 4, b"efgh")
    ]
    assert [(i, at, bytes(p)) for i, at, p in split_by_disk(disks, 20, b"mnop")] == [
        (1, 4, b"mnop")
    ]
    with pytest.raises(ValueError, match="data at 11, outside the image's disks"):
        split_by_disk(disks, 0, b"abcdefgh" + b"\0\0\0x" + bytes(4) + b"ijklmnop")
    with pytest.raises(ValueError, match="data at 25, outside the image's disks"):
        split_by_disk(disks, 16, b"ijklmnop" + b"\0z")
    assert split_by_disk(disks, 24, bytes(8)) == []  # zeros past the last disk: nothing
