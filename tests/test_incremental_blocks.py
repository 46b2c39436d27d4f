"""Incremental block backups: the data plane (``Repository.backup(..., base=)``) takes the
base's untouched extents whole and reads only the changed ranges and the extents they touch,
and the point restores byte for byte what a full read gives; the engine keeps each capture
for the next backup (``keep=True``), takes the next one ``since`` it, and releases what it
no longer needs, through failures and kill -9 (tests/image_provider.py's compute)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import image_provider
import pytest
from image_provider import ImageCompute
from regionvault.core import BlockCapture, Instance, Region, Site
from regionvault.core.pipeline.engine import Engine
from regionvault.core.pipeline.service import Service
from regionvault.core.pipeline.state import KeptCapture
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import Repository
from regionvault.core.types import Disk
from repository_support import MemorySink, repo_for
from site_support import open_site, site_toml

BS = 4096
INSTANCE = Instance(id="i-img", name="img", region="local:east")


class DiffCapture(BlockCapture):
    """An image given as bytes (zeros are holes, except where ``written`` says data was
    written), with exact changed ranges against an earlier image, or ones given."""

    def __init__(
        self,
        image: bytes,
        *,
        written: Sequence[tuple[int, int]],
        since: bytes | None = None,
        changed: list[tuple[int, int]] | None = None,
        block_size: int = BS,
        disks: Sequence[Disk] | None = None,
        granularity: int | None = None,
    ) -> None:
        super().__init__(
            INSTANCE, datetime.now(UTC), size=len(image), block_size=block_size, disks=disks
        )
        self.image = image
        self.written = sorted(written)
        self._changed = changed
        if changed is None and since is not None and len(since) == len(image):
            self._changed = exact_changes(since, image, granularity or block_size)
        #: what the backup took from this capture: ``(offset, length)``
        self.read: list[tuple[int, int]] = []
        self._filtered = False

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        for offset, length in self.written:
            for at in range(offset, offset + length, 3 * BS):
                piece = self.image[at : min(offset + length, at + 3 * BS)]
                if not self._filtered:
                    self.read.append((at, len(piece)))
                yield at, piece

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        self._filtered = True  # the default filters blocks(): count what it yields
        for offset, data in super().read_ranges(spans):
            self.read.append((offset, len(data)))
            yield offset, data

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        return self._changed


def exact_changes(old: bytes, new: bytes, block: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for at in range(0, len(new), block):
        if old[at : at + block] != new[at : at + block]:
            n = min(block, len(new) - at)
            if out and sum(out[-1]) == at:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((at, n))
    return out


def merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in sorted(ranges):
        if out and o <= sum(out[-1]):
            out[-1] = (out[-1][0], max(sum(out[-1]), o + n) - out[-1][0])
        elif n:
            out.append((o, n))
    return out


def restored(
    repo: Repository, point_id: str, size: int, disks: Sequence[Disk] | None = None
) -> bytes:
    sink = MemorySink(size)
    if disks is not None:
        sink.disks = tuple(disks)
    repo.restore(point_id, sink)
    return bytes(sink.data)


class Disk_:
    """A disk that changes between captures: writes of random data, trims (a range
    becomes a hole), and growth; ``written`` tracks the ranges that hold data."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng = rng
        self.data = bytearray(size)
        self.written: list[tuple[int, int]] = []

    def write(self, offset: int, length: int) -> None:
        length = min(length, len(self.data) - offset)
        self.data[offset : offset + length] = self.rng.randbytes(length)
        self.written = merge([*self.written, (offset, length)])

    def trim(self, offset: int, length: int) -> None:
        end = min(len(self.data), offset + length)
        self.data[offset:end] = bytes(end - offset)
        kept: list[tuple[int, int]] = []
        for o, n in self.written:
            if o < offset:
                kept.append((o, min(o + n, offset) - o))
            if o + n > end:
                kept.append((max(o, end), o + n - max(o, end)))
        self.written = merge(kept)

    def grow(self, by: int) -> None:
        self.data.extend(bytes(by))

    def change(self, rounds: int) -> None:
        size = len(self.data)
        for _ in range(rounds):
            what = self.rng.random()
            offset = self.rng.randrange(0, size)
            if self.rng.random() < 0.3:
                offset -= offset % BS  # aligned as often as not
            length = self.rng.choice([1, 100, BS, 3 * BS + 17, 40_000, 200_000])
            if what < 0.75:
                self.write(offset, length)
            else:
                self.trim(offset, length)


