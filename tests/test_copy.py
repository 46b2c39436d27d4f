"""Cross-region copy (core/repository/copy/): key isolation, incremental
transfer, resume after an interruption, nothing plaintext in an inbox, sealed payloads."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import blake3
import pytest
from clock_support import stopped_clock
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import (
    IntegrityError,
    KeyAccessDenied,
    RegionVaultError,
    TransitError,
)
from regionvault.core.interfaces import KeyService, Sealer, Transit
from regionvault.core.pipeline import Engine, Service, job_handlers
from regionvault.core.pipeline.executor import execute_job
from regionvault.core.pipeline.jobs import (
    COPY_COMMIT,
    COPY_OFFER,
    COPY_REQUEST,
    COPY_SEND,
    Job,
    JobStatus,
    copy_jobs_for,
    copy_phase_job,
)
from regionvault.core.plugins import hookimpl
from regionvault.core.repository import (
    CopyReceiver,
    CopyResult,
    CopySender,
    Repository,
    RepositorySettings,
    TransitSession,
    TreeEntry,
    UnsealedKeys,
    _crypto,
    _manifest,
    copy_point,
    open_payload,
    seal_payload,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._store import config_context
from regionvault.core.repository.copy.batches import decode_chunks
from regionvault.core.repository.copy.offer import make_offer
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance, RecoveryPoint
from regionvault.providers.local.keys import LocalKeyService
from repository_support import snapshot
from site_support import open_site, region_root, worker_site

MiB = 1 << 20
#: small packs, so that a few MiB of data make several packs on each side
SETTINGS = RepositorySettings(pack_size=2 * MiB, workers=2)


# --------------------------------------------------------------------------- helpers


def write_mixed(root: Path, *, files: int, file_size: int, seed: int) -> None:
    """Half incompressible random files, half compressible text."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(3000)
    ]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        if i % 2 == 0:
            (root / f"random-{i:02d}.bin").write_bytes(rng.randbytes(file_size))
        else:
            text = bytearray()
            while len(text) < file_size:
                text += (" ".join(rng.choices(words, k=200)) + "\n").encode()
            (root / f"text-{i:02d}.txt").write_bytes(bytes(text[:file_size]))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "small.cfg").write_text("subscribers = 40\n")


def fragments(root: Path, *, every: int = 256 << 10, size: int = 48) -> list[bytes]:
    """Pieces of the plaintext to look for: ``size`` bytes every ``every`` bytes of each file."""
    out: list[bytes] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out.extend(data[i : i + size] for i in range(0, max(1, len(data) - size), every))
    return [f for f in out if len(f) >= 16]


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.exists():
            yield from (p for p in root.rglob("*") if p.is_file())


def found_in(needles: dict[bytes, str], *roots: Path) -> list[str]:
    """Which needles (by label) appear as bytes in any file under ``roots``."""
    hits: list[str] = []
    for path in files_under(*roots):
        data = path.read_bytes()
        hits.extend(f"{label} in {path}" for needle, label in needles.items() if needle in data)
    return hits


def vault_dir(region: Region) -> Path:
    return region_root(region) / "vault"


def inbox_dir(region: Region) -> Path:
    return region_root(region) / "inbox"


def pack_headers(repo: Repository) -> list[tuple[str, fmt.PackHeader]]:
    out = []
    for info in repo.vault.list(fmt.PACK_PREFIX):
        data = repo.vault.get(info.name, length=4096)
        out.append((info.name, fmt.PackHeader.parse(info.name, data)))
    return out


def data_keys(repo: Repository) -> dict[bytes, bytes]:
    """``{wrapped: plaintext}`` of every pack's data key, unwrapped with the repo's own keys."""
    store = repo._ensure_open()
    return {
        header.wrapped_key: repo.keys.unwrap(
            header.wrapped_key, store.data_key_context(header.run_id)
        )
        for _, header in pack_headers(repo)
    }


def chunk_ids(repo: Repository, point_id: str) -> set[bytes]:
    """Every chunk id a point uses: its tree chunks and its files' data chunks."""
    manifest = repo.load_manifest(point_id)
    ids = set(manifest.tree_chunks)
    for entry in repo.entries(manifest):
        assert isinstance(entry, TreeEntry)
        ids.update(entry.chunks)
    return ids


def data_chunk_ids(repo: Repository, point_id: str) -> set[bytes]:
    ids: set[bytes] = set()
    for entry in repo.entries(point_id):
        assert isinstance(entry, TreeEntry)
        ids.update(entry.chunks)
    return ids


def stored_size(repo: Repository, ids: set[bytes]) -> int:
    """Bytes these chunks take in the repository's packs (compressed, encrypted)."""
    index = repo._ensure_open().load_index().index
    total = 0
    for chunk_id in ids:
        loc = index.get(chunk_id)
        assert loc is not None
        total += loc.length
    return total


