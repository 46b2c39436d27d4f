"""The Cloud Storage Vault with the real google-cloud-storage client over HTTP against
gcp-storage-emulator (two buckets, two regions): the Vault suite with the provider's vaults
as fixtures, then what the suite cannot see: uploads and their chunks, ranged reads, paged
listings, the requests that set object retention and holds (the emulator drops both), Cloud
Storage's documented refusals mapped onto ``RetentionLocked``, and the request counts.

The emulator ignores ``ifGenerationMatch``: every test reaches it through the launcher's
precondition front (emulator.py), which applies Cloud Storage's documented rule for
``ifGenerationMatch=0``; a test here shows the emulator alone lets two if-absent puts of one
name both succeed, so the front is what makes the if-absent tests able to fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from regionvault.core.conformance import VaultSuite
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RetentionLocked,
    TransientError,
    UnsupportedOperation,
    VaultError,
)
from regionvault.core.interfaces import Vault
from regionvault.core.types import RetentionMode
from regionvault.providers.gcp.clients import operation_of
from regionvault.providers.gcp.emulator import GcsEmulator, free_port
from regionvault.providers.gcp.storage import GcsVault, crc32c_of
from storage_world import (
    EAST,
    WEST,
    Answer,
    GcsWorld,
    RecordingAdapter,
    Seen,
    gcs,
    gcs_error,
)

__all__ = ["gcs"]  # the fixtures, imported for pytest to find

MiB = 1024 * 1024

#: the suite's WORM checks the emulator cannot pass: it stores neither retention nor holds
EMULATOR_DROPS_WORM = (
    "gcp-storage-emulator drops object retention and holds (neither is stored nor enforced): "
    "the requests and Cloud Storage's refusals are asserted in test_gcp_storage.py, "
    "enforcement runs live only"
)


class TestGcsVault(VaultSuite):
    """The Vault suite on two buckets of one emulator behind the precondition front (no
    object retention: the WORM tests are skipped by capability, the refusals of undeclared
    WORM calls run)."""

    @pytest.fixture
    def vault_a(self, gcs: GcsWorld) -> Vault:
        return gcs.vault(EAST)

    @pytest.fixture
    def vault_b(self, gcs: GcsWorld) -> Vault:
        return gcs.vault(WEST)


class TestGcsRetentionVault(VaultSuite):
    """The Vault suite on buckets made with object retention enabled: puts, gets and
    deletes take the retention-aware paths; the enforcement checks are skipped offline."""

    @pytest.fixture(autouse=True)
    def _emulator_gaps(self, request: pytest.FixtureRequest) -> None:
        if request.node.originalname in (
            "test_governance_retention_refuses_early_delete",
            "test_compliance_retention_refuses_delete_and_shortening",
            "test_legal_hold_refuses_delete_until_lifted",
        ):
            pytest.skip(EMULATOR_DROPS_WORM)

    @pytest.fixture
    def vault_a(self, gcs: GcsWorld) -> Vault:
        return gcs.vault(EAST, object_retention=True)

    @pytest.fixture
    def vault_b(self, gcs: GcsWorld) -> Vault:
        return gcs.vault(WEST, object_retention=True)


# --------------------------------------------------------------------------- if-absent


def test_the_emulator_ignores_if_generation_match(gcs: GcsWorld) -> None:
    """Why the if-absent tests need the precondition front: without it both puts win."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, storage_endpoint=gcs.emulator.backend_endpoint)
    vault.put("taken", b"first", if_absent=True)
    vault.put("taken", b"second", if_absent=True)
    assert vault.get("taken") == b"second"
    uploads = [s for s in adapter.seen if s.path.startswith("/upload/")]
    assert [s.query.get("ifGenerationMatch") for s in uploads] == ["0", "0"]