# ----------------------------------------------------------------------- the data plane


def test_untouched_extents_are_taken_whole_and_only_changes_are_read(east: Region) -> None:
    size = 64 * BS
    old = bytearray(size)
    old[0 : 8 * BS] = random.Random(1).randbytes(8 * BS)
    old[20 * BS : 30 * BS] = random.Random(2).randbytes(10 * BS)
    old[40 * BS : 41 * BS] = random.Random(3).randbytes(BS)
    written = [(0, 8 * BS), (20 * BS, 10 * BS), (40 * BS, BS)]
    repo = repo_for(east)
    first = repo.backup(DiffCapture(bytes(old), written=written))

    new = bytearray(old)
    new[22 * BS + 5 : 22 * BS + 9] = b"\xff\xfe\xfd\xfc"  # inside the second extent
    new[50 * BS : 51 * BS] = b"\x01" * BS  # where nothing was
    written2 = [*written, (50 * BS, BS)]
    cap = DiffCapture(bytes(new), written=written2, since=bytes(old))
    assert cap.changed_ranges() == [(22 * BS, BS), (50 * BS, BS)]
    second = repo.backup(cap, base=first.id)

    # read: the chunks of the second extent that the change touches, and the new range;
    # taken whole: the first and third extents, and the second's untouched chunks
    read = merge(cap.read)
    assert read[-1] == (50 * BS, BS)
    assert all(o >= 20 * BS and o + n <= 30 * BS for o, n in read[:-1])
    assert any(o <= 22 * BS + 5 and o + n >= 22 * BS + 9 for o, n in read[:-1])
    assert restored(repo, second.id, size) == bytes(new)
    manifest = repo.load_manifest(second.id)
    assert manifest.parent == first.id
    # less than the touched extent and the new range (11 blocks) was read
    assert manifest.stats["bytes_read"] < 11 * BS
    assert manifest.stats["bytes_read"] + manifest.stats["bytes_from_base"] == 20 * BS
    assert manifest.stats["extents_from_base"] >= 3
    assert repo.verify(read_data=True).ok


def test_a_lone_disk_named_by_its_provider_is_the_same_layout(east: Region) -> None:
    """A one-disk point records no disks (its layout is the whole image): a capture naming
    its one disk ("os") is still backed up against it."""
    size = 16 * BS
    image = random.Random(16).randbytes(size)
    whole = [Disk("os", 0, size)]
    repo = repo_for(east)
    first = repo.backup(DiffCapture(image, written=[(0, size)], disks=whole))
    new = bytearray(image)
    new[5 * BS] ^= 1
    cap = DiffCapture(bytes(new), written=[(0, size)], since=image, disks=whole)
    point = repo.backup(cap, base=first.id)
    assert repo.load_manifest(point.id).stats["bytes_from_base"] > 0
    assert restored(repo, point.id, size) == bytes(new)


def test_an_image_of_two_disks_is_backed_up_against_its_base(east: Region) -> None:
    size = 32 * BS
    disks = [Disk("os", 0, 12 * BS), Disk("lun0", 16 * BS, 16 * BS)]
    written = [(0, 12 * BS), (16 * BS, 16 * BS)]
    old = bytearray(size)
    for o, n in written:
        old[o : o + n] = random.Random(o).randbytes(n)
    repo = repo_for(east)
    first = repo.backup(DiffCapture(bytes(old), written=written, disks=disks))
    new = bytearray(old)
    new[20 * BS + 3] ^= 0xFF  # on the data disk
    cap = DiffCapture(bytes(new), written=written, since=bytes(old), disks=disks)
    point = repo.backup(cap, base=first.id)
    manifest = repo.load_manifest(point.id)
    assert manifest.stats["bytes_from_base"] >= 12 * BS
    assert [(d.offset, d.size) for d in manifest.disks] == [(0, 12 * BS), (16 * BS, 16 * BS)]
    assert restored(repo, point.id, size, cap.disks) == bytes(new)
    # the data disk moved (another layout): read in full
    moved = [Disk("os", 0, 12 * BS), Disk("lun0", 12 * BS, 16 * BS)]
    other = DiffCapture(
        bytes(new[: 12 * BS] + new[16 * BS :] + bytes(4 * BS)),
        written=[(0, 28 * BS)],
        changed=[(0, BS)],
        disks=moved,
    )
    assert repo.load_manifest(repo.backup(other, base=point.id).id).stats["bytes_from_base"] == 0


