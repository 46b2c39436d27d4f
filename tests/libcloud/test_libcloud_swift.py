"""OpenStack Swift as a libcloud vault: the wire-level fake (providers/openstack/fakes/swift.py)
answers as Swift's proxy does, and the vault on it through libcloud's unmodified Swift driver
behaves as docs/edge-vault.md says: if-absent puts and the gap Swift leaves between two in
flight, uploads cut short leave no object, listings past one page, ranged reads at and past
the end, names libcloud's downloads would mangle, refused credentials named, 5 GiB."""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from libcloud_world import KEY_ENV, SECRET_ENV, build_region, swift_settings
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    TransientError,
    UnsupportedOperation,
    VaultError,
)

MiB = 1 << 20


@pytest.fixture
def swift(swift_cloud: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Makes vaults on fresh containers of the fake's Swift."""
    monkeypatch.setenv(KEY_ENV, swift_cloud.username)
    monkeypatch.setenv(SECRET_ENV, swift_cloud.password)
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        container = f"rv-swift-{len(made)}-{os.urandom(4).hex()}"
        settings = {**swift_settings(swift_cloud, container), **overrides}
        provider, region = build_region({k: v for k, v in settings.items() if v is not None})
        vault = provider.vault(region.for_service("vault"))
        made.append(vault)
        return vault

    yield make
    for vault in made:
        vault.close()


class Wire:
    """Raw HTTP to the fake's Swift account with a token keystone issued."""

    def __init__(self, cloud: Any) -> None:
        self.cloud = cloud
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": cloud.username,
                            "password": cloud.password,
                            "domain": {"name": cloud.domain},
                        }
                    },
                },
                "scope": {"project": {"name": cloud.project, "domain": {"name": cloud.domain}}},
            }
        }
        status, headers, _ = self.call("POST", "/identity/v3/auth/tokens", json.dumps(body))
        assert status == 201
        self.token = headers["x-subject-token"]
        self.account = f"/object-store/v1/AUTH_{cloud.project_id}"

    def call(
        self, method: str, path: str, body: bytes | str | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.cloud.port, timeout=30)
        try:
            sent = {k.replace("_", "-"): v for k, v in headers.items()}
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def swift(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        headers.setdefault("X_Auth_Token", self.token)
        return self.call(method, self.account + path, body, **headers)


@pytest.fixture
def wire(swift_cloud: Any) -> Wire:
    return Wire(swift_cloud)


# -- the fake, on the wire ------------------------------------------------------------------


def test_the_fake_answers_as_swift(wire: Wire, swift_cloud: Any) -> None:
    c = f"/wire-{os.urandom(4).hex()}"
    assert wire.swift("PUT", c)[0] == 201
    assert wire.swift("PUT", c)[0] == 202
    assert wire.swift("HEAD", c, X_Auth_Token="nope")[0] == 401
    assert wire.swift("GET", f"{c}/x", X_Auth_Token="")[0] == 401
    status, headers, _ = wire.swift("PUT", f"{c}/a%3Fb", b"hello")
    assert (status, headers["etag"]) == (201, "5d41402abc4b2a76b9719d911017c592")
    assert wire.swift("PUT", f"{c}/a%3Fb", b"x", If_None_Match="*")[0] == 412
    assert wire.swift("PUT", f"{c}/new", b"x", If_None_Match='"abc"')[0] == 400
    assert wire.swift("PUT", f"{c}/new", b"x", ETag="0" * 32)[0] == 422
    status, headers, _ = wire.swift("HEAD", f"{c}/a%3Fb")
    assert status == 200 and headers["content-length"] == "5"
    assert {"etag", "last-modified", "x-timestamp"} <= set(headers)
    status, headers, data = wire.swift("GET", f"{c}/a%3Fb", Range="bytes=1-2")
    assert (status, data, headers["content-range"]) == (206, b"el", "bytes 1-2/5")
    assert wire.swift("GET", f"{c}/a%3Fb", Range="bytes=-2")[2] == b"lo"
    assert wire.swift("GET", f"{c}/a%3Fb", Range="bytes=3-99")[2] == b"lo"
    status, headers, _ = wire.swift("GET", f"{c}/a%3Fb", Range="bytes=5-")
    assert (status, headers["content-range"]) == (416, "bytes */5")
    assert wire.swift("GET", f"{c}/a%3Fb", Range="bytes=x")[:3:2] == (200, b"hello")
    assert wire.swift("DELETE", c)[0] == 409
    assert wire.swift("DELETE", f"{c}/a%3Fb")[0] == 204
    assert wire.swift("DELETE", f"{c}/a%3Fb")[0] == 404
    assert wire.swift("DELETE", c)[0] == 204
    assert wire.swift("HEAD", c)[0] == 404
    assert wire.swift("PUT", f"{c}/x", b"x")[0] == 404


def test_the_fake_serves_a_read_whole_when_the_object_is_replaced_meanwhile(
    wire: Wire, swift_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET found the object; before its body is sent, another request replaces it and the
    old file is gone: the read is still the old object, whole, as Swift's object server
    serves the file it opened (the conformance suite's concurrent readers met this)."""
    fake = swift_cloud.swift
    c = f"/race-{os.urandom(4).hex()}"
    assert wire.swift("PUT", c)[0] == 201
    old, new = os.urandom(256 * 1024), os.urandom(256 * 1024)
    assert wire.swift("PUT", f"{c}/o", old)[0] == 201
    send = type(fake)._send
    replaced: list[bool] = []

    def replace_first(self: Any, handler: Any, *args: Any) -> None:
        if handler.command == "GET" and not replaced:
            replaced.append(True)
            assert wire.swift("PUT", f"{c}/o", new)[0] == 201  # the old file is unlinked
        send(self, handler, *args)

    monkeypatch.setattr(type(fake), "_send", replace_first)
    status, _, data = wire.swift("GET", f"{c}/o")
    assert replaced and status == 200 and data == old
    assert wire.swift("GET", f"{c}/o")[2] == new
    assert wire.swift("DELETE", f"{c}/o")[0] == 204
    assert wire.swift("DELETE", c)[0] == 204


def test_the_fake_refuses_past_max_file_size_and_needs_a_length(wire: Wire) -> None:
    c = f"/wire-{os.urandom(4).hex()}"
    wire.swift("PUT", c)
    conn = http.client.HTTPConnection("127.0.0.1", wire.cloud.port, timeout=30)
    try:
        conn.putrequest("PUT", f"{wire.account}{c}/huge")
        conn.putheader("X-Auth-Token", wire.token)
        conn.putheader("Content-Length", str(5 * 1024 * MiB + 3))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", wire.cloud.port, timeout=30)
    try:
        conn.putrequest("PUT", f"{wire.account}{c}/nolength")
        conn.putheader("X-Auth-Token", wire.token)
        conn.endheaders()
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert wire.swift("GET", f"{c}?format=json")[2] == b"[]"


def test_the_fake_lists_in_utf8_byte_order_by_pages(wire: Wire, swift_cloud: Any) -> None:
    c = f"/wire-{os.urandom(4).hex()}"
    wire.swift("PUT", c)
    names = ["b", "a/\u00e9", "a/z", "a/\U0001f600", "a/\uff21", "c"]
    for name in names:
        wire.swift("PUT", f"{c}/{urllib.parse.quote(name)}", b"x")

    def listing(query: str) -> list[str]:
        status, _, data = wire.swift("GET", f"{c}?format=json&{query}")
        assert status == 200
        return [row["name"] for row in json.loads(data)]

    assert listing("") == sorted(names, key=lambda n: n.encode())
    assert listing("prefix=a/&limit=2") == ["a/z", "a/\u00e9"]
    assert listing(f"prefix=a/&marker={urllib.parse.quote('a/é')}") == ["a/\uff21", "a/\U0001f600"]
    swift_cloud.swift.page_limit = 3
    try:
        assert len(listing("")) == 3
        assert wire.swift("GET", f"{c}?format=json&limit=4")[0] == 412
    finally:
        swift_cloud.swift.page_limit = 10000


# -- the vault ------------------------------------------------------------------------------


def test_swift_claims_conditional_puts_only_when_set(swift: Callable[..., Any]) -> None:
    vault = swift(conditional_put=None)
    assert vault.capabilities.conditional_put is False
    with pytest.raises(UnsupportedOperation, match="conditional_put = false"):
        vault.put("locks/a", b"x", if_absent=True)
    assert swift().capabilities.conditional_put is True


def test_if_absent_one_after_another_and_the_gap_of_two_in_flight(
    swift: Callable[..., Any], swift_cloud: Any
) -> None:
    vault = swift()
    results: list[object] = []

    def put(data: bytes) -> None:
        try:
            vault.put("config", data, if_absent=True)
            results.append("won")
        except ObjectExists as exc:
            results.append(exc)

    # one after another: Swift finds the name and answers 412
    for data in (b"first", b"second"):
        t = threading.Thread(target=put, args=(data,))
        t.start()
        t.join(30)
    assert results[0] == "won" and isinstance(results[1], ObjectExists)
    assert vault.get("config") == b"first"
    # two in flight at once: Swift checks If-None-Match when a PUT arrives, so both pass the
    # check and both land (the later-stamped one is the object): what docs/edge-vault.md says
    results.clear()
    release = swift_cloud.swift.hold_next_put(r"/locks/race$")
    first = threading.Thread(target=lambda: _put_quietly(vault, b"one", results))
    first.start()
    _wait_until(lambda: not swift_cloud.swift._holds)  # the first PUT passed its check
    second = threading.Thread(target=lambda: _put_quietly(vault, b"two", results))
    second.start()
    second.join(30)
    release.set()
    first.join(30)
    assert sorted(map(str, results)) == ["won", "won"], results
    assert vault.get("locks/race") == b"two"


def _put_quietly(vault: Any, data: bytes, results: list[object]) -> None:
    try:
        vault.put("locks/race", data, if_absent=True)
        results.append("won")
    except ObjectExists as exc:
        results.append(exc)


def _wait_until(check: Callable[[], bool], seconds: float = 10) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_upload_cut_short_leaves_no_object(swift: Callable[..., Any], swift_cloud: Any) -> None:
    vault = swift(single_put_limit=MiB)
    data = os.urandom(3 * MiB + 5)
    # the connection ends mid-body (a network cut): the streamed (chunked) PUT fails
    swift_cloud.swift.cut_next_put(r"/packs/cut$", after=MiB + 17)
    with pytest.raises(TransientError):
        vault.put("packs/cut", data)

    # the writer dies mid-body: its stream raises after the first part
    def killed() -> Iterator[bytes]:
        yield data[:MiB]
        raise RuntimeError("killed")

    store = vault._store
    driver = store._make()  # its connection dies with the writer
    with pytest.raises(RuntimeError, match="killed"):
        driver.upload_object_via_stream(killed(), store.container(), "vault/packs/killed")
    driver.connection.connection.session.close()
    for name in ("packs/cut", "packs/killed"):
        with pytest.raises(ObjectNotFound):
            vault.head(name)
    assert list(vault.list("packs/")) == []
    _wait_until(lambda: swift_cloud.swift.temporaries() == [])
    assert list(vault.stale_temporaries(__import__("datetime").timedelta(0))) == []
    vault.put("packs/cut", data)
    assert vault.get("packs/cut") == data


def test_listing_past_one_page(swift: Callable[..., Any], swift_cloud: Any) -> None:
    vault = swift()
    names = [f"idx/{i:02d}" for i in range(8)] + ["idx/\u00e9", "other/x"]
    for name in names:
        vault.put(name, name.encode())
    swift_cloud.swift.page_limit = 3
    before = swift_cloud.swift.counts["GET container"]
    try:
        listed = [info.name for info in vault.list("idx/")]
    finally:
        swift_cloud.swift.page_limit = 10000
    assert listed == names[:9]
    assert swift_cloud.swift.counts["GET container"] - before >= 4, "not listed by pages"


def test_ranged_reads_at_and_past_the_end(swift: Callable[..., Any]) -> None:
    vault = swift()
    data = os.urandom(1000)
    vault.put("r", data)
    assert vault.get("r", offset=999, length=1) == data[999:]
    assert vault.get("r", offset=990, length=100) == data[990:]
    assert vault.get("r", offset=0, length=1000) == data
    assert vault.get("r", offset=500) == data[500:]
    assert vault.get("r", offset=1000, length=0) == b""
    # Swift answers 416: nothing there, as the other providers' vaults answer
    assert vault.get("r", offset=1000, length=1) == b""
    assert vault.get("r", offset=1200) == b""
    with pytest.raises(ObjectNotFound):
        vault.get("missing", offset=3, length=4)


def test_names_libclouds_downloads_would_mangle(swift: Callable[..., Any]) -> None:
    vault = swift()
    names = ["q/a?b=c", "q/h#frag", "q/p%20c", "q/sp ace", "q/\u00e9+&;"]
    for name in names:
        vault.put(name, name.encode())
    for name in names:
        assert vault.get(name) == name.encode()
        assert vault.get(name, offset=1, length=2) == name.encode()[1:3]
        assert vault.head(name).size == len(name.encode())
    assert sorted(i.name for i in vault.list("q/")) == sorted(names, key=lambda n: n.encode())
    for name in names:
        vault.delete(name)
    assert list(vault.list("q/")) == []


def test_refused_credentials_are_named(
    swift: Callable[..., Any], swift_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = swift()
    vault.put("x", b"x")
    # Swift answers 401 (a token revoked or expired) to a read
    swift_cloud.swift.fail_next("GET", r"/x$", 401)
    with pytest.raises(VaultError, match=f"credentials from {KEY_ENV}/{SECRET_ENV}"):
        vault.get("x")
    # keystone refuses the password
    monkeypatch.setenv(SECRET_ENV, "wrong")
    with pytest.raises(VaultError, match=f"credentials from {KEY_ENV}/{SECRET_ENV}"):
        swift().head("x")


def test_a_put_carries_its_md5_for_swift_to_check(
    swift: Callable[..., Any], swift_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    vault = swift()
    sent: list[dict[str, str]] = []
    connection = vault._store.driver.connection
    original = connection.request

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("method") == "PUT":
            sent.append(dict(kwargs.get("headers") or {}))
        return original(*args, **kwargs)

    monkeypatch.setattr(connection, "request", spy)
    assert vault.put("m", b"payload").etag == hashlib.md5(b"payload").hexdigest()
    assert sent[-1]["ETag"] == hashlib.md5(b"payload").hexdigest()


def test_over_5_gib_is_refused_before_sending(
    swift: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, swift_cloud: Any
) -> None:
    from regionvault.providers.libcloud import store

    vault = swift()
    monkeypatch.setattr(store, "SWIFT_MOST", 10)
    before = swift_cloud.swift.counts["PUT object"]
    with pytest.raises(VaultError, match="no SLO/DLO segments"):
        vault.put("big", b"x" * 11)
    assert swift_cloud.swift.counts["PUT object"] == before