def test_every_racing_if_absent_put_carries_the_precondition(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, single_put_limit=1 * MiB, upload_chunk_size=256 * 1024)
    vault.vault_id  # noqa: B018 - makes the bucket and the id before counting
    adapter.seen.clear()
    front = gcs.emulator.front
    assert front is not None
    refused = front.refused
    barrier = threading.Barrier(6)
    won: list[int] = []
    lost: list[int] = []

    def racer(i: int) -> None:
        barrier.wait(timeout=30)
        # half small (multipart), half large (resumable, the precondition at finalization)
        data = bytes([i]) * (100 if i % 2 else 600 * 1024 * 3)
        try:
            vault.put("raced", data, if_absent=True)
            won.append(i)
        except ObjectExists:
            lost.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    assert front.refused - refused == 5  # each loser was told 412 by the front
    got = vault.get("raced")
    assert got[:1] == bytes([won[0]])
    creating = [
        s
        for s in adapter.seen
        if s.method == "POST" and s.path.startswith("/upload/") and "upload_id" not in s.query
    ]
    assert len(creating) == 6
    assert all(s.query.get("ifGenerationMatch") == "0" for s in creating)
    assert {s.query.get("uploadType") for s in creating} == {"multipart", "resumable"}


# --------------------------------------------------------------------------- uploads


def test_large_puts_are_resumable_in_chunks(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, single_put_limit=1 * MiB, upload_chunk_size=256 * 1024)
    vault.vault_id  # noqa: B018 - makes the bucket before counting
    data = os.urandom(1 * MiB + 100)
    adapter.seen.clear()
    vault.put("packs/big", data)
    sessions = [s for s in adapter.seen if s.query.get("uploadType") == "resumable"]
    starts = [s for s in sessions if s.method == "POST"]
    chunks = [s for s in sessions if s.method == "PUT"]
    assert len(starts) == 1 and starts[0].json()["name"] == "packs/big"
    assert [len(c.body) for c in chunks] == [256 * 1024] * 4 + [100]
    assert chunks[-1].headers["Content-Range"] == f"bytes {MiB}-{MiB + 99}/{MiB + 100}"
    assert all(c.headers["Content-Range"].endswith("/*") for c in chunks[:-1])
    assert vault.get("packs/big") == data
    adapter.seen.clear()
    vault.put("small", b"x" * 1000)
    assert [(s.method, s.query.get("uploadType")) for s in adapter.seen] == [("POST", "multipart")]


def test_ranged_reads_send_a_range(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter)
    data = os.urandom(10_000)
    vault.put("r", data)
    adapter.seen.clear()
    assert vault.get("r", offset=100, length=50) == data[100:150]
    assert vault.get("r", offset=9_990) == data[9_990:]
    assert vault.get("r", offset=20_000, length=10) == b""
    ranges = [s.headers.get("Range") for s in adapter.seen if s.query.get("alt") == "media"]
    assert ranges[:2] == ["bytes=100-149", "bytes=9990-"]
    with pytest.raises(ObjectNotFound):
        vault.get("absent", offset=5, length=5)


def test_a_range_past_the_end_as_cloud_storage_answers_it(gcs: GcsWorld) -> None:
    """Cloud Storage answers 416 for a range starting past the end (the emulator 206)."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter)
    vault.put("short", b"12345")
    past_end = gcs_error(416, "requestedRangeNotSatisfiable")
    adapter.rules.append(lambda s: past_end if s.query.get("alt") == "media" else None)
    assert vault.get("short", offset=10, length=4) == b""


def test_listing_is_paged(gcs: GcsWorld) -> None:
    """The emulator ignores maxResults and pageToken (one page): the request is asserted,
    and a two-page answer of Cloud Storage's shape is replayed to the vault's loop."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, list_page_size=2)
    for name in ("index/00", "index/01", "index/02"):
        vault.put(name, name.encode())
    adapter.seen.clear()
    assert [o.name for o in vault.list("index/")] == ["index/00", "index/01", "index/02"]
    listings = [s for s in adapter.seen if s.path.endswith("/o") and s.method == "GET"]
    assert listings and listings[0].query["maxResults"] == "2"
    assert listings[0].query["prefix"] == "index/"

    def item(name: str) -> dict[str, Any]:
        return {"name": name, "size": "3", "updated": "2026-12-07T10:00:00.000Z", "generation": "7"}

    def pages(seen: Seen) -> Answer | None:
        if not (seen.path.endswith("/o") and seen.method == "GET"):
            return None
        if seen.query.get("pageToken") == "second":
            return Answer(200, {"kind": "storage#objects", "items": [item("index/02")]})
        return Answer(
            200,
            {
                "kind": "storage#objects",
                "items": [item("index/00"), item("index/01")],
                "nextPageToken": "second",
            },
        )

    adapter.rules.append(pages)
    adapter.seen.clear()
    assert [o.name for o in vault.list("index/")] == ["index/00", "index/01", "index/02"]
    listings = [s for s in adapter.seen if s.path.endswith("/o")]
    assert [s.query.get("pageToken") for s in listings] == [None, "second"]


