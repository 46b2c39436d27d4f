"""The local Transit against the Transit contract: delivery into the destination's inbox,
byte accounting, resuming an interrupted copy."""

from __future__ import annotations

import threading

import pytest
from regionvault.core import Region, Site, TransitError


def test_send_lands_in_the_destination_inbox(site: Site, west: Region) -> None:
    link = site.transit("east", "west")
    assert (link.source, link.region) == ("local:east", "local:west")
    link.send("chunks/ab/1", b"sealed-1")
    link.send("chunks/ab/2", memoryview(b"sealed-22"))
    link.send("manifest", b"m")
    inbox = west.config.path("root") / "inbox" / "local:east"
    assert (inbox / "chunks" / "ab" / "1").read_bytes() == b"sealed-1"
    assert list(link.inbox()) == ["chunks/ab/1", "chunks/ab/2", "manifest"]
    assert list(link.inbox("chunks/")) == ["chunks/ab/1", "chunks/ab/2"]
    assert list(link.inbox("man")) == ["manifest"]
    assert link.has("chunks/ab/2") and not link.has("chunks/ab/3")
    assert link.receive("chunks/ab/2") == b"sealed-22"
    assert link.bytes_sent == len(b"sealed-1") + len(b"sealed-22") + 1

    link.discard("chunks/ab/1")
    link.discard("chunks/ab/1")  # already gone: fine
    assert list(link.inbox()) == ["chunks/ab/2", "manifest"]
    with pytest.raises(TransitError, match="not in the inbox"):
        link.receive("chunks/ab/1")


def test_each_direction_has_its_own_inbox(site: Site) -> None:
    site.transit("east", "west").send("x", b"to west")
    back = site.transit("west", "east")
    assert list(back.inbox()) == []
    back.send("x", b"to east")
    assert site.transit("east", "west").receive("x") == b"to west"
    assert back.receive("x") == b"to east"


def test_resume_sends_only_what_is_missing(site: Site) -> None:
    payloads = {f"chunks/{i:02d}": bytes([i]) * (100 + i) for i in range(10)}
    first = site.transit("east", "west")
    for name in list(payloads)[:4]:  # the copy is interrupted after four payloads
        first.send(name, payloads[name])

    resumed = site.transit("east", "west")
    assert resumed.bytes_sent == 0  # counted per Transit, since it was made
    for name, payload in payloads.items():
        if not resumed.has(name):
            resumed.send(name, payload)
    assert list(resumed.inbox()) == sorted(payloads)
    assert resumed.bytes_sent == sum(len(payloads[n]) for n in list(payloads)[4:])
    assert all(resumed.receive(n) == p for n, p in payloads.items())


def test_bytes_sent_is_exact_under_threads(site: Site) -> None:
    link = site.transit("east", "west")
    threads_n, per_thread = 6, 15

    def sender(t: int) -> None:
        for i in range(per_thread):
            link.send(f"t{t}/{i}", b"x" * (i + 1))

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert link.bytes_sent == threads_n * sum(range(1, per_thread + 1))
    assert len(list(link.inbox())) == threads_n * per_thread


def test_inbox_hides_partial_deliveries(site: Site, west: Region) -> None:
    link = site.transit("east", "west")
    link.send("chunks/1", b"whole")
    inbox = west.config.path("root") / "inbox" / "local:east"
    (inbox / "chunks" / ".rv-tmp-0123456789abcdef").write_bytes(b"half")
    assert list(link.inbox()) == ["chunks/1"]


@pytest.mark.parametrize("name", ["", "/x", "a/../b", "a//b", ".rv-tmp-1", "nul\x00"])
def test_bad_payload_names(site: Site, name: str) -> None:
    link = site.transit("east", "west")
    for call in (
        lambda: link.send(name, b"x"),
        lambda: link.has(name),
        lambda: link.receive(name),
        lambda: link.discard(name),
    ):
        with pytest.raises(TransitError, match="bad payload name"):
            call()
    assert link.bytes_sent == 0


def test_sends_racing_discards_in_one_directory_raise_nothing(site: Site) -> None:
    """A discard removes its emptied directory; a send into that directory at the same moment
    must neither fail nor lose its payload (a copy's receiver discards while its sender sends)."""
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        transit = site.transit("east", "west")
        try:
            for i in range(60):
                name = f"copy/p/batch-{worker}-{i}"
                transit.send(name, b"sealed")
                assert transit.receive(name) == b"sealed"
                transit.discard(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert list(site.transit("east", "west").inbox()) == []