class FlakyTransit(Transit):
    """A Transit that delivers through ``inner`` and breaks on the ``fail_at``-th batch.

    ``delivered_then_fail``: that batch lands in the inbox, then the sender sees an error (a
    lost acknowledgement); otherwise it never lands. ``opened`` opens each delivered batch
    (the test holds the destination's keys) so the test knows which chunks crossed."""

    def __init__(
        self,
        inner: Transit,
        *,
        fail_at: int | None,
        delivered_then_fail: bool = False,
        opened: Callable[[str, bytes], None] | None = None,
        pause: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            provider=inner.provider,
            source=inner.source,
            region=inner.region,
            capabilities=inner.capabilities,
        )
        self.inner = inner
        self.fail_at = fail_at
        self.delivered_then_fail = delivered_then_fail
        self.opened = opened
        self.pause = pause
        self.batches = 0

    def send(self, name: str, payload: bytes | memoryview) -> None:
        if "/batch-" in name:
            self.batches += 1
            if self.pause is not None:
                self.pause(self.batches)
            if self.batches == self.fail_at and not self.delivered_then_fail:
                raise TransitError(f"link down while sending {name}")
            self.inner.send(name, payload)
            if self.opened is not None:
                self.opened(name, bytes(payload))
            if self.batches == self.fail_at:
                raise TransitError(f"lost the acknowledgement of {name}")
            return
        self.inner.send(name, payload)

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def inbox(self, prefix: str = "") -> Iterator[str]:
        return self.inner.inbox(prefix)

    def receive(self, name: str) -> bytes:
        return self.inner.receive(name)

    def discard(self, name: str) -> None:
        self.inner.discard(name)

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent


@pytest.fixture
def engine(site: Site) -> Engine:
    return Engine(site, settings=SETTINGS)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "nf-data"
    write_mixed(root, files=6, file_size=512 << 10, seed=7)
    return root


@pytest.fixture
def instance(east: Region, dataset: Path) -> Instance:
    return east.compute.register_instance("nf-1", dataset, tags={"backup": "1-7"})


def direct_copy(
    engine: Engine,
    point_id: str,
    *,
    forward: Transit | None = None,
    batch_bytes: int = 256 << 10,
) -> CopyResult:
    """core.copy.copy_point between east and west, with a Transit the test may wrap."""
    site = engine.site
    east, west = site.region("east"), site.region("west")
    return copy_point(
        source=engine.repository(east.name),
        destination=engine.repository(west.name),
        forward=forward or site.transit(east.name, west.name),
        backward=site.transit(west.name, east.name),
        seal_to_destination=west.sealer(),
        seal_to_source=east.sealer(),
        point_id=point_id,
        expires_at=None,
        batch_bytes=batch_bytes,
    )


def restore_in(region: Region, point_id: str, target: Path) -> None:
    """Restore with a repository opened afresh on ``region``'s own vault and keys."""
    Repository.open(region.vault, region.keys, region=region.name).restore(point_id, target)


# --------------------------------------------------------------------------- key isolation