def test_vault_id_is_stable_and_hidden(gcs: GcsWorld) -> None:
    first = gcs.vault()
    vault_id = first.vault_id
    assert vault_id.startswith("gcp-")
    assert gcs.vault().vault_id == vault_id
    other = gcs.vault(prefix="other/")
    assert other.vault_id != vault_id
    assert list(first.list()) == []
    with pytest.raises(VaultError, match="reserves"):
        first.put(".regionvault/vault-id", b"x")


def test_a_missing_bucket_is_named(gcs: GcsWorld) -> None:
    vault = gcs.vault(create=False)
    with pytest.raises(VaultError) as missing:
        vault.put("a", b"x")
    text = str(missing.value)
    assert f"bucket 'rv-{gcs.tag}-{EAST}' does not exist (create it, or set create = true)" in text
    assert "\n" not in text


def test_buckets_are_made_in_their_location_with_object_retention(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    gcs.vault(adapter=adapter, object_retention=True).put("a", b"x")
    made = [s for s in adapter.seen if s.method == "POST" and s.path == "/storage/v1/b"]
    assert len(made) == 1
    assert made[0].json()["name"] == f"rv-{gcs.tag}-{EAST}"
    assert made[0].json()["location"] == EAST
    assert made[0].query["project"] == "regionvault-test"
    # the SDK writes Python's True; Cloud Storage reads booleans case-blind
    assert made[0].query["enableObjectRetention"] == "True"


def test_server_errors_are_transient(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter)
    vault.put("a", b"x")
    adapter.rules.append(lambda s: gcs_error(503, "backendError"))
    with pytest.raises(TransientError, match=r"backendError \(HTTP 503\)"):
        vault.get("a")
    adapter.rules[:] = [lambda s: gcs_error(403, "forbidden")]
    with pytest.raises(VaultError) as denied:
        vault.put("b", b"y")
    assert not isinstance(denied.value, TransientError)
    assert "forbidden (HTTP 403)" in str(denied.value)


def test_an_unreachable_endpoint_is_transient(gcs: GcsWorld) -> None:
    vault = gcs.vault(storage_endpoint=f"http://127.0.0.1:{free_port()}", create=False)
    with pytest.raises(TransientError, match="no connection to Cloud Storage"):
        vault.get("a")


# --------------------------------------------------------------------------- WORM


def _worm(gcs: GcsWorld) -> tuple[GcsVault, RecordingAdapter]:
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, object_retention=True)
    vault.put("points/p1", b"kept")
    adapter.seen.clear()
    return vault, adapter


def _patches(adapter: RecordingAdapter) -> list[Seen]:
    return [s for s in adapter.seen if s.method == "PATCH"]


@pytest.mark.parametrize(
    ("mode", "sent"), [(RetentionMode.GOVERNANCE, "Unlocked"), (RetentionMode.COMPLIANCE, "Locked")]
)
def test_retention_sends_the_objects_retention(
    gcs: GcsWorld, mode: RetentionMode, sent: str
) -> None:
    vault, adapter = _worm(gcs)
    until = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    info = vault.set_retention("points/p1", until, mode)
    assert (info.retain_until, info.retention_mode) == (until, mode)
    (patch,) = _patches(adapter)
    assert patch.path == f"/storage/v1/b/rv-{gcs.tag}-{EAST}/o/points/p1"
    retention = patch.json()["retention"]
    assert list(patch.json()) == ["retention"]
    assert retention["mode"] == sent
    assert retention["retainUntilTime"] == "2031-05-06T07:08:09.000000Z"
    assert "overrideUnlockedRetention" not in patch.query