def test_without_a_base_or_changed_ranges_the_image_is_read_in_full(east: Region) -> None:
    size = 16 * BS
    image = random.Random(4).randbytes(size)
    repo = repo_for(east)
    first = repo.backup(DiffCapture(image, written=[(0, size)]))
    # no since: changed_ranges is None, so the base is not used
    cap = DiffCapture(image, written=[(0, size)])
    point = repo.backup(cap, base=first.id)
    assert merge(cap.read) == [(0, size)]
    assert repo.load_manifest(point.id).stats["bytes_from_base"] == 0
    assert repo.load_manifest(point.id).parent is None


@pytest.mark.parametrize(
    "why",
    ["size", "block_size", "disks", "missing", "ranges", "instance"],
)
def test_any_doubt_about_the_base_reads_in_full(
    east: Region, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    size = 16 * BS
    image = random.Random(5).randbytes(size)
    repo = repo_for(east)
    first = repo.backup(DiffCapture(image, written=[(0, size)]))
    new = bytearray(image)
    new[3] ^= 0xFF
    if why == "size":
        new.extend(bytes(BS))
    kwargs: dict[str, object] = {}
    changed: list[tuple[int, int]] = [(0, BS)]
    if why == "block_size":
        kwargs["block_size"] = 2 * BS
    if why == "disks":
        kwargs["disks"] = [Disk("os", 0, 8 * BS), Disk("lun0", 8 * BS, 8 * BS)]
    if why == "ranges":
        changed = [(BS, BS), (0, BS)]  # not ascending: the provider cannot be trusted
    base = first.id
    if why == "missing":
        base = "0" * 32
    cap = DiffCapture(bytes(new), written=[(0, len(new))], changed=changed, **kwargs)  # type: ignore[arg-type]
    if why == "instance":
        cap.instance = Instance(id="i-other", name="other", region="local:east")
    point = repo.backup(cap, base=base)
    assert merge(cap.read) == [(0, len(new))]
    assert restored(repo, point.id, len(new), cap.disks) == bytes(new)
    assert repo.load_manifest(point.id).stats["bytes_from_base"] == 0
    assert "reads the whole image" in caplog.text


def test_a_capture_reading_outside_its_spans_fails_the_backup(east: Region) -> None:
    size = 16 * BS
    image = random.Random(6).randbytes(size)
    repo = repo_for(east)
    first = repo.backup(DiffCapture(image, written=[(0, 4 * BS), (8 * BS, 8 * BS)]))

    class Liar(DiffCapture):
        def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
            return self.blocks()  # everything, not only the spans

    cap = Liar(image, written=[(0, 4 * BS), (8 * BS, 8 * BS)], changed=[(0, BS)])
    with pytest.raises(Exception, match="outside the ranges it was asked to read"):
        repo.backup(cap, base=first.id)
    assert [p.id for p in repo.points()] == [first.id]


@pytest.mark.parametrize(("seed", "granularity"), [(20261207, BS), (7, 512), (11, 1)])
def test_random_changes_restore_as_a_full_read_does(
    east: Region, seed: int, granularity: int
) -> None:
    """Property-style: a disk written, trimmed and grown at random between captures; each
    incremental point (against the previous one) restores the image itself, and the same as
    a full backup of the same capture. Unaligned writes, extents of several sizes, changed
    ranges in whole blocks, in 512-byte sectors, or to the byte (narrower than the blocks
    a capture reads); bounded rounds."""
    rng = random.Random(seed)
    disk = Disk_(rng, 96 * BS)
    disk.change(12)
    repo = repo_for(east)
    previous = bytes(disk.data)
    point = repo.backup(DiffCapture(previous, written=disk.written))
    read_less = 0
    for round_ in range(12):
        if round_ in (4, 9):
            disk.grow(rng.choice([BS, 5 * BS + 123]))  # a resize: the next reads in full
        disk.change(rng.randrange(1, 6))
        image = bytes(disk.data)
        cap = DiffCapture(image, written=disk.written, since=previous, granularity=granularity)
        incremental = repo.backup(cap, base=point.id)
        full = repo.backup(DiffCapture(image, written=disk.written))
        got = restored(repo, incremental.id, len(image))
        assert got == image, f"round {round_}"
        assert got == restored(repo, full.id, len(image)), f"round {round_}"
        stats = repo.load_manifest(incremental.id).stats
        if len(previous) == len(image):
            # what was read lies near the changed ranges: within a chunk of each, and the
            # rest came from the base
            changed = exact_changes(previous, image, granularity)
            chunk = repo.chunker.max_size
            # (not always equal: a byte written with the value it had is no change)
            assert stats["bytes_read"] + stats["bytes_from_base"] <= sum(n for _, n in disk.written)
            assert stats["bytes_read"] <= sum(n + 2 * chunk for _, n in changed)
            read_less += stats["bytes_from_base"] > 0
            for o, n in merge(cap.read):
                assert any(
                    o < co + cn + chunk + BS and co < o + n + chunk + BS for co, cn in changed
                )
        previous, point = image, incremental
    assert read_less >= 5  # most rounds took something whole from their base
    assert repo.verify(read_data=True).ok


# ----------------------------------------------------------------------- the engine


@pytest.fixture
def image_site(tmp_path: Path) -> Iterator[Site]:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            {"imagefake:east": "east", "imagefake:west": "west"},
            settings={"state_dir": tmp_path / "state"},
            replicate=None,
        )
    )
    with open_site(path, image_provider) as site:
        yield site


