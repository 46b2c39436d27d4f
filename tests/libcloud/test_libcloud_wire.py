"""The libcloud Vault and Transit where moto's S3 and Azurite are more lenient than S3,
Azure Blob Storage, MinIO or Ceph (review rlc, issue #17): the answers they never give are
put on the wire here, by the driver's own connection answering in their place. Streamed
uploads whose commit fails or is lost, two uploads of one Azure blob at once, if-absent puts
answered 409 or not honoured at all, HEAD answered 400, DELETE answered 409, ranged reads at
and past the end, the requests each call costs, killed uploads swept from the inbox and from
an Azure vault, the signing region of a store with its own, and which network failures are
transient.
"""

from __future__ import annotations

import base64
import collections
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from libcloud_world import build_region
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    TransientError,
    UnsupportedOperation,
    VaultError,
    configuration_failure,
)

MiB = 1 << 20


class Answer:
    """A response as libcloud's raw connection gives it, made up by a test."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.status = status
        self.headers = headers or {}
        self._body = body
        self.body = body.decode()

    def iter_content(self, size: int) -> Iterator[bytes]:
        yield self._body

    def parse_body(self) -> Any:
        from xml.etree import ElementTree

        return ElementTree.fromstring(self._body)


@dataclass
class Call:
    action: str
    method: str
    params: dict[str, Any]
    headers: dict[str, Any]
    real: Callable[[], Any]


def intercept(monkeypatch: pytest.MonkeyPatch, store: Any, decide: Callable[[Call], Any]) -> None:
    """Every request of ``store``'s driver (this thread's) goes through ``decide``, which
    answers in the store's place or calls ``real``."""
    connection = store.driver.connection
    real = connection.request

    def request(action: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        method = kwargs.get("method", "GET")
        call = Call(
            action, method, dict(params or {}), dict(kwargs.get("headers") or {}),
            lambda: real(action, params, *args, **kwargs),
        )  # fmt: skip
        return decide(call)

    monkeypatch.setattr(connection, "request", request)


@dataclass
class Wire:
    """Every HTTP request sent (method, path, query), all to 127.0.0.1."""

    sent: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)

    def count(self) -> int:
        return len(self.sent)


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    seen = Wire()
    original = requests.Session.send

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        url = urlsplit(request.url or "")
        assert url.hostname in ("127.0.0.1", "localhost"), request.url
        seen.sent.append((str(request.method), url.path, parse_qs(url.query, True)))
        seen.authorization.append(str(request.headers.get("Authorization", "")))
        return original(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", send)
    return seen


def only(store: dict[str, Any], *drivers: str) -> None:
    if store["driver"] not in drivers:
        pytest.skip(f"a case of {', '.join(drivers)}")


# ---------------------------------------------------------------- streamed uploads (#1, #3)


def test_a_large_object_goes_up_in_parts_the_store_commits(
    make_vault: Callable[..., Any], store: dict[str, Any], wire: Wire
) -> None:
    only(store, "s3", "azure_blobs")
    vault = make_vault(single_put_limit=MiB)
    data = os.urandom(18 * MiB + 123)
    info = vault.put("packs/big", data)
    assert info.size == len(data) and info.etag
    if store["driver"] == "s3":
        parts = [q for m, _, q in wire.sent if m == "PUT" and "partNumber" in q]
        assert len(parts) == 3 and any("uploads" in q for m, _, q in wire.sent if m == "POST")
    else:
        blocks = [q["blockid"][0] for m, _, q in wire.sent if q.get("comp") == ["block"]]
        assert len(blocks) == 3 and len({len(b) for b in blocks}) == 1
    assert vault.get("packs/big") == data
    assert vault.head("packs/big").etag == info.etag
    assert vault.get("packs/big", offset=9 * MiB - 5, length=10) == data[9 * MiB - 5 : 9 * MiB + 5]


def test_two_azure_uploads_of_one_name_never_mix_their_blocks(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer B's blocks go up between writer A's, and B dies before its commit: A's blob
    is A's bytes, whole (libcloud's block ids 1..n let B's blocks into A's blob)."""
    only(store, "azure_blobs")
    from regionvault.providers.libcloud import store as store_module

    monkeypatch.setattr(store_module, "PART", 2 * MiB)
    provider, region = build_region({**store, "single_put_limit": MiB})
    a = provider.vault(region.for_service("vault"))
    b = provider.vault(region.for_service("vault"))
    data_a, data_b = b"A" * (9 * MiB + 5), b"B" * (9 * MiB + 5)
    failed: list[BaseException] = []

    def b_dies_before_its_commit(call: Call) -> Any:
        if call.params.get("comp") == "blocklist":
            raise requests.exceptions.ConnectionError("writer B killed")
        return call.real()

    blocks = collections.Counter[str]()

    def b_runs_between_a_blocks(call: Call) -> Any:
        if call.params.get("comp") == "block":
            blocks["a"] += 1
            if blocks["a"] == 2:
                try:
                    b.put("inbox-like/payload", data_b)
                except Exception as exc:
                    failed.append(exc)
        return call.real()

    try:
        intercept(monkeypatch, a._store, b_runs_between_a_blocks)
        intercept(monkeypatch, b._store, b_dies_before_its_commit)
        a.put("inbox-like/payload", data_a)
        assert [type(e) for e in failed] == [TransientError]
        got = a.get("inbox-like/payload")
        assert got == data_a, f"torn: {got.count(b'A')} A, {got.count(b'B')} B"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            b"<Error><Code>InternalError</Code><Message>Try again.</Message></Error>",
            "InternalError",
        ),
        # an answer that is no CompleteMultipartUploadResult, an ETag inside or not
        (b"<ListPartsResult><Part><ETag>x</ETag></Part></ListPartsResult>", "no Complete"),
    ],
)
def test_an_s3_complete_answered_200_with_an_error_is_transient_and_aborted(
    make_vault: Callable[..., Any],
    store: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    error: bytes,
    says: str,
) -> None:
    only(store, "s3")
    vault = make_vault(single_put_limit=MiB)

    def complete_fails(call: Call) -> Any:
        if call.method == "POST" and "uploadId" in call.params:
            return Answer(200, error)
        return call.real()

    intercept(monkeypatch, vault._store, complete_fails)
    with pytest.raises(TransientError, match=says):
        vault.put("packs/q", os.urandom(9 * MiB))
    monkeypatch.undo()
    assert not vault.exists("packs/q")
    assert list(vault.stale_temporaries(timedelta(0))) == [], "the upload was not aborted"


def test_an_s3_complete_whose_answer_is_lost_after_it_landed_succeeds(
    make_vault: Callable[..., Any], store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    only(store, "s3")
    vault = make_vault(single_put_limit=MiB)
    data = os.urandom(9 * MiB)

    def commit_then_time_out(call: Call) -> Any:
        if call.method == "POST" and "uploadId" in call.params:
            call.real()
            raise requests.exceptions.ReadTimeout("read timed out")
        return call.real()

    intercept(monkeypatch, vault._store, commit_then_time_out)
    info = vault.put("packs/p", data)
    assert info.size == len(data)
    monkeypatch.undo()
    assert vault.get("packs/p") == data


def test_a_failed_complete_raises_its_own_error_not_the_aborts(
    make_vault: Callable[..., Any],
    store: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    only(store, "s3")
    vault = make_vault(single_put_limit=MiB)

    def complete_and_abort_fail(call: Call) -> Any:
        if call.method == "POST" and "uploadId" in call.params:
            return Answer(503, b"<Error><Code>SlowDown</Code></Error>")
        if call.method == "DELETE" and "uploadId" in call.params:
            return Answer(500, b"<Error><Code>InternalError</Code></Error>")
        return call.real()

    intercept(monkeypatch, vault._store, complete_and_abort_fail)
    with pytest.raises(TransientError, match="503"):
        vault.put("packs/r", os.urandom(9 * MiB))
    assert "aborting the upload" in caplog.text
    monkeypatch.undo()
    assert not vault.exists("packs/r")
    (left,) = vault.stale_temporaries(timedelta(0))  # the sweep finds what the abort left
    vault.remove_temporary(left)
    assert list(vault.stale_temporaries(timedelta(0))) == []


# ---------------------------------------------------------------- killed uploads (#2, #11)


def _killed_upload(store: dict[str, Any], target: Any, key: str) -> None:
    """What a writer killed between its parts leaves at ``key``."""
    driver = target.driver
    if store["driver"] == "s3":
        driver._initiate_multipart(target.container(), key)
        return
    block = base64.b64encode(b"0" * 38).decode()
    answer = driver.connection.request(
        f"/{target.name}/{key}", method="PUT", data=b"x" * 10, raw=True,
        params={"comp": "block", "blockid": block}, headers={"Content-Length": "10"},
    )  # fmt: skip
    assert answer.status == 201


def test_a_killed_streamed_send_is_swept_from_the_inbox(store: dict[str, Any]) -> None:
    only(store, "s3", "azure_blobs")
    provider, dest = build_region(store)
    _, source = build_region(store, name="libcloud:core")
    transit = provider.transit(source.for_service("vault"), dest.for_service("vault"))
    try:
        transit.send("packs/whole", b"a payload")
        _killed_upload(store, transit._inbox, transit.prefix + "packs/killed")
        (stale,) = list(transit.stale_temporaries(timedelta(0)))
        assert stale.name == "packs/killed"
        assert list(transit.inbox()) == ["packs/whole"]
        transit.remove_temporary(stale)
        assert list(transit.stale_temporaries(timedelta(0))) == []
        assert list(transit.inbox()) == ["packs/whole"]
        assert transit.receive("packs/whole") == b"a payload"
        transit.remove_temporary(stale)  # gone already is not an error
    finally:
        transit.close()


def test_azure_uncommitted_blocks_are_stale_temporaries_of_the_vault(
    make_vault: Callable[..., Any], store: dict[str, Any]
) -> None:
    only(store, "azure_blobs")
    vault = make_vault()
    vault.put("packs/whole", b"committed")
    _killed_upload(store, vault._store, "vault/packs/killed")
    assert [i.name for i in vault.list()] == ["packs/whole"]
    assert list(vault.stale_temporaries(timedelta(hours=1))) == [], "cutoff ignored"
    (stale,) = list(vault.stale_temporaries(timedelta(0)))
    assert stale.name == "packs/killed" and stale.size is None
    vault.remove_temporary(stale)
    assert list(vault.stale_temporaries(timedelta(0))) == []
    assert [i.name for i in vault.list()] == ["packs/whole"]
    with pytest.raises(ObjectNotFound):
        vault.head("packs/killed")
    # a blob committed at the name since the listing is left alone
    _killed_upload(store, vault._store, "vault/packs/later")
    (stale,) = list(vault.stale_temporaries(timedelta(0)))
    vault.put("packs/later", b"committed since")
    vault.remove_temporary(stale)
    assert vault.get("packs/later") == b"committed since"


# ---------------------------------------------------------------- if-absent puts (#5, #6)


def test_an_s3_409_to_an_if_absent_put_is_transient_not_taken(
    make_vault: Callable[..., Any], store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    only(store, "s3", "azure_blobs")
    vault = make_vault()
    _ = vault.vault_id  # the probe is done
    code = "ConditionalRequestConflict" if store["driver"] == "s3" else "LeaseIdMissing"
    body = f"<Error><Code>{code}</Code></Error>".encode()

    def conflict(call: Call) -> Any:
        if call.method == "PUT" and call.action.endswith("/locks/a"):
            return Answer(409, body, {"x-ms-error-code": code})
        return call.real()

    intercept(monkeypatch, vault._store, conflict)
    expected = TransientError if store["driver"] == "s3" else VaultError
    with pytest.raises(expected) as raised:
        vault.put("locks/a", b"mine", if_absent=True)
    assert not isinstance(raised.value, ObjectExists)
    assert code in str(raised.value)


def test_an_azure_409_blob_already_exists_is_object_exists(
    make_vault: Callable[..., Any], store: dict[str, Any], wire: Wire
) -> None:
    only(store, "azure_blobs")
    vault = make_vault()
    vault.put("locks/a", b"first", if_absent=True)
    with pytest.raises(ObjectExists):
        vault.put("locks/a", b"second", if_absent=True)


def test_conditional_put_is_probed_once_per_store_before_the_first_if_absent_put(
    make_vault: Callable[..., Any], store: dict[str, Any], wire: Wire
) -> None:
    vault = make_vault()
    vault.put("plain", b"no probe for a plain put")
    assert not [p for _, p, _ in wire.sent if "probe-" in p]
    vault.put("locks/a", b"x", if_absent=True)
    probes = [(m, p) for m, p, _ in wire.sent if "probe-" in p]
    assert [m for m, _ in probes] == ["PUT", "PUT", "DELETE"]
    assert "/.regionvault/vault/probe-" in probes[0][1]
    again = make_vault()  # another vault on the same store in this process
    again.put("locks/b", b"x", if_absent=True)
    assert len([p for _, p, _ in wire.sent if "probe-" in p]) == 3, "probed again"
    assert [i.name for i in vault.list()] == ["locks/a", "locks/b", "plain"]


def test_a_store_that_ignores_if_none_match_is_refused_if_absent_puts(
    make_vault: Callable[..., Any], store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault()

    def ignores_the_header(call: Call) -> Any:
        headers = call.headers
        if call.method == "PUT" and headers.pop("If-None-Match", None):
            return vault._store.driver.connection.__class__.request(
                vault._store.driver.connection, call.action, call.params or None,
                method="PUT", headers=headers, raw=True,
                data=b"probe" if "probe-" in call.action else b"x",
            )  # fmt: skip
        return call.real()

    intercept(monkeypatch, vault._store, ignores_the_header)
    for _ in range(2):
        with pytest.raises(UnsupportedOperation, match="conditional_put") as raised:
            vault.put("locks/a", b"x", if_absent=True)
        assert vault._store.label in str(raised.value)
    monkeypatch.undo()
    assert not vault.exists("locks/a")
    assert list(vault._store.list(".regionvault/")) == [], "the probe was left behind"


# ---------------------------------------------------------------- reads, heads, deletes (#8, #10)


def test_ranged_reads_at_and_past_the_end_are_empty(make_vault: Callable[..., Any]) -> None:
    vault = make_vault()
    vault.put("o", b"0123456789")
    vault.put("empty", b"")
    assert vault.get("o", offset=10) == b""
    assert vault.get("o", offset=10, length=5) == b""
    assert vault.get("o", offset=12, length=5) == b""
    assert vault.get("o", offset=8, length=5) == b"89"
    assert vault.get("empty", offset=0, length=5) == b""
    assert vault.get("empty") == b""
    with pytest.raises(ObjectNotFound):
        vault.get("missing", offset=12, length=5)


def test_a_range_answered_with_more_bytes_than_asked_is_an_error(
    make_vault: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault()
    vault.put("o", b"0123456789")

    def too_long(call: Call) -> Any:
        if call.method == "GET" and call.action.endswith("/o"):
            return Answer(206, b"0123456789")
        return call.real()

    intercept(monkeypatch, vault._store, too_long)
    with pytest.raises(VaultError, match="10 bytes answered for a range of 3"):
        vault.get("o", offset=2, length=3)


def test_only_a_404_is_object_not_found_and_a_delete_must_be_done(
    make_vault: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault()
    vault.put("locks/l", b"held")

    def refused(call: Call) -> Any:
        if call.action.endswith("/locks/l") and call.method in ("HEAD", "DELETE"):
            return Answer({"HEAD": 400, "DELETE": 409}[call.method])
        return call.real()

    intercept(monkeypatch, vault._store, refused)
    for call in (lambda: vault.head("locks/l"), lambda: vault.exists("locks/l")):
        with pytest.raises(VaultError, match="400") as raised:
            call()
        assert not isinstance(raised.value, ObjectNotFound)
    with pytest.raises(VaultError, match="409"):
        vault.delete("locks/l")
    monkeypatch.undo()
    assert vault.get("locks/l") == b"held"
    vault.delete("locks/l")
    vault.delete("locks/l")  # gone already


def test_a_read_answered_5xx_is_asked_again_a_write_is_not(
    make_vault: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = make_vault()
    vault.put("o", b"whole")
    _ = vault.vault_id
    sent = collections.Counter[str]()

    def fails(times: int) -> Callable[[Call], Any]:
        def decide(call: Call) -> Any:
            if call.action.endswith(("/o", "/p")):
                sent[call.method] += 1
                if sent[call.method] <= times:
                    return Answer(503, b"<Error><Code>SlowDown</Code></Error>")
            return call.real()

        return decide

    intercept(monkeypatch, vault._store, fails(2))
    assert vault.get("o") == b"whole" and sent["GET"] == 3
    monkeypatch.undo()
    sent.clear()
    intercept(monkeypatch, vault._store, fails(3))
    with pytest.raises(TransientError, match="503"):
        vault.head("o")
    assert sent["HEAD"] == 3
    with pytest.raises(TransientError, match="503"):
        vault.put("p", b"x", if_absent=True)
    assert sent["PUT"] == 1


# ---------------------------------------------------------------- requests per call (#9)


def test_what_each_call_costs_on_the_wire(
    make_vault: Callable[..., Any], store: dict[str, Any], wire: Wire
) -> None:
    vault = make_vault()
    vault.put("warm", b"x", if_absent=True)  # the container looked up, the probe done
    for label, call in (
        ("put", lambda: vault.put("p1", b"x" * 100)),
        ("if-absent put", lambda: vault.put("p2", b"x" * 100, if_absent=True)),
        ("head", lambda: vault.head("p1")),
        ("exists", lambda: vault.exists("nope")),
        ("ranged get", lambda: vault.get("p1", offset=3, length=4)),
        ("delete", lambda: vault.delete("p2")),
    ):
        before = wire.count()
        call()
        assert wire.count() - before == 1, f"{label}: {wire.sent[before:]}"
    info = vault.put("p3", b"y" * 7)
    head = vault.head("p3")
    assert (info.size, info.etag) == (head.size, head.etag)


def test_azure_lists_5000_names_a_request(
    make_vault: Callable[..., Any], store: dict[str, Any], wire: Wire
) -> None:
    only(store, "azure_blobs")
    vault = make_vault()
    for i in range(101):
        vault.put(f"idx/{i:03d}", b"i")
    before = wire.count()
    assert len(list(vault.list("idx/"))) == 101
    (listing,) = wire.sent[before:]
    assert listing[2]["maxresults"] == ["5000"]


# ---------------------------------------------------------------- settings, errors (#4, #7)


def test_an_s3_region_of_the_stores_own_is_signed_for(store: dict[str, Any], wire: Wire) -> None:
    only(store, "s3")
    provider, region = build_region(store)
    provider.vault(region.for_service("vault"))._store.container()  # made as the operator did
    provider, region = build_region({**store, "s3_region": "edge-a", "create": False})
    vault = provider.vault(region.for_service("vault"))
    before = wire.count()
    try:
        vault.put("x", b"signed for edge-a")
        assert vault.get("x") == b"signed for edge-a"
        signed = wire.authorization[before:]
        assert signed and all("/edge-a/s3/aws4_request" in a for a in signed), signed
    finally:
        vault.close()


@pytest.mark.parametrize(
    ("exc", "configuration"),
    [
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), False),
        (requests.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred")), False),
        (ssl.SSLCertVerificationError(1, "certificate verify failed: self signed"), True),
        (requests.exceptions.SSLError("certificate verify failed"), True),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), False),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), True),
        (socket.gaierror(getattr(socket, "EAI_NODATA", -5), "No address"), True),
        # libcloud re-raises EAI_NODATA without its errno
        (socket.gaierror("[Errno -5] No address associated with hostname. Perhaps"), True),
        (ConnectionResetError(104, "Connection reset by peer"), False),
    ],
)
def test_which_network_failures_are_configuration(
    exc: BaseException, configuration: bool, make_vault: Callable[..., Any]
) -> None:
    assert configuration_failure(exc) is configuration
    try:
        raise requests.exceptions.ConnectionError("wrapped") from exc
    except requests.exceptions.ConnectionError as wrapped:
        assert configuration_failure(wrapped) is configuration
    failed = make_vault()._store._fail("reading 'x'", exc)
    assert isinstance(failed, TransientError) is not configuration