def _protected(
    until: datetime | None,
    mode: str | None,
    *,
    temporary: bool = False,
    event: bool = False,
    data: bytes = b"kept",
    patches: list[Answer | None] | None = None,
) -> Any:
    """An object's metadata as Cloud Storage reports one under retention and/or holds, its
    size and CRC32C those of ``data``; ``patches``: the answers to the PATCHes, in turn
    (None, and after them: the object)."""
    resource: dict[str, Any] = {
        "kind": "storage#object",
        "name": "points/p1",
        "bucket": "b",
        "size": str(len(data)),
        "crc32c": crc32c_of(data),
        "generation": "1765101600000000",
        "metageneration": "2",
        "updated": "2026-12-07T10:00:00.000Z",
        "temporaryHold": temporary,
        "eventBasedHold": event,
    }
    if until is not None and mode is not None:
        resource["retention"] = {
            "mode": mode,
            "retainUntilTime": until.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }

    def rule(seen: Seen) -> Answer | None:
        if seen.method == "GET" and seen.path.endswith("/o/points/p1") and "alt" not in seen.query:
            return Answer(200, resource)
        if seen.method == "PATCH" and seen.path.endswith("/o/points/p1"):
            answer = patches.pop(0) if patches else None
            return answer or Answer(200, resource)
        return None

    return rule


def _overwriting(seen: list[Seen]) -> list[Seen]:
    """The requests that delete or replace an object: a DELETE, or an upload without
    ``ifGenerationMatch=0`` (an if-absent upload replaces nothing)."""
    return [
        s
        for s in seen
        if s.method == "DELETE"
        or (
            s.path.startswith("/upload/")
            and "upload_id" not in s.query
            and s.query.get("ifGenerationMatch") != "0"
        )
    ]


def test_the_vault_refuses_removing_a_protected_object_itself(gcs: GcsWorld) -> None:
    """The framework's promise does not wait for Cloud Storage (nor for the emulator, which
    would allow both): an object whose metadata shows a retention in force or a hold is
    neither deleted (no DELETE is sent) nor overwritten (only the if-absent upload that a
    plain put starts with is sent, and met by the 412)."""
    vault, adapter = _worm(gcs)
    soon = datetime.now(UTC) + timedelta(days=1)
    for until, mode, temporary, event, bypass, why in (
        (soon, "Locked", False, False, True, "compliance retention until"),
        (soon, "Unlocked", False, False, False, "governance retention until"),
        (None, None, True, False, True, "legal hold is on"),
        (None, None, False, True, True, "legal hold is on"),
    ):
        adapter.rules[:] = [_protected(until, mode, temporary=temporary, event=event)]
        adapter.seen.clear()
        with pytest.raises(RetentionLocked, match=why):
            vault.delete("points/p1", bypass_governance=bypass)
        with pytest.raises(RetentionLocked, match="cannot be overwritten"):
            vault.put("points/p1", b"new")
        assert not _overwriting(adapter.seen)
        assert [s.query.get("ifGenerationMatch") for s in adapter.seen if s.method == "POST"] == [
            "0"
        ]
    adapter.rules.clear()
    assert vault.get("points/p1") == b"kept"