def compute_of(site: Site) -> ImageCompute:
    compute = site.region("east").compute
    assert isinstance(compute, ImageCompute)
    return compute


def write_at(compute: ImageCompute, instance_id: str, offset: int, data: bytes) -> None:
    with compute.image(instance_id).open("r+b") as f:
        f.seek(offset)
        f.write(data)


def restore_bytes(engine: Engine, point_id: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"restored-{point_id}.img"
    engine.repository("imagefake:east").restore(point_id, target)
    return target.read_bytes()


def snapshots(compute: ImageCompute) -> set[str]:
    return {p.name for p in compute.snapshots.iterdir()}


def test_engine_backs_up_since_the_previous_capture_and_releases_it(
    image_site: Site, tmp_path: Path
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("vdu", 4 << 20, {"backup": "1-7"})
    rng = random.Random(7)
    write_at(compute, inst.id, 0, rng.randbytes(1 << 20))
    write_at(compute, inst.id, 2 << 20, rng.randbytes(1 << 20))
    engine = Engine(image_site)

    first = engine.backup(inst.id)
    assert compute.captures[-1].ref is not None
    kept_first = snapshots(compute)
    assert len(kept_first) == 1  # kept for the next backup

    write_at(compute, inst.id, (2 << 20) + 10, b"changed")
    second = engine.backup(inst.id)
    cap = compute.captures[-1]
    assert cap.changed_ranges() == [((2 << 20), BS)]
    assert cap.bytes_read <= 1 << 20  # the touched extent, not the whole disk
    stats = engine.repository("imagefake:east").load_manifest(second.id).stats
    assert stats["bytes_from_base"] >= 1 << 20
    assert restore_bytes(engine, second.id, tmp_path) == compute.image(inst.id).read_bytes()
    # the first capture's snapshot was released once the second point committed
    kept_second = snapshots(compute)
    assert len(kept_second) == 1 and not kept_second & kept_first

    # the base point expired and was forgotten: the next one reads in full, all the same
    engine.repository("imagefake:east").forget([second.id])
    write_at(compute, inst.id, 5, b"again")
    third = engine.backup(inst.id)
    assert compute.captures[-1].changed_ranges() is None  # taken without since
    assert compute.captures[-1].bytes_read == 2 << 20
    assert restore_bytes(engine, third.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert len(snapshots(compute)) == 1
    assert first.id != third.id


def test_a_failed_backup_releases_its_own_capture_and_keeps_the_base(
    image_site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("core", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(8).randbytes(300_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    base_snapshot = snapshots(compute)

    repo = engine.repository("imagefake:east")
    original = Repository.backup

    def failing(self: Repository, *args: object, **kwargs: object) -> object:
        raise OSError("disk unplugged")

    monkeypatch.setattr(Repository, "backup", failing)
    with pytest.raises(OSError, match="unplugged"):
        engine.backup(inst.id)
    assert snapshots(compute) == base_snapshot  # its own released, the base kept
    monkeypatch.setattr(Repository, "backup", original)

    write_at(compute, inst.id, 100, b"x")
    point = engine.backup(inst.id)
    assert compute.captures[-1].changed_ranges() == [(0, BS)]  # still since the base
    assert restore_bytes(engine, point.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert len(repo.points(inst.id)) == 2


def test_a_tick_backs_up_incrementally_and_retention_settles_kept_captures(
    image_site: Site, tmp_path: Path
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("ims", 2 << 20, {"backup": "1-7"})
    rng = random.Random(9)
    for offset in (0, 600_000, 1_200_000):  # three extents, holes between them
        write_at(compute, inst.id, offset, rng.randbytes(300_000))
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    engine = Engine(image_site, clock=lambda: now)
    service = Service(engine)
    report = service.tick()
    assert not report.problems, report.problems
    write_at(compute, inst.id, 4096 * 3, b"tick")
    now += timedelta(days=1, minutes=1)
    report = service.tick()
    assert not report.problems, report.problems
    points = engine.points("imagefake:east", inst.id)
    assert len(points) == 2
    stats = engine.repository("imagefake:east").load_manifest(points[-1].id).stats
    assert stats["bytes_read"] < stats["bytes_from_base"]
    assert restore_bytes(engine, points[-1].id, tmp_path) == compute.image(inst.id).read_bytes()
    assert len(snapshots(compute)) == 1


_KILLED_RUN = """
import sys
sys.path[:0] = {paths!r}
import image_provider
from site_support import open_site
from regionvault.core.pipeline.engine import Engine
with open_site(__import__("pathlib").Path({site!r}), image_provider) as site:
    Engine(site).backup({instance!r})
print("finished")
"""


def test_kill_9_between_capture_and_commit_leaks_nothing(image_site: Site, tmp_path: Path) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("vcu", 2 << 20)
    write_at(compute, inst.id, 0, random.Random(10).randbytes(1 << 20))
    engine = Engine(image_site)
    first = engine.backup(inst.id)
    base_snapshot = snapshots(compute)
    write_at(compute, inst.id, 1 << 19, b"between")

    hold = tmp_path / "go"
    tests_dir = str(Path(__file__).parent)
    script = _KILLED_RUN.format(
        paths=[tests_dir],
        site=str(tmp_path / "site.toml"),
        instance=inst.id,
    )
    env = {**os.environ, image_provider.HOLD_ENV: str(hold)}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pending = _wait_for_pending(image_site, inst.id, proc)
        assert len(snapshots(compute)) == 2  # the base's and the killed run's
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(pending) == 1

    point = engine.backup(inst.id)  # the re-run
    assert snapshots(compute).isdisjoint(base_snapshot) and len(snapshots(compute)) == 1
    assert compute.captures[-1].changed_ranges() == [(1 << 19, BS)]  # since the base
    assert restore_bytes(engine, point.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert [p.id for p in engine.points("imagefake:east", inst.id)] == [first.id, point.id]
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        assert kept.current is not None and kept.current.point_id == point.id
        assert not kept.pending and not kept.release
    assert engine.repository("imagefake:east").verify(read_data=True).ok


def _wait_for_pending(site: Site, instance_id: str, proc: subprocess.Popen[str]) -> list[str]:
    state = Engine(site).state
    for _ in range(1200):  # at most 2 minutes
        with state.kept_captures("imagefake:east", instance_id) as kept:
            # an intent (ref None) first, its ref once the capture returned
            if kept.pending and all(p.ref is not None for p in kept.pending):
                return [str(p.ref) for p in kept.pending]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("the run recorded no pending capture")


def test_a_committed_point_whose_run_was_killed_becomes_current(
    image_site: Site, tmp_path: Path
) -> None:
    """Killed after the commit, before it said so: the next backup takes that point as its
    base (its capture's ref was recorded with the point's id before the commit)."""
    compute = compute_of(image_site)
    inst = compute.make_instance("upf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(11).randbytes(500_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        assert kept.current is not None
        # as a killed run leaves it: pending under a process that is gone, point committed
        kept.pending.append(KeptCapture(kept.current.ref, kept.current.point_id, dead_owner()))
        kept.current = None
    write_at(compute, inst.id, 7, b"7")
    point = engine.backup(inst.id)
    assert compute.captures[-1].changed_ranges() == [(0, BS)]
    assert restore_bytes(engine, point.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert len(snapshots(compute)) == 1


def dead_owner() -> str:
    """The token of a process of this machine that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return replace(ProcessIdentity.current(), pid=int(proc.stdout)).token()


def test_retention_releases_what_a_killed_run_left_pending(image_site: Site) -> None:
    """A tick's retention settles the kept captures of runs that are gone: one whose point
    was never committed is released, and the current one stays."""
    compute = compute_of(image_site)
    inst = compute.make_instance("smf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(12).randbytes(100_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    current = snapshots(compute)
    leaked = compute.capture(inst.id, keep=True)
    leaked.close()
    assert leaked.ref is not None and len(snapshots(compute)) == 2
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        kept.pending.append(KeptCapture(leaked.ref, Repository.new_point_id(), dead_owner()))
    engine.retain("imagefake:east")
    assert snapshots(compute) == current
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        assert not kept.pending and not kept.release and kept.current is not None


def test_a_live_runs_pending_capture_is_left_alone(image_site: Site) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("amf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(13).randbytes(100_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    running = compute.capture(inst.id, keep=True)  # as another run, still going, holds it
    running.close()
    assert running.ref is not None
    me = ProcessIdentity.current().token()
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        kept.pending.append(KeptCapture(running.ref, Repository.new_point_id(), me))
    engine.backup(inst.id)
    engine.retain("imagefake:east")
    assert running.snapshot.exists()
    with engine.state.kept_captures("imagefake:east", inst.id) as kept:
        assert [p.ref for p in kept.pending] == [running.ref]


def test_a_release_that_fails_is_tried_again(
    image_site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("nrf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(14).randbytes(100_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    first = snapshots(compute)

    def refuse(ref: str) -> None:
        raise OSError("snapshot service unavailable")

    monkeypatch.setattr(compute, "release_capture", refuse)
    engine.backup(inst.id)  # committed all the same
    assert first <= snapshots(compute) and len(snapshots(compute)) == 2
    assert "not released yet" in caplog.text
    monkeypatch.undo()
    assert engine.release_kept_captures("imagefake:east") == 0
    assert len(snapshots(compute)) == 1 and not first & snapshots(compute)


def test_a_damaged_state_file_costs_an_incremental_read_not_a_backup(
    image_site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("pcf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(15).randbytes(100_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    (state_file,) = (tmp_path / "state" / "captures").glob("*.json")
    state_file.write_text("{not json")
    point = engine.backup(inst.id)
    assert compute.captures[-1].changed_ranges() is None  # read in full
    assert restore_bytes(engine, point.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert "is damaged" in caplog.text
    (aside,) = state_file.parent.glob(f"{state_file.name}.*.damaged")
    first = aside.read_bytes()
    # a second damage is set aside beside the first, never over it (review 15a, 9)
    state_file.write_text("{still not json")
    engine.backup(inst.id)
    asides = sorted(state_file.parent.glob(f"{state_file.name}.*.damaged"))
    assert len(asides) == 2 and first in {p.read_bytes() for p in asides}