def test_copy_re_encrypts_under_the_destinations_keys(
    engine: Engine, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = engine.backup(instance.id)
    result = engine.copy(point.id, to="west")
    copy = result.point
    assert copy.region == west.name and copy.id != point.id
    assert copy.lineage is not None
    assert (copy.lineage.source_region, copy.lineage.source_recovery_point) == (
        east.name,
        point.id,
    )
    assert result.chunks_sent == result.chunks_total > 0

    east_repo, west_repo = engine.repository("east"), engine.repository("west")
    east_store = east_repo._ensure_open()
    east_keys = data_keys(east_repo)
    assert east_keys, "east wrote no packs?"
    secrets: dict[bytes, str] = {}
    for wrapped, plain in east_keys.items():
        secrets[wrapped] = "an east wrapped data key"
        secrets[plain] = "an east data key"
    for chunk_id in chunk_ids(east_repo, point.id):
        secrets[chunk_id] = f"east chunk id {chunk_id.hex()[:12]}"
    secrets[east_store.config.chunk_id_key] = "east's chunk-id key"
    secrets[east_store.config.master_key] = "east's master key"
    assert len(secrets) > 20

    # nothing of east's key or id material in any file of west's vault or inbox
    assert found_in(secrets, vault_dir(west), inbox_dir(west)) == []
    # ... while the scan does find what is there (it is not blind)
    west_keys = data_keys(west_repo)
    west_needles = {plain: "west data key" for plain in west_keys.values()}
    west_needles.update({w: "west wrapped key" for w in west_keys})
    assert found_in(west_needles, vault_dir(west))
    # the copy uses data keys east never saw, and chunk ids of its own
    assert not set(west_keys.values()) & set(east_keys.values())
    assert not chunk_ids(west_repo, copy.id) & chunk_ids(east_repo, point.id)

    # east's KeyService fails on every object of west's vault
    with pytest.raises(KeyAccessDenied, match="config"):
        Repository.open(west.vault, east.keys, region=west.name).points()
    west_store = west_repo._ensure_open()
    config = fmt.EnvelopeHeader.parse("config", west.vault.get("config"), fmt.ObjectKind.CONFIG)
    with pytest.raises(KeyAccessDenied):
        east.keys.unwrap(config.wrapped_key, config_context(west.vault.vault_id))
    headers = pack_headers(west_repo)
    assert headers
    for _name, header in headers:
        context = west_store.data_key_context(header.run_id)
        assert west.keys.unwrap(header.wrapped_key, context)  # the right context
        with pytest.raises(KeyAccessDenied):
            east.keys.unwrap(header.wrapped_key, context)
    kinds = {
        fmt.INDEX_PREFIX: fmt.ObjectKind.INDEX,
        fmt.POINT_PREFIX: fmt.ObjectKind.MANIFEST,
        "links/": fmt.ObjectKind.LINKS,
    }
    opened = 0
    for prefix, kind in kinds.items():
        for info in west.vault.list(prefix):
            data = west.vault.get(info.name)
            envelope = fmt.EnvelopeHeader.parse(info.name, data, kind)
            # west's own master key opens it, east's does not
            west_store.open_sealed(kind, info.name, data)
            with pytest.raises(IntegrityError, match="wrong key"):
                _crypto.open_sealed(
                    vault_id=west.vault.vault_id,
                    name=info.name,
                    data=data,
                    header=envelope,
                    secret=east_store.config.master_key,
                )
            opened += 1
    assert opened >= 3  # at least an index, the manifest and a link table

    # west's keys alone restore it, byte-exact, with east gone entirely
    engine.site.close()
    shutil.rmtree(region_root(east))
    out = tmp_path / "restored"
    restore_in(west, copy.id, out)
    assert snapshot(out) == snapshot(dataset)


def raw_records(repo: Repository, point_id: str) -> list[fmt.RawRecord]:
    store = repo._ensure_open()
    manifest = repo.load_manifest(point_id)
    with repo._pool() as pool:
        return list(_manifest.tree_records(store, store.load_index().index, pool, manifest))


def test_a_copy_carries_no_change_token_of_its_source(
    engine: Engine, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    """A change token is keyed by the source vault: meaningless in another, so it is
    neither sent nor stored there."""
    point = engine.backup(instance.id)
    east_repo, west_repo = engine.repository("east"), engine.repository("west")
    files = [r for r in raw_records(east_repo, point.id) if r.tag == fmt.TAG_FILE]
    assert files and all(r.change for r in files)  # the source keeps its own
    offer = make_offer(east_repo._ensure_open(), east_repo.load_manifest(point.id))
    sent = list(offer.records(fmt.point_name(point.id)))
    assert [r.path for r in sent] == [r.path for r in raw_records(east_repo, point.id)]
    assert not [r.path for r in sent if r.change]
    copy = engine.copy(point.id, to="west").point
    copied = raw_records(west_repo, copy.id)
    assert len(copied) == len(sent) and not [r.path for r in copied if r.change]
    restore_in(engine.site.region("west"), copy.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def test_a_payload_sealed_for_west_opens_only_in_west(east: Region, west: Region) -> None:
    body = b"the payload body " * 100
    name = "copy/abc/offer"
    sealed = seal_payload(
        west.sealer(), name, body, kind="offer", source=east.name, destination=west.name
    )
    assert body[:32] not in sealed
    ctx: dict[str, Any] = {"kind": "offer", "source": east.name, "destination": west.name}
    assert open_payload(west.keys, name, sealed, **ctx) == body
    with pytest.raises(KeyAccessDenied):
        open_payload(east.keys, name, sealed, **ctx)
    # bound to its name, kind and direction
    with pytest.raises((KeyAccessDenied, IntegrityError)):
        open_payload(west.keys, "copy/abc/other", sealed, **ctx)
    with pytest.raises(KeyAccessDenied):
        open_payload(west.keys, name, sealed, kind="batch", source=east.name, destination=west.name)
    with pytest.raises(KeyAccessDenied):
        open_payload(west.keys, name, sealed, kind="offer", source=west.name, destination=east.name)


class _CountingSealer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seals = 0

    def seal(self, secret: bytes, context: dict[str, str]) -> bytes:
        self.seals += 1
        sealed: bytes = self.inner.seal(secret, context)
        return sealed


class _CountingKeys:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.unseals = 0

    def unseal(self, sealed: bytes, context: dict[str, str]) -> bytes:
        self.unseals += 1
        secret: bytes = self.inner.unseal(sealed, context)
        return secret


def test_a_session_seals_its_transfer_key_once_and_binds_every_payload_to_its_name(
    east: Region, west: Region
) -> None:
    sealer = _CountingSealer(west.sealer())
    session = TransitSession(
        cast(Sealer, sealer), kind="batch", source=east.name, destination=west.name
    )
    bodies = {f"copy/abc/batch-{i:06d}": f"batch {i} ".encode() * 500 for i in range(6)}
    sealed = {name: session.seal(name, body) for name, body in bodies.items()}
    assert sealer.seals == 1
    assert all(body[:40] not in sealed[name] for name, body in bodies.items())
    keys = _CountingKeys(west.keys)
    unsealed: UnsealedKeys = {}
    ctx: dict[str, Any] = {"kind": "batch", "source": east.name, "destination": west.name}
    for name, body in bodies.items():
        got = open_payload(cast(KeyService, keys), name, sealed[name], unsealed=unsealed, **ctx)
        assert got == body
    assert keys.unseals == 1  # the receiver unsealed the session's key once
    first, second = list(bodies)[:2]
    # one session key, but each payload is bound to its own name: swapping two fails
    with pytest.raises(IntegrityError, match=second):
        open_payload(west.keys, second, sealed[first], unsealed=unsealed, **ctx)
    # the cached key is not handed out for another kind or direction, nor to another region
    with pytest.raises(KeyAccessDenied):
        open_payload(west.keys, first, sealed[first], unsealed=unsealed, kind="offer",
                     source=east.name, destination=west.name)  # fmt: skip
    with pytest.raises(KeyAccessDenied):
        open_payload(east.keys, first, sealed[first], **ctx)


def test_a_payload_sealed_by_an_older_version_still_opens(east: Region, west: Region) -> None:
    """Format RVT1 (a transfer key per payload, its name in the seal context), as a batch
    left in an inbox by an older version would be."""
    name, body = "copy/abc/batch-old-000000", b"old batch " * 300
    key = AESGCM.generate_key(bit_length=256)
    context = {"purpose": "regionvault-transit", "kind": "batch", "name": name,
               "source": east.name, "destination": west.name}  # fmt: skip
    sealed_key = west.sealer().seal(key, context)
    nonce = os.urandom(12)
    head = b"RVT1" + len(sealed_key).to_bytes(2, "big") + sealed_key + nonce
    blob = head + AESGCM(key).encrypt(nonce, body, b"RVT1" + name.encode())
    payload = blob + blake3.blake3(blob).digest()
    ctx: dict[str, Any] = {"kind": "batch", "source": east.name, "destination": west.name}
    assert open_payload(west.keys, name, payload, **ctx) == body
    with pytest.raises(KeyAccessDenied):
        open_payload(west.keys, "copy/abc/other", payload, **ctx)


@pytest.mark.parametrize("where", [0, 5, 40, 0.5, -40, -1])
def test_a_flipped_bit_in_an_inbox_payload_is_an_integrity_error_naming_it(
    site: Site, east: Region, west: Region, where: float
) -> None:
    name = "copy/abc/batch-00-000001"
    transit = site.transit(east.name, west.name)
    payload = seal_payload(
        west.sealer(), name, b"x" * 5000, kind="batch", source=east.name, destination=west.name
    )
    transit.send(name, payload)
    path = inbox_dir(west) / east.name / name
    data = bytearray(path.read_bytes())
    at = int(len(data) * where) if isinstance(where, float) else where
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=name) as err:
        open_payload(
            west.keys,
            name,
            transit.receive(name),
            kind="batch",
            source=east.name,
            destination=west.name,
        )
    assert err.value.object_name == name


# --------------------------------------------------------------------------- incremental


@pytest.mark.slow
def test_an_incremental_copy_moves_little_more_than_the_new_chunks(
    engine: Engine, east: Region, west: Region, tmp_path: Path
) -> None:
    data = tmp_path / "big"
    write_mixed(data, files=10, file_size=2 * MiB, seed=11)  # 20 MiB, half of it text
    instance = east.compute.register_instance("nf-big", data, tags={"backup": "1-7"})
    first = engine.backup(instance.id)
    full = engine.copy(first.id, to="west")
    assert full.chunks_sent == full.chunks_total

    # change about 5%: a few in-place overwrites in random and text files, one new file
    rng = random.Random(3)
    changed = 0
    overwritten = sorted(data.glob("*-0[0-5].*"))
    for path in overwritten:
        with path.open("r+b") as f:
            # inside the file: 16 KiB written at most 64 KiB before its end
            f.seek(rng.randrange(0, 2 * MiB - (64 << 10)))
            f.write(rng.randbytes(16 << 10))
        changed += 16 << 10
    (data / "new.bin").write_bytes(rng.randbytes(MiB))
    changed += MiB
    assert len(overwritten) == 6
    assert all(p.stat().st_size == 2 * MiB for p in overwritten)  # overwritten, not grown
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 22 * MiB
    assert 0.04 < changed / (20 * MiB) < 0.08

    second = engine.backup(instance.id)
    east_repo = engine.repository("east")
    new_ids = data_chunk_ids(east_repo, second.id) - data_chunk_ids(east_repo, first.id)
    new_bytes = stored_size(east_repo, new_ids)
    assert 0 < new_bytes < 0.25 * full.bytes_forward

    incremental = engine.copy(second.id, to="west")
    assert incremental.chunks_sent == len(new_ids)
    assert incremental.bytes_forward <= 1.2 * new_bytes, (incremental, new_bytes)
    out = tmp_path / "out"
    restore_in(west, incremental.point.id, out)
    assert snapshot(out) == snapshot(data)


def test_copying_twice_returns_the_existing_copy(
    engine: Engine, west: Region, instance: Instance
) -> None:
    point = engine.backup(instance.id)
    first = engine.copy(point.id, to="west")
    again = engine.copy(point.id, to="west")
    assert again.existing and not first.existing
    assert again.point.id == first.point.id
    assert (again.bytes_forward, again.bytes_backward, again.chunks_sent) == (0, 0, 0)
    assert len(engine.repository("west").points()) == 1


def test_two_copies_of_one_point_at_once_commit_one_copy(
    site: Site, west: Region, instance: Instance, tmp_path: Path
) -> None:
    """Two runners copying the same point at the same moment (each past the "already
    copied?" check) race on one manifest name: exactly one copy exists afterwards."""
    point = Engine(site).backup(instance.id)
    results: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            engine = Engine(site)
            start.wait(timeout=30)
            results.append(engine.copy(point.id, to="west"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len({r.point.id for r in results}) == 1
    copies = Repository.open(west.vault, west.keys, region=west.name).points()
    assert [c.id for c in copies] == [results[0].point.id]
    out = tmp_path / "out"
    restore_in(west, copies[0].id, out)


def test_a_batch_another_run_took_in_is_no_error_and_the_copy_commits(
    engine: Engine, west: Region, instance: Instance, tmp_path: Path, dataset: Path
) -> None:
    """Two runs copying one point at once: the first to commit takes in what landed in the
    inbox, the other run's batches too. The other run, finding its batch gone, goes on, and
    its commit finds every chunk arrived (before, it failed: "not in the inbox")."""
    point = engine.backup(instance.id)
    sender = engine.copy_sender("local:east", "local:west")
    mine = engine.copy_receiver("local:east", "local:west")
    other = engine.copy_receiver("local:east", "local:west")
    sender.offer(point.id)
    mine.request(point.id)
    landed: list[str] = []
    sender.send(point.id, landed.append)
    assert landed
    for name in landed:  # the concurrent run takes every batch in first
        assert other.ingest(name)
    for name in landed:  # this run's own batches are gone: no error, nothing to take
        assert not mine.ingest(name)
    report = mine.commit(point.id)
    assert report.point.lineage is not None
    out = tmp_path / "out"
    restore_in(west, report.point.id, out)
    assert snapshot(out) == snapshot(dataset)


def test_copying_to_the_same_region_is_refused(engine: Engine, instance: Instance) -> None:
    point = engine.backup(instance.id)
    with pytest.raises(RegionVaultError, match="itself"):
        engine.copy(point.id, to="east")


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("delivered_then_fail", [False, True], ids=["lost", "unacknowledged"])
def test_an_interrupted_copy_resumes_without_sending_again(
    engine: Engine,
    east: Region,
    west: Region,
    instance: Instance,
    dataset: Path,
    tmp_path: Path,
    delivered_then_fail: bool,
) -> None:
    point = engine.backup(instance.id)
    arrived: dict[bytes, int] = {}
    batch_names: list[str] = []

    def opened(name: str, payload: bytes) -> None:
        body = open_payload(
            west.keys, name, payload, kind="batch", source=east.name, destination=west.name
        )
        batch_names.append(name)
        for chunk_id, _, _, _, stored in decode_chunks(name, body):
            assert chunk_id not in arrived, "a chunk crossed twice"
            arrived[chunk_id] = len(stored)

    inner = engine.site.transit(east.name, west.name)
    flaky = FlakyTransit(inner, fail_at=3, delivered_then_fail=delivered_then_fail, opened=opened)
    with pytest.raises(TransitError):
        direct_copy(engine, point.id, forward=flaky)
    first_run = dict(arrived)
    assert len(batch_names) == (3 if delivered_then_fail else 2)

    # no half copy is visible in west, and west's vault is sound
    west_repo = engine.repository("west")
    assert west_repo.points() == []
    assert west_repo.verify().ok

    # nothing in the inboxes is plaintext (or east's chunk ids, or data keys)
    needles = {f: "plaintext" for f in fragments(dataset)}
    needles.update({c: "east chunk id" for c in chunk_ids(engine.repository("east"), point.id)})
    for plain in data_keys(engine.repository("east")).values():
        needles[plain] = "east data key"
    inbox_files = list(files_under(inbox_dir(west), inbox_dir(east)))
    assert any("offer" in p.name for p in inbox_files)
    if delivered_then_fail:
        assert any("batch-" in p.name for p in inbox_files)  # the unacknowledged batch
    assert found_in(needles, inbox_dir(west), inbox_dir(east)) == []

    # the second run sends only what had not arrived
    total_chunks = len(data_chunk_ids(engine.repository("east"), point.id))
    arrived.clear()
    resumed = direct_copy(
        engine, point.id, forward=FlakyTransit(inner, fail_at=None, opened=opened)
    )
    assert not set(arrived) & set(first_run)
    assert set(arrived) | set(first_run) == data_chunk_ids(engine.repository("east"), point.id)
    assert resumed.chunks_total == total_chunks
    assert resumed.chunks_sent == total_chunks - len(first_run)
    assert resumed.chunks_sent == len(arrived)
    first_bytes = sum(first_run.values())
    assert first_bytes > 0
    # what crossed again: the offer and the rest of the chunks (plus framing), not the rest
    offer_and_framing = resumed.bytes_forward - sum(arrived.values())
    assert 0 < offer_and_framing < first_bytes
    assert list(files_under(inbox_dir(west))) == []  # every payload was taken in

    copies = west_repo.points()
    assert [c.id for c in copies] == [resumed.point.id]
    out = tmp_path / "out"
    restore_in(west, resumed.point.id, out)
    assert snapshot(out) == snapshot(dataset)
    assert west_repo.verify(read_data=True).ok


def test_a_damaged_leftover_batch_is_dropped_and_sent_again(
    engine: Engine, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = engine.backup(instance.id)
    inner = engine.site.transit(east.name, west.name)
    flaky = FlakyTransit(inner, fail_at=1, delivered_then_fail=True)
    with pytest.raises(TransitError):
        direct_copy(engine, point.id, forward=flaky)
    (leftover,) = [p for p in files_under(inbox_dir(west)) if "batch-" in p.name]
    data = bytearray(leftover.read_bytes())
    data[len(data) // 2] ^= 1
    leftover.write_bytes(bytes(data))

    resumed = direct_copy(engine, point.id)
    assert resumed.chunks_sent == resumed.chunks_total  # the damaged batch's chunks again
    assert not leftover.exists()
    out = tmp_path / "out"
    restore_in(west, resumed.point.id, out)
    assert snapshot(out) == snapshot(dataset)


def test_a_prune_in_west_between_two_runs_loses_nothing(
    engine: Engine, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = engine.backup(instance.id)
    inner = engine.site.transit(east.name, west.name)
    with pytest.raises(TransitError):
        direct_copy(engine, point.id, forward=FlakyTransit(inner, fail_at=3))
    # the chunks that arrived belong to no point yet: prune collects them ...
    engine.repository("west").prune()
    # ... and the copy asks for them again instead of trusting its links
    resumed = direct_copy(engine, point.id)
    assert resumed.chunks_sent == resumed.chunks_total
    out = tmp_path / "out"
    restore_in(west, resumed.point.id, out)
    assert snapshot(out) == snapshot(dataset)


def test_a_prune_in_west_waits_for_a_running_copy(
    engine: Engine, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = engine.backup(instance.id)
    pruning = threading.Event()
    pruned = threading.Event()
    errors: list[BaseException] = []

    def prune_in_west() -> None:
        try:
            # its own Repository object, as another process would have
            Repository.open(west.vault, west.keys, region=west.name).prune()
        except BaseException as exc:
            errors.append(exc)
        finally:
            pruned.set()

    def pause(batch: int) -> None:
        if batch == 3:  # two batches are ingested and not yet referenced by any manifest
            threading.Thread(target=prune_in_west, daemon=True).start()
            pruning.set()
            pruned.wait(timeout=1.0)  # without a lock it would be done by now

    inner = engine.site.transit(east.name, west.name)
    result = direct_copy(engine, point.id, forward=FlakyTransit(inner, fail_at=None, pause=pause))
    assert pruning.is_set()
    assert pruned.wait(timeout=60)
    assert errors == []
    west_repo = Repository.open(west.vault, west.keys, region=west.name)
    assert west_repo.verify(read_data=True).ok
    out = tmp_path / "out"
    west_repo.restore(result.point.id, out)
    assert snapshot(out) == snapshot(dataset)


def test_the_copy_records_lineage_and_policy(
    engine: Engine, east: Region, instance: Instance
) -> None:
    point = engine.backup(instance.id)
    copy = engine.copy(point.id, to="west").point
    listed = engine.repository("west").points()
    assert [p.id for p in listed] == [copy.id]
    (stored,) = listed
    assert stored.lineage == copy.lineage
    assert (stored.instance_id, stored.instance_name) == (instance.id, "nf-1")
    assert stored.policy == point.policy
    assert stored.size == point.size
    # the copy's own manifest keeps the source's capture time
    east_manifest = engine.repository("east").load_manifest(point.id)
    west_manifest = engine.repository("west").load_manifest(copy.id)
    assert west_manifest.taken_at == east_manifest.taken_at
    assert west_manifest.root_hash != east_manifest.root_hash


# --------------------------------------------------------------------------- one region per half

PHASE_REGION = {
    COPY_OFFER: "local:east",
    COPY_REQUEST: "local:west",
    COPY_SEND: "local:east",
    COPY_COMMIT: "local:west",
}


class KeyGuard:
    """Watches every LocalKeyService call that needs a region's secrets (unwrap, unseal,
    generate_data_key), whichever site or engine makes it: records the region, and fails
    the call when that region is forbidden right now."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forbidden: set[str] = set()
        self.used: set[str] = set()
        for method in ("unwrap", "unseal", "generate_data_key"):
            original = getattr(LocalKeyService, method)

            def guarded(
                keys: LocalKeyService,
                *args: Any,
                _original: Callable[..., Any] = original,
                _method: str = method,
                **kwargs: Any,
            ) -> Any:
                self.used.add(keys.region)
                if keys.region in self.forbidden:
                    raise AssertionError(f"{_method} on {keys.region}'s KeyService")
                return _original(keys, *args, **kwargs)

            monkeypatch.setattr(LocalKeyService, method, guarded)

    @contextlib.contextmanager
    def only(self, region: str, *others: str) -> Iterator[set[str]]:
        """Forbid every region but ``region`` (yields the regions used meanwhile)."""
        self.forbidden, self.used = {r for r in others if r != region}, set()
        try:
            yield self.used
        finally:
            self.forbidden = set()


class CopyRecorder:
    def __init__(self) -> None:
        self.copies: list[tuple[str, str, RecoveryPoint, RecoveryPoint]] = []

    @hookimpl
    def regionvault_after_copy(
        self, source_region: str, region: str, source: RecoveryPoint, copy: RecoveryPoint
    ) -> None:
        self.copies.append((source_region, region, source, copy))


@contextlib.contextmanager
def worker(path: Path, *plugins: object) -> Iterator[Engine]:
    """A fresh engine on a worker's own site, as a new worker process would have."""
    with open_site(path, *plugins) as s:
        yield Engine(s, settings=SETTINGS)


def run_phase(engine: Engine, job: Job) -> Any:
    """The job's handler, run directly (no ledger), as a re-run after a lost record would."""
    return job_handlers(engine).get(job.kind)(job)


def test_the_four_phase_jobs_copy_with_one_regions_keys_each(
    engine: Engine,
    east: Region,
    west: Region,
    instance: Instance,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    point = engine.backup(instance.id)
    west.sealer()  # west's keys exist (its KeyService made them on first use)
    east_site = worker_site(tmp_path / "worker-east", east, west, replicate=True)
    west_site = worker_site(tmp_path / "worker-west", west, east, replicate=True)
    recorder = CopyRecorder()
    guard = KeyGuard(monkeypatch)
    expires = datetime(2031, 1, 2, 3, 4, tzinfo=UTC)

    jobs = copy_jobs_for(east.name, point.id, west.name, expires_at=expires)
    assert [(j.kind, j.region) for j in jobs] == list(PHASE_REGION.items())
    results = {}
    for job in jobs:
        job = Job.from_json(job.to_json())  # it crosses a queue as JSON
        own = east if job.region == east.name else west
        path = east_site if own is east else west_site
        with (
            worker(path, recorder) as phase_engine,
            guard.only(own.name, east.name, west.name) as used,
        ):
            outcome = execute_job(job, job_handlers(phase_engine), phase_engine.ledger())
        assert outcome.status is JobStatus.DONE, outcome.error
        assert used == {own.name}, (job.kind, used)
        results[job.kind] = outcome.result

    assert results[COPY_REQUEST]["chunks_requested"] == results[COPY_REQUEST]["chunks_total"] > 0
    assert results[COPY_SEND]["chunks_sent"] == results[COPY_REQUEST]["chunks_requested"]
    assert results[COPY_COMMIT]["existing"] is False
    # neither worker ever held, or made, the other region's secret keys
    for public in tmp_path.glob("public-of-*"):
        assert sorted(p.name for p in (public / "keys").iterdir()) == ["sealing.pub"]
    # the hook ran in west's worker, with east's point as the offer described it
    ((src_region, region, source, copy),) = recorder.copies
    assert (src_region, region) == (east.name, west.name)
    assert (source.id, source.region, source.created_at) == (point.id, east.name, point.created_at)
    assert copy.id == results[COPY_COMMIT]["copy"]
    assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id
    assert copy.expires_at == expires
    assert list(files_under(inbox_dir(west), inbox_dir(east))) == []

    # the same jobs again: every key replays, nothing runs
    for job in jobs:
        path = east_site if job.region == east.name else west_site
        with worker(path) as phase_engine:
            again = execute_job(job, job_handlers(phase_engine), phase_engine.ledger())
        assert again.status is JobStatus.REPLAYED
    # west's keys alone restore it, byte-exact, with east gone
    engine.site.close()
    shutil.rmtree(region_root(east))
    out = tmp_path / "restored"
    restore_in(west, copy.id, out)
    assert snapshot(out) == snapshot(dataset)


def test_rerunning_any_phase_is_harmless(
    site: Site, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = Engine(site, settings=SETTINGS).backup(instance.id)
    jobs = copy_jobs_for("local:east", point.id, "local:west", expires_at=None)
    offer, request, send, commit = jobs

    def run(job: Job) -> Any:
        return run_phase(Engine(site, settings=SETTINGS), job)  # a fresh engine each time

    run(offer)
    run(offer)  # replaces the offer
    first = run(request)
    again = run(request)  # asks again for the same chunks: nothing arrived meanwhile
    assert again["chunks_requested"] == first["chunks_requested"] == first["chunks_total"]
    sent = run(send)
    assert sent["requested"] and sent["chunks_sent"] == first["chunks_total"]
    assert run(send) == {"requested": False, "chunks_sent": 0, "batches": 0, "bytes_sent": 0}
    committed = run(commit)
    assert committed["existing"] is False and committed["batches_ingested"] == sent["batches"]
    assert run(commit) == {"copy": committed["copy"], "existing": True, "batches_ingested": 0}
    # the whole chain once more: the offer is dropped, nothing is requested or sent
    run(offer)
    assert run(request)["existing"] == committed["copy"]
    assert run(send)["requested"] is False
    assert run(commit)["existing"] is True
    assert [p.id for p in Engine(site).repository("west").points()] == [committed["copy"]]
    assert list(files_under(inbox_dir(west), inbox_dir(site.region("east")))) == []
    restore_in(west, committed["copy"], tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def halves(engine: Engine, *, forward: Transit | None = None) -> tuple[CopySender, CopyReceiver]:
    site = engine.site
    east, west = site.region("east"), site.region("west")
    forward = forward or site.transit(east.name, west.name)
    backward = site.transit(west.name, east.name)
    sender = CopySender(
        engine.repository(east.name),
        forward=forward,
        backward=backward,
        seal_to_destination=west.sealer(),
        batch_bytes=256 << 10,
    )
    receiver = CopyReceiver(
        engine.repository(west.name),
        forward=forward,
        backward=backward,
        seal_to_source=east.sealer(),
    )
    return sender, receiver


def test_a_send_that_crashed_resumes_with_the_next_request(
    site: Site, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    point = Engine(site, settings=SETTINGS).backup(instance.id)
    crossed: list[set[bytes]] = [set(), set()]
    run = 0

    def opened(name: str, payload: bytes) -> None:
        body = open_payload(
            west.keys, name, payload, kind="batch", source=east.name, destination=west.name
        )
        crossed[run].update(chunk_id for chunk_id, *_ in decode_chunks(name, body))

    inner = site.transit(east.name, west.name)
    # run 1: the source dies while sending its third batch; the receiver ran nothing since
    # its request (each half in its own engine, as in its own process)
    sender, _ = halves(
        Engine(site, settings=SETTINGS), forward=FlakyTransit(inner, fail_at=3, opened=opened)
    )
    _, receiver = halves(Engine(site, settings=SETTINGS))
    sender.offer(point.id)
    asked = receiver.request(point.id, east.name)
    with pytest.raises(TransitError):
        sender.send(point.id)
    assert crossed[0] and len(crossed[0]) < asked.chunks_requested
    assert list(inner.inbox(f"copy/{point.id}/batch-"))  # two batches wait, not yet ingested
    with pytest.raises(RegionVaultError, match="has not arrived"):
        halves(Engine(site, settings=SETTINGS))[1].commit(point.id, east.name)

    # run 2, fresh halves: the request takes in what landed and asks for the rest only
    run = 1
    sender, _ = halves(
        Engine(site, settings=SETTINGS), forward=FlakyTransit(inner, fail_at=None, opened=opened)
    )
    _, receiver = halves(Engine(site, settings=SETTINGS))
    again = receiver.request(point.id, east.name)
    assert again.leftovers == 0  # the failed commit above took them in already
    assert again.chunks_requested == asked.chunks_requested - len(crossed[0])
    report = sender.send(point.id)
    assert report.chunks_sent == again.chunks_requested
    assert not crossed[0] & crossed[1]
    done = halves(Engine(site, settings=SETTINGS))[1].commit(point.id, east.name)
    assert not done.existing
    restore_in(west, done.point.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def test_a_prune_in_west_between_phases_is_healed_by_requesting_again(
    site: Site, east: Region, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    engine = Engine(site, settings=SETTINGS)
    point = engine.backup(instance.id)
    offer, request, send, commit = copy_jobs_for(east.name, point.id, west.name, expires_at=None)
    for job in (offer, request, send):
        run_phase(Engine(site, settings=SETTINGS), job)
    # the worker of west dies before its commit; the batches wait in its inbox, and a prune
    # of west meanwhile has nothing of them to collect
    Repository.open(west.vault, west.keys, region=west.name).prune()
    result = run_phase(Engine(site, settings=SETTINGS), commit)
    assert result["existing"] is False and result["batches_ingested"] > 0

    # a second point: this time the chunks are taken in (a commit that failed) and then
    # collected by a prune before the commit runs again
    (dataset / "extra.bin").write_bytes(random.Random(5).randbytes(300 << 10))
    second = engine.backup(instance.id)
    jobs = copy_jobs_for(east.name, second.id, west.name, expires_at=None)
    for job in jobs[:3]:
        run_phase(Engine(site, settings=SETTINGS), job)
    west_repo = Repository.open(west.vault, west.keys, region=west.name)
    receiver = halves(Engine(site, settings=SETTINGS))[1]
    receiver._take_leftovers(second.id)  # ingested, referenced by no manifest yet
    west_repo.prune()
    with pytest.raises(RegionVaultError, match="has not arrived"):
        run_phase(Engine(site, settings=SETTINGS), jobs[3])
    # the offer stays in west's inbox: request, send and commit again complete the copy
    asked = run_phase(Engine(site, settings=SETTINGS), jobs[1])
    assert asked["chunks_requested"] > 0
    run_phase(Engine(site, settings=SETTINGS), jobs[2])
    copy = run_phase(Engine(site, settings=SETTINGS), jobs[3])["copy"]
    restore_in(west, copy, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)
    assert west_repo.verify(read_data=True).ok


def test_a_tick_with_split_copies_runs_the_four_phases(
    site: Site, west: Region, instance: Instance, dataset: Path, tmp_path: Path
) -> None:
    # one moment for both ticks: past a slot boundary the second tick would back up anew
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS, split_copies=True)
    report = Service(engine).tick()
    assert report.ok, [o.error for o in report.failures()] + report.problems
    phases = [o.kind for o in report.jobs if o.kind.startswith("copy")]
    assert phases == [COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT]
    (point,) = [p for p in engine.repository("east").points() if p.lineage is None]
    (copy,) = engine.repository("west").points()
    assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id
    # the expiry the engine worked out (the policy's 7 days, from the source point)
    assert copy.expires_at == point.created_at + timedelta(days=7)
    # the next tick finds the copy held: no copy job at all
    again = Service(engine).tick()
    assert not [o for o in again.jobs if o.kind.startswith("copy")]
    restore_in(west, copy.id, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


def test_copy_phase_jobs_name_their_region_and_peer() -> None:
    expires = datetime(2030, 5, 6, 7, 8, tzinfo=UTC)
    slot = datetime(2030, 5, 1, tzinfo=UTC)
    jobs = copy_jobs_for("aws:us-east-1", "rp/1", "aws:eu-west-1", expires_at=expires, slot=slot)
    assert [j.key for j in jobs] == [
        "copy-offer/aws:us-east-1/rp%2F1/aws:eu-west-1/2030-05-01T00:00Z",
        "copy-request/aws:eu-west-1/rp%2F1/aws:us-east-1/2030-05-01T00:00Z",
        "copy-send/aws:us-east-1/rp%2F1/aws:eu-west-1/2030-05-01T00:00Z",
        "copy-commit/aws:eu-west-1/rp%2F1/aws:us-east-1/2030-05-01T00:00Z",
    ]
    for job in jobs:
        assert job.payload["source"] == "aws:us-east-1"
        assert job.payload["destination"] == "aws:eu-west-1"
        assert job.payload["recovery_point"] == "rp/1"
        assert Job.from_json(job.to_json()) == job
    assert jobs[3].payload["expires_at"] == expires.isoformat()
    assert copy_phase_job("send", "aws:us-east-1", "rp/1", "aws:eu-west-1").key == (
        "copy-send/aws:us-east-1/rp%2F1/aws:eu-west-1"
    )
    with pytest.raises(RegionVaultError, match="not a copy phase"):
        copy_phase_job("ingest", "aws:us-east-1", "rp-1", "aws:eu-west-1")
    with pytest.raises(RegionVaultError, match="itself"):
        copy_phase_job("offer", "aws:us-east-1", "rp-1", "aws:us-east-1")


def test_a_phase_job_runs_only_in_its_own_region(engine: Engine, instance: Instance) -> None:
    point = engine.backup(instance.id)
    offer = copy_phase_job("offer", "local:east", point.id, "local:west")
    misrouted = Job(offer.key, offer.kind, "local:west", offer.payload)
    with pytest.raises(RegionVaultError, match="runs in local:east"):
        run_phase(engine, misrouted)
    commit = copy_phase_job("commit", "local:west", point.id, "local:east")
    with pytest.raises(RegionVaultError, match="expires_at"):
        run_phase(engine, commit)
    with pytest.raises(RegionVaultError, match="no offer"):
        engine.copy_receiver("east", "west").request(point.id)
    # the engine's jobs carry the copy's expiry as Engine.copy works it out (the 1-7
    # policy's copy retention, from the source point's creation)
    jobs = engine.copy_jobs(point.id[:8], to="west")
    assert [j.payload["recovery_point"] for j in jobs] == [point.id] * 4
    assert jobs[3].payload["expires_at"] == (point.created_at + timedelta(days=7)).isoformat()
    with pytest.raises(RegionVaultError, match="itself"):
        engine.copy_jobs(point.id, to="east")


def test_each_half_refuses_transits_that_do_not_run_through_its_region(
    engine: Engine, east: Region, west: Region
) -> None:
    site = engine.site
    forward, backward = site.transit(east.name, west.name), site.transit(west.name, east.name)
    with pytest.raises(RegionVaultError, match="expected"):
        CopySender(
            engine.repository(west.name),
            forward=forward,
            backward=backward,
            seal_to_destination=west.sealer(),
        )
    with pytest.raises(RegionVaultError, match="expected"):
        CopyReceiver(
            engine.repository(west.name),
            forward=backward,
            backward=forward,
            seal_to_source=east.sealer(),
        )
    receiver = engine.copy_receiver(east.name, west.name)
    with pytest.raises(RegionVaultError, match="not from local:south"):
        receiver.request("rp-1", "local:south")