def test_a_plain_put_of_a_fresh_name_under_retention_reads_nothing_first(gcs: GcsWorld) -> None:
    """Cost (a pack is a fresh name): the put is one if-absent upload, no read of the
    object's retention before it; Cloud Storage's 412 is what says that the name is taken."""
    adapter = RecordingAdapter()
    vault = gcs.vault(
        adapter=adapter,
        object_retention=True,
        single_put_limit=1 * MiB,
        upload_chunk_size=256 * 1024,
    )
    vault.vault_id  # noqa: B018 - makes the bucket and the id before counting
    adapter.seen.clear()
    vault.put("packs/ab/ab01", os.urandom(1 * MiB + 70_000))
    vault.put("index/i1", b"index")
    assert [(s.method, operation_of(s.method, s.url)) for s in adapter.seen] == [
        ("POST", "POST upload-session"),
        *[("PUT", "PUT upload-chunk")] * 5,
        ("POST", "POST upload"),
    ]
    assert [s.query.get("ifGenerationMatch") for s in adapter.seen if s.method == "POST"] == [
        "0",
        "0",
    ]


def test_a_plain_put_over_an_unprotected_object_under_retention_replaces_it(
    gcs: GcsWorld,
) -> None:
    vault, adapter = _worm(gcs)
    vault.put("points/p1", b"newer")
    assert [(s.method, s.query.get("ifGenerationMatch")) for s in adapter.seen] == [
        ("POST", "0"),  # 412: taken
        ("GET", None),  # its retention and holds: none
        ("POST", None),  # the overwrite
    ]
    assert vault.get("points/p1") == b"newer"


def test_the_same_bytes_over_a_protected_object_are_refused_too(gcs: GcsWorld) -> None:
    """Equal size and CRC32C (our own landed attempt, or a copy) do not pass the vault's
    refusal: the framework's rule comes first."""
    vault, adapter = _worm(gcs)
    soon = datetime.now(UTC) + timedelta(days=1)
    adapter.rules[:] = [_protected(soon, "Locked", data=b"kept")]
    with pytest.raises(RetentionLocked, match="compliance retention until"):
        vault.put("points/p1", b"kept")
    assert not _overwriting(adapter.seen)


def test_cloud_storages_403_on_the_overwrite_itself_is_retention_locked(gcs: GcsWorld) -> None:
    """The object looked unprotected (a hold set since, or a bucket retention policy the
    object's metadata does not show): Cloud Storage refuses the overwrite with 403."""
    vault, adapter = _worm(gcs)
    adapter.rules.append(
        lambda s: (
            gcs_error(403, "retentionPolicyNotMet")
            if s.path.startswith("/upload/") and s.query.get("ifGenerationMatch") != "0"
            else None
        )
    )
    with pytest.raises(RetentionLocked, match="Cloud Storage refused to overwrite it"):
        vault.put("points/p1", b"new")
    assert [s.method for s in _overwriting(adapter.seen)] == ["POST"]
    adapter.rules.clear()
    assert vault.get("points/p1") == b"kept"


