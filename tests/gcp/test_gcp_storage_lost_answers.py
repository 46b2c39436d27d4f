"""Uploads whose answer is lost after they landed (a connection reset once the request was
sent), with the SDK's own retries on (``sdk_retries = 3``, the default; storage_world.py
sets 0 elsewhere): the resend meets the object the first attempt made. Cloud Storage answers
an if-absent resend 412 (the precondition front applies that rule offline) and a resend to a
finished resumable session 200 with the object. Neither may become an error about our own
object: manifests, indexes, locks and transit payloads are if-absent puts.
"""

from __future__ import annotations

import http.client
import os
import urllib.parse

import pytest
from regionvault.core.errors import ObjectExists
from regionvault.providers.gcp.emulator import PreconditionFront
from storage_world import (
    EAST,
    WEST,
    GcsWorld,
    LosingAdapter,
    RecordingAdapter,
    Seen,
    creating,
    gcs,
    gcs_error,
)

__all__ = ["gcs"]  # the fixtures, imported for pytest to find

MiB = 1024 * 1024


def _front(gcs: GcsWorld) -> PreconditionFront:
    front = gcs.emulator.front
    assert front is not None
    return front


def _uploads(seen: list[Seen]) -> list[tuple[str, str | None]]:
    return [
        (s.method, s.query.get("ifGenerationMatch")) for s in seen if s.path.startswith("/upload/")
    ]


def test_an_if_absent_put_whose_answer_was_lost_is_our_own_object(gcs: GcsWorld) -> None:
    """The manifest, index, lock case: the first upload landed, its answer was lost, the
    SDK's resend got 412; the object holds our bytes (size and CRC32C), so the put
    succeeded."""
    adapter = LosingAdapter(creating)
    vault = gcs.vault(adapter=adapter, sdk_retries=3)
    vault.vault_id  # noqa: B018 - makes the bucket and the id first
    adapter.seen.clear()
    adapter.lost.clear()
    refused = _front(gcs).refused
    info = vault.put("snapshots/p1", b"manifest bytes", if_absent=True)
    assert len(adapter.lost) == 1
    assert _uploads(adapter.seen) == [("POST", "0"), ("POST", "0")]
    assert _front(gcs).refused - refused == 1  # the resend met our object
    assert info.size == len(b"manifest bytes")
    assert vault.get("snapshots/p1") == b"manifest bytes"


def test_an_if_absent_put_over_another_object_is_still_object_exists(gcs: GcsWorld) -> None:
    """A 412 for an object that is not ours (other bytes, or the same size with other
    bytes) stays ObjectExists, retries or not, and leaves the object as it was."""
    adapter = LosingAdapter(creating)
    vault = gcs.vault(adapter=adapter, sdk_retries=3)
    vault.put("locks/l1", b"their lock", if_absent=True)  # its answer lost: ours, no error
    for other in (b"our lock!!", b"another lock entirely"):
        with pytest.raises(ObjectExists):
            vault.put("locks/l1", other, if_absent=True)
    assert vault.get("locks/l1") == b"their lock"


def test_a_plain_put_under_retention_whose_answer_was_lost_is_kept(gcs: GcsWorld) -> None:
    """A plain put under object retention is sent if-absent first (no read for a fresh
    name): a lost answer and the resend's 412 then find our own object, which is neither
    refused nor uploaded again."""
    adapter = LosingAdapter(creating)
    vault = gcs.vault(adapter=adapter, sdk_retries=3, object_retention=True)
    vault.vault_id  # noqa: B018
    adapter.seen.clear()
    adapter.lost.clear()
    vault.put("index/i1", b"index bytes")
    assert len(adapter.lost) == 1
    assert _uploads(adapter.seen) == [("POST", "0"), ("POST", "0")]
    assert vault.get("index/i1") == b"index bytes"


def test_a_lost_answer_to_the_last_chunk_is_answered_as_cloud_storage_does(
    gcs: GcsWorld,
) -> None:
    """Cloud Storage answers a finished resumable session with 200 and the object, to the
    SDK resending its last chunk as to a status query (``bytes */N``); the front did 412."""
    adapter = LosingAdapter(creating)
    vault = gcs.vault(
        adapter=adapter, sdk_retries=3, single_put_limit=1 * MiB, upload_chunk_size=256 * 1024
    )
    vault.vault_id  # noqa: B018
    adapter.seen.clear()
    adapter.lost.clear()
    front = _front(gcs)
    refused, replayed = front.refused, front.replayed
    data = os.urandom(1 * MiB + 300_000)
    vault.put("index/big", data, if_absent=True)
    (lost,) = adapter.lost
    total = len(data)
    assert lost.headers["Content-Range"] == f"bytes {1310720}-{total - 1}/{total}"
    finals = [s for s in adapter.seen if s.headers.get("Content-Range", "").endswith(f"/{total}")]
    assert len(finals) == 2  # the last chunk, and the SDK's resend
    assert (front.refused - refused, front.replayed - replayed) == (0, 1)
    assert vault.get("index/big") == data
    # a status query to the finished session: 200 and the object
    session = urllib.parse.urlsplit(lost.url)
    connection = http.client.HTTPConnection(session.hostname or "", session.port, timeout=30)
    try:
        connection.request(
            "PUT",
            f"{session.path}?{session.query}",
            headers={"Content-Range": f"bytes */{total}", "Content-Length": "0"},
        )
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    assert answer.status == 200
    assert b'"name": "index/big"' in body or b'"name":"index/big"' in body


def test_a_send_whose_answer_was_lost_is_sent_for_a_create_only_sender(gcs: GcsWorld) -> None:
    """The transit's case: the resend's 412 is this very payload (the one name listed shows
    its size and CRC32C), so a sender with storage.objects.create only (an overwrite would
    be 403) has sent it; nothing is uploaded a third time."""
    adapter = LosingAdapter(creating)
    transit = gcs.transit(EAST, WEST, adapter=adapter, sdk_retries=3)
    list(transit.inbox())  # makes the inbox bucket first
    adapter.seen.clear()
    adapter.rules.append(
        lambda s: (
            gcs_error(403, "forbidden", "does not have storage.objects.delete access")
            if s.path.startswith("/upload/") and "ifGenerationMatch" not in s.query
            else None
        )
    )
    transit.send("copy/p1/sent", b"notice")
    assert len(adapter.lost) == 1
    assert _uploads(adapter.seen) == [("POST", "0"), ("POST", "0")]
    listings = [s for s in adapter.seen if s.method == "GET"]
    assert [s.query.get("prefix") for s in listings] == [f"gcp/{EAST}/copy/p1/sent"]
    adapter.rules.clear()
    assert transit.receive("copy/p1/sent") == b"notice"
    assert transit.bytes_sent == len(b"notice")


def test_a_resent_payload_that_already_waits_is_not_uploaded_again(gcs: GcsWorld) -> None:
    """The by-design resend (a receipt offered again while it waits): the same payload is
    there, so it is sent, for a create-only sender too (an overwrite would be 403)."""
    adapter = RecordingAdapter()
    transit = gcs.transit(EAST, WEST, adapter=adapter)
    transit.send("receipt/p1", b"receipt")
    adapter.rules.append(
        lambda s: (
            gcs_error(403, "forbidden", "does not have storage.objects.delete access")
            if s.path.startswith("/upload/") and "ifGenerationMatch" not in s.query
            else None
        )
    )
    adapter.seen.clear()
    transit.send("receipt/p1", b"receipt")
    assert _uploads(adapter.seen) == [("POST", "0")]
    assert transit.bytes_sent == 2 * len(b"receipt")
