"""The inbox Transit on Cloud Storage, with the real google-cloud-storage client against
gcp-storage-emulator: the Transit suite from one region's bucket into the other's inbox and
back, then what the suite cannot see: what the sender's requests are (create-only uploads
and one-name listings, never a read or a delete), a payload still waiting replaced, a
sender refused the replacement, an interrupted send that leaves nothing behind, and an
inbox that shares the vault's bucket."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from regionvault.core.config import SERVICES
from regionvault.core.conformance import TransitSuite
from regionvault.core.errors import TransientError, TransitError
from regionvault.core.interfaces import KeyService, Sealer, Transit
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.local.provider import LocalProvider
from storage_world import (
    EAST,
    WEST,
    GcsWorld,
    RecordingAdapter,
    Seen,
    gcs,
    gcs_error,
)

__all__ = ["gcs"]  # the fixtures, imported for pytest to find

MiB = 1024 * 1024


def _local(tmp_path: Path, name: str) -> RegionConfig:
    settings = {"root": str(tmp_path / "keys" / name)}
    return RegionConfig(
        id=RegionId("local", name),
        settings=settings,
        services={svc: ServiceConfig("local", settings) for svc in SERVICES},
        base_dir=tmp_path,
        source="test-site.toml",
    )


class TestGcsTransit(TransitSuite):
    """The Transit suite from europe-west1 into us-east1's inbox bucket and back; the keys
    are the local provider's (Cloud KMS is another engineer's module)."""

    @pytest.fixture
    def reopen_transit_ab(self, gcs: GcsWorld) -> Callable[[], Transit]:
        return lambda: gcs.transit(EAST, WEST)

    @pytest.fixture
    def transit_ab(self, reopen_transit_ab: Callable[[], Transit]) -> Transit:
        return reopen_transit_ab()

    @pytest.fixture
    def transit_ba(self, gcs: GcsWorld) -> Transit:
        return gcs.transit(WEST, EAST)

    @pytest.fixture
    def keys_a(self, tmp_path: Path) -> Iterator[KeyService]:
        keys = LocalProvider().key_service(_local(tmp_path, "east"))
        yield keys
        keys.close()

    @pytest.fixture
    def keys_b(self, tmp_path: Path) -> Iterator[KeyService]:
        keys = LocalProvider().key_service(_local(tmp_path, "west"))
        yield keys
        keys.close()

    @pytest.fixture
    def sealer_b(self, keys_b: KeyService) -> Sealer:
        return keys_b.sealer()


def _sender_requests(adapter: RecordingAdapter) -> list[tuple[str, str]]:
    return [(s.method, _kind(s)) for s in adapter.seen]


def _kind(seen: Seen) -> str:
    if seen.path.startswith("/upload/"):
        condition = seen.query.get("ifGenerationMatch")
        return f"upload {seen.query.get('uploadType')} ifGenerationMatch={condition}"
    if seen.path.endswith("/o"):
        return f"list prefix={seen.query.get('prefix')} maxResults={seen.query.get('maxResults')}"
    return seen.path


def test_a_send_is_one_create_only_upload_and_has_a_one_name_listing(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    transit = gcs.transit(EAST, WEST, adapter=adapter)
    list(transit.inbox())  # makes the inbox bucket before counting
    adapter.seen.clear()
    transit.send("rp1/index", b"sealed index")
    assert transit.has("rp1/index") and not transit.has("rp1/nothing")
    key = f"gcp/{EAST}/rp1/index"
    assert _sender_requests(adapter) == [
        ("POST", "upload multipart ifGenerationMatch=0"),
        ("GET", f"list prefix={key} maxResults=1"),
        ("GET", f"list prefix=gcp/{EAST}/rp1/nothing maxResults=1"),
    ]
    upload = adapter.seen[0]
    assert upload.path == f"/upload/storage/v1/b/rv-{gcs.tag}-{WEST}-inbox/o"
    assert transit.bytes_sent == len(b"sealed index")
    # the destination's side reads and deletes
    assert transit.receive("rp1/index") == b"sealed index"
    transit.discard("rp1/index")
    transit.discard("rp1/index")
    with pytest.raises(TransitError, match=f"not in the inbox from gcp:{EAST}"):
        transit.receive("rp1/index")
    with pytest.raises(TransitError, match="bad inbox prefix '/abs'"):
        list(transit.inbox("/abs"))


def test_a_payload_still_waiting_is_replaced(gcs: GcsWorld) -> None:
    """An offer sent again while the first still waits: the create-only upload is refused
    (412, by the precondition front as by Cloud Storage), the one name listed shows another
    payload, then a plain upload replaces it. Both uploads are counted."""
    adapter = RecordingAdapter()
    transit = gcs.transit(EAST, WEST, adapter=adapter)
    transit.send("offer", b"first offer")
    adapter.seen.clear()
    transit.send("offer", b"second offer")
    assert _sender_requests(adapter) == [
        ("POST", "upload multipart ifGenerationMatch=0"),
        ("GET", f"list prefix=gcp/{EAST}/offer maxResults=1"),
        ("POST", "upload multipart ifGenerationMatch=None"),
    ]
    assert transit.receive("offer") == b"second offer"
    assert transit.bytes_sent == len(b"first offer") + 2 * len(b"second offer")


def test_a_create_only_sender_refused_the_replacement_is_told_why(gcs: GcsWorld) -> None:
    """Cloud Storage answers 403 to an overwrite by a sender without storage.objects.delete."""
    adapter = RecordingAdapter()
    transit = gcs.transit(EAST, WEST, adapter=adapter)
    transit.send("offer", b"first offer")
    adapter.rules.append(
        lambda s: (
            gcs_error(403, "forbidden", "does not have storage.objects.delete access")
            if s.path.startswith("/upload/") and "ifGenerationMatch" not in s.query
            else None
        )
    )
    with pytest.raises(TransitError) as refused:
        transit.send("offer", b"second offer")
    text = str(refused.value)
    assert "'offer' from gcp:europe-west1 still waits" in text
    assert "needs storage.objects.delete there besides storage.objects.create" in text
    assert "forbidden (HTTP 403)" in text
    adapter.rules.clear()
    assert transit.receive("offer") == b"first offer"
    # the if-absent upload of the second was sent (and refused), the replacement was not made
    assert transit.bytes_sent == len(b"first offer") + len(b"second offer")


def test_an_interrupted_send_leaves_nothing_behind(gcs: GcsWorld) -> None:
    adapter = RecordingAdapter()
    transit = gcs.transit(
        EAST, WEST, adapter=adapter, single_put_limit=1 * MiB, upload_chunk_size=256 * 1024
    )
    list(transit.inbox())
    chunks = 0

    def fail_the_third_chunk(seen: Seen) -> object:
        nonlocal chunks
        if seen.method == "PUT" and seen.path.startswith("/upload/"):
            chunks += 1
            if chunks == 3:
                return gcs_error(503, "backendError")
        return None

    adapter.rules.append(fail_the_third_chunk)  # type: ignore[arg-type]
    with pytest.raises(TransientError, match=r"HTTP 503"):
        transit.send("batch-0", os.urandom(2 * MiB))
    assert chunks == 3
    assert list(transit.inbox()) == []
    assert not transit.has("batch-0")
    assert transit.bytes_sent == 0
    assert list(transit.stale_temporaries(timedelta(0))) == []


def test_transit_requests_are_counted_for_the_destination(gcs: GcsWorld) -> None:
    transit = gcs.transit(EAST, WEST)
    list(transit.inbox())
    before = gcs.provider.metrics.snapshot()
    transit.send("p", b"12345")
    transit.has("p")
    used = gcs.provider.metrics.since(before)
    assert used.by_operation("storage") == {"storage GET list": 1, "storage POST upload": 1}
    assert used.count(region=f"gcp:{WEST}") == 2