def test_a_failed_delete_puts_the_removed_unlocked_retention_back(gcs: GcsWorld) -> None:
    """Bypassing governance removes the Unlocked retention, then deletes: when the DELETE
    fails (transient here; an event-based hold set meanwhile is the same), the retention
    is set again, so that the object is not left unprotected."""
    vault, adapter = _worm(gcs)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    adapter.rules[:] = [
        lambda s: gcs_error(503, "backendError") if s.method == "DELETE" else None,
        _protected(until, "Unlocked"),
    ]
    with pytest.raises(TransientError, match=r"backendError \(HTTP 503\)"):
        vault.delete("points/p1", bypass_governance=True)
    removed, restored = _patches(adapter)
    retentions = [p.json()["retention"] for p in (removed, restored)]
    assert [(r["mode"], r["retainUntilTime"]) for r in retentions] == [
        (None, None),
        ("Unlocked", until.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    ]
    assert "overrideUnlockedRetention" not in restored.query


def test_a_retention_that_cannot_be_put_back_is_said(gcs: GcsWorld) -> None:
    vault, adapter = _worm(gcs)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    adapter.rules[:] = [
        lambda s: gcs_error(503, "backendError") if s.method == "DELETE" else None,
        _protected(until, "Unlocked", patches=[None, gcs_error(503, "backendError")]),
    ]
    with pytest.raises(VaultError) as lost:
        vault.delete("points/p1", bypass_governance=True)
    text = str(lost.value)
    assert f"its Unlocked retention until {until.isoformat()} had been removed" in text
    assert "could not be put back" in text and "unprotected" in text


def test_bypassing_governance_removes_the_unlocked_retention_then_deletes(gcs: GcsWorld) -> None:
    vault, adapter = _worm(gcs)
    adapter.rules[:] = [_protected(datetime.now(UTC) + timedelta(days=1), "Unlocked")]
    vault.delete("points/p1", bypass_governance=True)
    writes = [s for s in adapter.seen if s.method in ("PATCH", "DELETE")]
    assert [s.method for s in writes] == ["PATCH", "DELETE"]
    assert writes[0].query["overrideUnlockedRetention"] == "True"
    removed = writes[0].json()["retention"]
    assert (removed["mode"], removed["retainUntilTime"]) == (None, None)
    adapter.rules.clear()
    with pytest.raises(ObjectNotFound):
        vault.head("points/p1")


def test_shortening_or_locking_unlocked_retention_overrides_it(gcs: GcsWorld) -> None:
    vault, adapter = _worm(gcs)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    adapter.rules[:] = [_protected(until, "Unlocked")]
    with pytest.raises(RetentionLocked, match="only be shortened with bypass_governance"):
        vault.set_retention("points/p1", until - timedelta(days=1), RetentionMode.GOVERNANCE)
    assert not _patches(adapter)
    vault.set_retention(
        "points/p1", until - timedelta(days=1), RetentionMode.GOVERNANCE, bypass_governance=True
    )
    vault.set_retention("points/p1", until, RetentionMode.COMPLIANCE)
    vault.set_retention("points/p1", until + timedelta(days=1), RetentionMode.GOVERNANCE)
    overrides = [p.query.get("overrideUnlockedRetention") for p in _patches(adapter)]
    assert overrides == ["True", "True", None]


def test_compliance_retention_is_never_shortened_or_weakened(gcs: GcsWorld) -> None:
    vault, adapter = _worm(gcs)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    adapter.rules[:] = [_protected(until, "Locked")]
    with pytest.raises(RetentionLocked, match="can only be extended"):
        vault.set_retention("points/p1", until - timedelta(days=1))
    with pytest.raises(RetentionLocked, match="can only be extended"):
        vault.set_retention("points/p1", until, RetentionMode.GOVERNANCE, bypass_governance=True)
    assert not _patches(adapter)


@pytest.mark.parametrize("on", [True, False])
def test_legal_hold_is_the_temporary_hold(gcs: GcsWorld, on: bool) -> None:
    vault, adapter = _worm(gcs)
    assert vault.set_legal_hold("points/p1", on).legal_hold is on
    (patch,) = _patches(adapter)
    assert patch.json() == {"temporaryHold": on}


def test_the_emulator_drops_retention_and_holds(gcs: GcsWorld) -> None:
    """Why enforcement is tested live only."""
    vault, _adapter = _worm(gcs)
    vault.set_retention("points/p1", datetime.now(UTC) + timedelta(days=1))
    vault.set_legal_hold("points/p1", True)
    head = vault.head("points/p1")
    assert head.retain_until is None and not head.legal_hold


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (
            "forbidden",
            "Object 'points/p1' is subject to bucket's retention policy and cannot be deleted, "
            "overwritten or archived until 2031-05-06T07:08:09.000000-07:00",
        ),
        (
            "forbidden",
            "Object 'points/p1' is under active Temporary hold and cannot be deleted, "
            "overwritten or archived until hold is removed.",
        ),
        ("retentionPolicyNotMet", "scripted"),
    ],
)
def test_cloud_storages_403_on_delete_and_overwrite_is_retention_locked(
    gcs: GcsWorld, reason: str, message: str
) -> None:
    """Cloud Storage refuses a delete or an overwrite of a protected object (say the hold
    was set since the vault looked) with a 403 in the words replayed here."""
    vault, adapter = _worm(gcs)
    refusal = gcs_error(403, reason, message)
    adapter.rules.append(
        lambda s: (
            refusal
            if s.method == "DELETE" or (s.method == "POST" and s.path.startswith("/upload/"))
            else None
        )
    )
    with pytest.raises(RetentionLocked) as deleting:
        vault.delete("points/p1")
    with pytest.raises(RetentionLocked) as overwriting:
        vault.put("points/p1", b"new")
    for refused, what in ((deleting, "delete"), (overwriting, "overwrite")):
        assert refused.value.name == "points/p1"
        assert f"Cloud Storage refused to {what} it: it is under retention or a hold" in str(
            refused.value
        )
    adapter.rules.clear()
    assert vault.get("points/p1") == b"kept"


