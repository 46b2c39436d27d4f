"""A region's own tick (``Service.tick(region=...)``, ``regionvault tick --region``): two
services, one per region, each holding only its own region's keys, copy east's backups into
west through their inboxes alone, with a sealed receipt back to east."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from regionvault.core.cli import cli
from regionvault.core.errors import (
    IntegrityError,
    KeyAccessDenied,
    PayloadWaiting,
    RegionVaultError,
)
from regionvault.core.pipeline import DEFAULT_COPY_GRACE, Engine, Service, TickReport
from regionvault.core.pipeline.copyflow import CopyFlow
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    RETENTION,
    TAG,
    JobStatus,
)
from regionvault.core.repository import (
    CopyReceipt,
    CopySender,
    CopyTracker,
    Repository,
    open_receipt,
    receipt_name,
    seal_receipt,
)
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance
from regionvault.providers.local.keys import LocalKeyService
from regionvault.providers.local.transit import LocalTransit
from repository_support import snapshot
from site_support import open_site, region_root, worker_site

EAST, WEST = "local:east", "local:west"
#: all ticks of a test happen at this moment unless a test moves the clock on
T0 = datetime(2026, 11, 25, 0, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- sites


def inbox_names(region: Region) -> list[str]:
    inbox = region_root(region) / "inbox"
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file())


class Services:
    """East's and west's services: each tick runs on a fresh engine over its own site file,
    as a separate process would. Any use of a KeyService over a keys directory that holds
    only a public sealing key (the other region's, in each site) fails the test."""

    def __init__(self, tmp_path: Path, east: Region, west: Region, monkeypatch: Any) -> None:
        self.files = {
            EAST: worker_site(tmp_path / "service-east", east, west, replicate=True),
            WEST: worker_site(tmp_path / "service-west", west, east, replicate=True),
        }
        self.public = sorted(tmp_path.glob("public-of-*"))
        self.now = T0
        self.grace = DEFAULT_COPY_GRACE
        original = LocalKeyService._load
        public = {p.resolve() / "keys" for p in self.public}

        def guarded(keys: LocalKeyService, *, refresh: bool = False) -> Any:
            if keys.keys_dir.resolve() in public:
                raise AssertionError(f"{keys.region}'s KeyService used by the other service")
            return original(keys, refresh=refresh)

        monkeypatch.setattr(LocalKeyService, "_load", guarded)

    @contextlib.contextmanager
    def engine(self, region: str) -> Iterator[Engine]:
        with open_site(self.files[region]) as s:
            yield Engine(s, clock=lambda: self.now, copy_grace=self.grace)

    def tick(self, region: str) -> TickReport:
        with self.engine(region) as engine:
            report = Service(engine).tick(region=region)
        assert report.region == region
        return report

    def keys_held_apart(self) -> None:
        """Neither service ever held, or made, the other region's secret keys."""
        for public in self.public:
            assert sorted(p.name for p in (public / "keys").iterdir()) == ["sealing.pub"]


def ran(report: TickReport) -> dict[str, JobStatus]:
    """The kinds of job that did something (not replayed), with their status; the tag and
    retention jobs of each new slot aside."""
    return {
        o.kind: o.status
        for o in report.jobs
        if o.status is not JobStatus.REPLAYED and o.kind not in (TAG, RETENTION)
    }


def result_of(report: TickReport, kind: str) -> Any:
    (outcome,) = [o for o in report.jobs if o.kind == kind]
    assert outcome.status is JobStatus.DONE, outcome.error
    return outcome.result


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = random.Random(11)
    root = tmp_path / "nf-data"
    (root / "db").mkdir(parents=True)
    for i in range(4):
        (root / "db" / f"part-{i}.bin").write_bytes(rng.randbytes(300_000))
    (root / "conf.txt").write_text("apn = internet\n" * 500)
    return root


@pytest.fixture
def instance(east: Region, dataset: Path) -> Instance:
    return east.compute.register_instance("nf-1", dataset, tags={"backup": "1-7"})


@pytest.fixture
def services(
    site: Site,
    east: Region,
    west: Region,
    instance: Instance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Services:
    east.sealer(), west.sealer()  # each region's keys, made by its own provider
    site.close()
    return Services(tmp_path, east, west, monkeypatch)


def copies_in_west(services: Services) -> list[Any]:
    with services.engine(WEST) as engine:
        return [p for p in engine.repository(WEST).points() if p.lineage is not None]


def tracker_receipt(services: Services, point_id: str) -> CopyReceipt | None:
    with services.engine(EAST) as engine:
        return CopyTracker(engine.repository(EAST, create=False)).receipt(WEST, point_id)


# --------------------------------------------------------------------------- the whole round


def test_two_region_services_copy_and_confirm_with_their_own_keys(
    services: Services, east: Region, west: Region, dataset: Path, tmp_path: Path
) -> None:
    # east: tag, back up, offer (a tick run twice does nothing new)
    e1 = services.tick(EAST)
    assert ran(e1) == {BACKUP: JobStatus.DONE, COPY_OFFER: JobStatus.DONE}
    assert {o.kind: o.status for o in e1.jobs if o.kind in (TAG, RETENTION)} == {
        TAG: JobStatus.DONE,
        RETENTION: JobStatus.DONE,
    }
    point_id = result_of(e1, BACKUP)["point"]
    again = services.tick(EAST)
    assert {o.status for o in again.jobs} == {JobStatus.REPLAYED}
    assert inbox_names(west) == [f"{EAST}/copy/{point_id}/offer"]

    # west: takes the offer in, asks for every chunk
    w1 = services.tick(WEST)
    assert ran(w1) == {COPY_REQUEST: JobStatus.DONE}
    asked = result_of(w1, COPY_REQUEST)
    assert asked["chunks_requested"] == asked["chunks_total"] > 0
    assert ran(services.tick(WEST)) == {}

    # east: sends them, then the sent notice; it does not offer again meanwhile
    e2 = services.tick(EAST)
    assert ran(e2) == {COPY_SEND: JobStatus.DONE}
    sent = result_of(e2, COPY_SEND)
    assert sent["chunks_sent"] == asked["chunks_requested"] and sent["notified"] is True
    assert f"{EAST}/copy/{point_id}/sent" in inbox_names(west)

    # west: commits, answers with a receipt; its inbox is empty again
    w2 = services.tick(WEST)
    assert ran(w2) == {COPY_COMMIT: JobStatus.DONE}
    committed = result_of(w2, COPY_COMMIT)
    assert committed["existing"] is False and committed["receipt"] is True
    assert inbox_names(west) == []
    assert inbox_names(east) == [f"{WEST}/copy/{point_id}/receipt"]

    # east: takes the receipt in and records it in its own vault, sealed
    e3 = services.tick(EAST)
    assert ran(e3) == {COPY_RECEIPT: JobStatus.DONE}
    assert result_of(e3, COPY_RECEIPT) == {"copy": committed["copy"], "recorded": True}
    assert inbox_names(east) == []
    receipt = tracker_receipt(services, point_id)
    assert receipt is not None and receipt.copy == committed["copy"]
    assert (receipt.source, receipt.destination) == (EAST, WEST)
    (copy,) = copies_in_west(services)
    assert copy.id == committed["copy"] and copy.lineage is not None
    assert copy.lineage.source_recovery_point == point_id
    assert copy.expires_at == receipt.expires_at is not None  # the source's policy: 7 days
    tracked = list((region_root(east) / "vault").rglob("copies/*/*/*"))
    assert sorted(p.name for p in tracked) == ["offered", "receipt"]
    for path in tracked:  # sealed: neither the point id nor the copy's names show
        data = path.read_bytes()
        assert point_id.encode() not in data and committed["copy"].encode() not in data
        assert WEST.encode() not in data

    # a second round does nothing new: every key replays, nothing is offered
    for region in (EAST, WEST, EAST, WEST):
        again = services.tick(region)
        assert again.ok and {o.status for o in again.jobs} == {JobStatus.REPLAYED}, region
    # and hours later, past the grace period, east still does not offer the point again
    services.now = T0 + 2 * DEFAULT_COPY_GRACE
    later = services.tick(EAST)
    assert COPY_OFFER not in ran(later) and later.ok
    services.keys_held_apart()
    with services.engine(EAST) as engine, pytest.raises(AssertionError, match="other service"):
        engine.region(WEST).keys.generate_data_key({"what": "the guard holds"})

    # west's keys alone restore the copy, byte-exact, with east gone
    shutil.rmtree(region_root(east))
    with services.engine(WEST) as engine:
        out = tmp_path / "restored"
        engine.restore(copy.id, region=WEST, target=out)
    assert snapshot(out) == snapshot(dataset)


def alternate(services: Services, rounds: int) -> list[TickReport]:
    reports = []
    for _ in range(rounds):  # bounded
        reports += [services.tick(EAST), services.tick(WEST)]
    return reports


def test_a_failed_phase_is_retried_by_the_next_tick(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"send": 1, "commit": 1}
    original_send = CopySender.send

    def flaky_send(self: CopySender, point_id: str, *args: Any, **kwargs: Any) -> Any:
        if failures["send"]:
            failures["send"] -= 1
            raise RegionVaultError("the link dropped (injected)")
        return original_send(self, point_id, *args, **kwargs)

    original_commit = CopyFlow._commit_on_notice

    def flaky_commit(self: CopyFlow, *args: Any) -> Any:
        if failures["commit"]:
            failures["commit"] -= 1
            raise RegionVaultError("the process died (injected)")
        return original_commit(self, *args)

    monkeypatch.setattr(CopySender, "send", flaky_send)
    monkeypatch.setattr(CopyFlow, "_commit_on_notice", flaky_commit)

    services.tick(EAST)
    services.tick(WEST)
    e2 = services.tick(EAST)
    assert ran(e2) == {COPY_SEND: JobStatus.FAILED} and not e2.ok
    assert "injected" in (e2.failures()[0].error or "")
    assert ran(services.tick(EAST)) == {COPY_SEND: JobStatus.DONE}  # the same key, again
    w2 = services.tick(WEST)
    assert ran(w2) == {COPY_COMMIT: JobStatus.FAILED}
    assert ran(services.tick(WEST)) == {COPY_COMMIT: JobStatus.DONE}
    assert ran(services.tick(EAST)) == {COPY_RECEIPT: JobStatus.DONE}
    assert failures == {"send": 0, "commit": 0}
    assert len(copies_in_west(services)) == 1
    assert all(ran(r) == {} for r in alternate(services, 2))
    services.keys_held_apart()


def test_a_commit_missing_a_chunk_asks_again_in_the_next_slot(
    services: Services, west: Region
) -> None:
    services.tick(EAST)
    services.tick(WEST)
    services.tick(EAST)
    batches = sorted((region_root(west) / "inbox" / EAST).rglob("batch-*"))
    assert batches
    batches[0].unlink()  # a batch lost on the way
    w = services.tick(WEST)
    assert ran(w) == {COPY_COMMIT: JobStatus.FAILED}
    assert "has not arrived" in (w.failures()[0].error or "")
    assert not any(name.endswith("/sent") for name in inbox_names(west))  # notice dropped
    assert ran(services.tick(WEST)) == {}  # this slot's request was made already
    services.now = T0 + timedelta(minutes=5)  # the next schedule slot
    asked = services.tick(WEST)
    assert ran(asked) == {COPY_REQUEST: JobStatus.DONE}
    again = result_of(asked, COPY_REQUEST)
    assert again["chunks_requested"] > 0  # what the lost batch held (here: one batch, all)
    assert ran(services.tick(EAST)) == {COPY_SEND: JobStatus.DONE}
    assert ran(services.tick(WEST)) == {COPY_COMMIT: JobStatus.DONE}
    assert ran(services.tick(EAST)) == {COPY_RECEIPT: JobStatus.DONE}
    assert len(copies_in_west(services)) == 1
    services.keys_held_apart()


def test_a_lost_receipt_is_answered_again_after_the_grace_period(
    services: Services, east: Region, west: Region
) -> None:
    """An old source (or a lost receipt): the destination, holding the copy, answers a new
    offer with a receipt, and sends no data."""
    reports = alternate(services, 2)  # offer, request, send, commit
    (point_id,) = [o.result["point"] for r in reports for o in r.jobs if o.kind == BACKUP]
    receipt_file = region_root(east) / "inbox" / WEST / "copy" / point_id / "receipt"
    assert receipt_file.is_file()
    receipt_file.unlink()  # lost

    services.now = T0 + DEFAULT_COPY_GRACE - timedelta(minutes=1)
    assert ran(services.tick(EAST)) == {}  # in flight: no offer yet
    services.now = T0 + DEFAULT_COPY_GRACE
    assert COPY_OFFER in ran(services.tick(EAST))
    w = services.tick(WEST)
    assert ran(w) == {COPY_REQUEST: JobStatus.DONE}
    answered = result_of(w, COPY_REQUEST)
    assert answered["receipt"] is True and answered["chunks_requested"] == 0
    assert answered["existing"] == copies_in_west(services)[0].id
    # no request went back, only the receipt; west's inbox holds nothing for the point
    assert inbox_names(east) == [f"{WEST}/copy/{point_id}/receipt"]
    assert inbox_names(west) == []
    e = services.tick(EAST)
    assert ran(e) == {COPY_RECEIPT: JobStatus.DONE}
    assert tracker_receipt(services, point_id) is not None
    services.now = T0 + 3 * DEFAULT_COPY_GRACE
    assert COPY_OFFER not in ran(services.tick(EAST))
    services.keys_held_apart()


def test_receipts_are_sealed_for_the_source_alone(site: Site, east: Region, west: Region) -> None:
    sent = datetime(2026, 11, 25, 1, 2, tzinfo=UTC)
    receipt = CopyReceipt("a" * 32, EAST, WEST, "b" * 32, sent, sent + timedelta(days=7))
    payload = seal_receipt(east.sealer(), receipt)
    assert b"b" * 32 not in payload and WEST.encode() not in payload
    assert open_receipt(east.keys, "a" * 32, payload, source=EAST, destination=WEST) == receipt
    with pytest.raises(KeyAccessDenied):
        open_receipt(west.keys, "a" * 32, payload, source=EAST, destination=WEST)
    with pytest.raises((KeyAccessDenied, IntegrityError)):  # bound to its point's name
        open_receipt(east.keys, "c" * 32, payload, source=EAST, destination=WEST)
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(IntegrityError, match=receipt_name("a" * 32)):
        open_receipt(east.keys, "a" * 32, bytes(damaged), source=EAST, destination=WEST)
    # the tracker keeps it sealed under east's own repository keys
    repo = Repository.init_or_open(east.vault, east.keys, region=EAST)
    tracker = CopyTracker(repo)
    assert tracker.record(receipt) is True and tracker.record(receipt) is False
    assert tracker.receipt(WEST, "a" * 32) == receipt
    assert tracker.receipt(EAST, "a" * 32) is None
    with pytest.raises(RegionVaultError, match="cannot be kept"):
        tracker.record(CopyReceipt("a" * 32, WEST, EAST, "b" * 32, sent, None))
    assert tracker.tidy(set()) == 1 and tracker.receipt(WEST, "a" * 32) is None


def test_a_whole_site_tick_is_unchanged(site: Site, instance: Instance) -> None:
    """tick() with no region still copies with one ``copy`` job, and leaves no receipt."""
    report = Service(Engine(site)).tick()
    assert report.region is None and report.ok
    assert {o.kind for o in report.jobs} == {TAG, BACKUP, "copy", "retention"}
    assert inbox_names(site.region("east")) == inbox_names(site.region("west")) == []


# --------------------------------------------------------------------------- the command


def test_tick_region_on_the_command_line(services: Services) -> None:
    def tick(region: str, *more: str) -> Any:
        site_file = services.files[f"local:{region}"]
        args = ["--site", str(site_file), "tick", "--region", region, *more]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result

    first = json.loads(tick("east", "--json").stdout)
    assert first["region"] == EAST and first["ok"] is True
    kinds = {j["kind"]: j["status"] for j in first["jobs"]}
    assert kinds[BACKUP] == kinds[COPY_OFFER] == "done"
    text = tick("west", "--copy-grace", "2h").stdout
    assert "local:west: due 0" in text
    assert any(
        line.startswith("done") and "copy-request/local:west/" in line for line in text.splitlines()
    )
    bad = CliRunner().invoke(
        cli, ["--site", str(services.files[EAST]), "tick", "--copy-grace", "1h"]
    )
    assert bad.exit_code == 2 and "--region" in bad.stderr
    bad = CliRunner().invoke(
        cli, ["--site", str(services.files[EAST]), "run", "-r", "east", "--copy-grace", "soon"]
    )
    assert bad.exit_code == 2 and "--copy-grace" in bad.stderr
    ran_once = CliRunner().invoke(
        cli,
        [
            "--site",
            str(services.files[EAST]),
            "run",
            "-r",
            "east",
            "--max-ticks",
            "1",
            "--interval",
            "1s",
        ],
    )
    assert ran_once.exit_code == 0 and "stopped after 1 tick(s)" in ran_once.stderr


def test_an_answer_whose_receipt_still_waits_leaves_it_for_a_create_only_sender(
    services: Services, east: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination answers again (an offer met twice) while its first receipt still
    waits in the source's inbox, through a link that may only create payloads (as a Cloud
    Storage sender with storage.objects.create alone): the send is refused with
    PayloadWaiting, the waiting receipt stands, and the source takes it in."""
    reports = alternate(services, 2)  # offer, request, send, commit: the receipt waits
    (point_id,) = [o.result["point"] for r in reports for o in r.jobs if o.kind == BACKUP]
    receipt_file = region_root(east) / "inbox" / WEST / "copy" / point_id / "receipt"
    waiting = receipt_file.read_bytes()
    original_send = LocalTransit.send
    refused: list[str] = []

    def create_only(self: LocalTransit, name: str, payload: bytes | memoryview) -> None:
        if self.has(name):
            refused.append(name)
            raise PayloadWaiting(f"{name} still waits (create-only, injected)")
        original_send(self, name, payload)

    monkeypatch.setattr(LocalTransit, "send", create_only)
    with services.engine(WEST) as engine:
        flow = CopyFlow(engine)
        with flow._links_closed(engine.copy_receiver(EAST, WEST)) as receiver:
            found = flow._answer_with_receipt(receiver, point_id)
    assert found is not None and found.id == copies_in_west(services)[0].id
    assert refused == [receipt_name(point_id)]
    assert receipt_file.read_bytes() == waiting  # the first receipt stands, whole
    assert ran(services.tick(EAST)) == {COPY_RECEIPT: JobStatus.DONE}
    assert tracker_receipt(services, point_id) is not None
    services.keys_held_apart()