def test_a_403_for_want_of_permission_is_not_retention(gcs: GcsWorld) -> None:
    vault, adapter = _worm(gcs)
    adapter.rules.append(
        lambda s: (
            gcs_error(403, "forbidden", "x does not have storage.objects.delete access")
            if s.method == "DELETE"
            else None
        )
    )
    with pytest.raises(VaultError) as refused:
        vault.delete("points/p1")
    assert not isinstance(refused.value, RetentionLocked)
    assert "forbidden (HTTP 403)" in str(refused.value)


def test_worm_calls_need_object_retention(gcs: GcsWorld) -> None:
    vault = gcs.vault()
    vault.put("a", b"x")
    assert not vault.capabilities.worm_lock and not vault.capabilities.legal_hold
    with pytest.raises(UnsupportedOperation, match="object_retention = true"):
        vault.set_retention("a", datetime.now(UTC) + timedelta(seconds=30))
    with pytest.raises(UnsupportedOperation, match="object_retention = true"):
        vault.set_legal_hold("a", True)


# --------------------------------------------------------------------------- metrics


def test_the_provider_counts_every_request(gcs: GcsWorld) -> None:
    vault = gcs.vault(single_put_limit=1 * MiB, upload_chunk_size=256 * 1024)
    vault.vault_id  # noqa: B018 - makes the bucket before counting
    before = gcs.provider.metrics.snapshot()
    vault.put("packs/big", os.urandom(1 * MiB + 1), if_absent=True)
    vault.put("index/0", b"x" * 100)
    assert [o.name for o in vault.list()] == ["index/0", "packs/big"]
    assert vault.get("index/0", offset=1, length=2) == b"xx"
    vault.delete("index/0")
    used = gcs.provider.metrics.since(before)
    assert used.by_operation("storage") == {
        "storage DELETE object": 1,
        "storage GET list": 1,
        "storage GET media": 1,
        "storage POST upload": 1,
        "storage POST upload-session": 1,
        "storage PUT upload-chunk": 5,
    }
    assert used.count(region=f"gcp:{EAST}") == 10
    assert used.bytes_sent(region=f"gcp:{EAST}") >= 1 * MiB + 101


# --------------------------------------------------------------------------- the launcher


def _http(method: str, url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        refused.close()
        return int(refused.code)


@pytest.mark.parametrize("front", [False, True])
def test_the_emulator_runs_as_a_module_until_sigterm(front: bool) -> None:
    """``python -m regionvault.providers.gcp.emulator [--preconditions]`` prints its
    endpoint on 127.0.0.1, serves (with the front: a second ifGenerationMatch=0 upload of a
    name is 412), and takes its emulator down with it on SIGTERM."""
    port = free_port()
    flags = ["--preconditions"] if front else []
    child = subprocess.Popen(
        [sys.executable, "-m", "regionvault.providers.gcp.emulator", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        endpoint = child.stdout.readline().strip()
        assert endpoint == f"http://127.0.0.1:{port}"
        assert (
            _http(
                "POST", f"{endpoint}/storage/v1/b?project=p", b'{"name": "b"}', "application/json"
            )
            == 200
        )
        upload = f"{endpoint}/upload/storage/v1/b/b/o?uploadType=media&name=x&ifGenerationMatch=0"
        statuses = [
            _http("POST", upload, data, "application/octet-stream") for data in (b"1", b"2")
        ]
        assert statuses == ([200, 412] if front else [200, 200])
    finally:
        child.send_signal(signal.SIGTERM)
        _out, err = child.communicate(timeout=20)
    assert child.returncode == 0, err
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the emulator outlived its launcher"


def test_the_launcher_stops_its_child() -> None:
    with GcsEmulator() as emulator:
        pid = emulator.pid
        assert pid is not None and emulator.endpoint.startswith("http://127.0.0.1:")
    assert emulator.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("retries", [0, 1])
def test_sdk_retries_bound_the_attempts_of_one_call(gcs: GcsWorld, retries: int) -> None:
    """google-api-core bounds retries by time; ``sdk_retries`` bounds them by count too."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, sdk_retries=retries)
    vault.put("a", b"x")
    adapter.seen.clear()
    adapter.rules.append(lambda s: gcs_error(503, "backendError"))
    with pytest.raises(TransientError, match=r"HTTP 503"):
        vault.get("a")
    with pytest.raises(TransientError, match=r"HTTP 503"):
        vault.put("b", b"y")
    attempts = [operation_of(s.method, s.url) for s in adapter.seen]
    assert attempts == ["GET media"] * (retries + 1) + ["POST upload"] * (retries + 1)


def test_a_download_that_fails_its_checksum_is_transient(gcs: GcsWorld) -> None:
    """The SDK checks a whole object's crc32c against the ``X-Goog-Hash`` of the answer: a
    damaged transfer is an error worth retrying, never bytes handed to the data plane."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter)
    vault.put("a", b"original")

    def damaged(seen: Seen) -> Answer | None:
        if seen.query.get("alt") != "media":
            return None
        return Answer(200, headers={"X-Goog-Hash": "crc32c=AAAAAQ==,md5=AAAAAAAAAAAAAAAAAAAAAQ=="})

    adapter.rules.append(damaged)
    with pytest.raises(TransientError, match="do not match their checksum"):
        vault.get("a")


# --------------------------------------------------------------------------- offline


_CONNECTS: list[object] | None = None
_HOOKED = False


def _record_connects(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.connect" and _CONNECTS is not None:
        _CONNECTS.append(args[1])


def test_every_connection_stays_on_the_loopback(gcs: GcsWorld) -> None:
    """A vault and a transit round trip, from building the clients on: every socket the
    SDK opens goes to 127.0.0.1 (no metadata server, no storage.googleapis.com)."""
    global _CONNECTS, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record_connects)  # stays for the process: inert unless recording
        _HOOKED = True
    _CONNECTS = []
    try:
        vault = gcs.vault(object_retention=True, single_put_limit=1 * MiB)
        vault.put("a", os.urandom(2 * MiB), if_absent=True)
        assert len(vault.get("a", offset=5, length=5)) == 5
        assert [o.name for o in vault.list()] == ["a"]
        vault.set_legal_hold("a", True)
        vault.delete("a")
        transit = gcs.transit(EAST, WEST)
        transit.send("p", b"sealed")
        assert transit.has("p") and transit.receive("p") == b"sealed"
        transit.discard("p")
        seen = list(_CONNECTS)
    finally:
        _CONNECTS = None
    assert seen, "the audit hook saw no connection at all"
    hosts = {address[0] for address in seen if isinstance(address, tuple)}
    assert hosts == {"127.0.0.1"}, seen


def test_a_pack_just_over_the_limit_is_two_chunks(gcs: GcsWorld) -> None:
    """The data plane closes packs at 16 MiB and a bit: a session and two chunks of 8 MiB
    and more, not two full chunks and a sliver."""
    vault = gcs.vault()
    vault.vault_id  # noqa: B018 - makes the bucket before counting
    data = os.urandom(16 * MiB + 300 * 1024)
    before = gcs.provider.metrics.snapshot()
    vault.put("packs/just-over", data, if_absent=True)
    used = gcs.provider.metrics.since(before)
    assert used.by_operation("storage") == {
        "storage POST upload-session": 1,
        "storage PUT upload-chunk": 2,
    }
    assert vault.get("packs/just-over") == data
