"""The Azure provider's transient mapping, with the real SDK over real connections: answers
Azure gives when it throttles or fails (replayed by a scripted adapter in front of Azurite),
a server that never answers, and one that is not there, each raise ``TransientError``; a
denial, a missing container and "not implemented" do not."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from azure_world import EAST, AzureWorld, error_answer
from regionvault.core.errors import TransientError, TransitError, VaultError
from regionvault.providers.azure.azurite import free_port


@pytest.mark.parametrize(
    ("status", "code", "retry_after"),
    [
        (503, "ServerBusy", "2"),
        (500, "InternalError", None),
        (500, "OperationTimedOut", None),
        (429, "TooManyRequests", "1"),
        (502, "", None),
    ],
)
def test_throttling_and_server_errors_are_transient(
    azure: AzureWorld, status: int, code: str, retry_after: str | None
) -> None:
    provider, adapter = azure.scripted()
    vault = azure.track(provider.vault(azure.region(EAST)))
    vault.put("a", b"x")
    headers = {"Retry-After": retry_after} if retry_after else {}
    adapter.rules.append(
        lambda s: error_answer(status, code, **headers) if s.method == "GET" else None
    )
    with pytest.raises(TransientError) as failed:
        vault.get("a")
    assert failed.value.region == "azure:east"
    assert "'a'" in str(failed.value) and f"HTTP {status}" in str(failed.value)
    assert failed.value.retry_after == (float(retry_after) if retry_after else None)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (403, "AuthorizationPermissionMismatch"),
        (501, "APINotImplemented"),
        (505, ""),
        (400, "InvalidHeaderValue"),
    ],
)
def test_denials_and_bad_requests_are_not_transient(
    azure: AzureWorld, status: int, code: str
) -> None:
    provider, adapter = azure.scripted()
    vault = azure.track(provider.vault(azure.region(EAST)))
    vault.put("a", b"x")
    adapter.rules.append(lambda s: error_answer(status, code) if s.method == "GET" else None)
    with pytest.raises(VaultError) as failed:
        vault.get("a")
    assert not isinstance(failed.value, TransientError)
    assert f"{code or 'error'} (HTTP {status})" in str(failed.value)


def test_the_sdk_retries_before_the_error_is_raised(azure: AzureWorld) -> None:
    # the storage SDK's exponential backoff starts at 15 s: made short for the test
    provider, adapter = azure.scripted(initial_backoff=0.01, increment_base=0.01)
    vault = azure.track(provider.vault(azure.region(EAST, sdk_retries=2)))
    vault.put("a", b"x")
    answers = iter([error_answer(503, "ServerBusy", **{"Retry-After": "0"})] * 2)
    adapter.rules.append(lambda s: next(answers, None) if s.method == "GET" else None)
    assert vault.get("a") == b"x"  # two 503s, then Azurite's answer
    assert [s.method for s in adapter.seen].count("GET") == 3


def test_no_server_is_transient(azure: AzureWorld) -> None:
    closed = f"http://127.0.0.1:{free_port()}/east"
    vault = azure.track(azure.provider.vault(azure.region(EAST, account_url=closed, create=False)))
    with pytest.raises(TransientError, match="no connection to the service"):
        vault.get("a")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A listener on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    done = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        done.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_an_answer_that_never_comes_is_transient(azure: AzureWorld, silent_server: int) -> None:
    url = f"http://127.0.0.1:{silent_server}/east"
    region = azure.region(EAST, account_url=url, create=False, read_timeout=1)
    transit = azure.track(azure.provider.transit(azure.region("west"), region))
    with pytest.raises(TransientError) as failed:
        list(transit.inbox())
    assert "no complete answer" in str(failed.value)
    assert not isinstance(failed.value, TransitError)


def test_a_host_name_that_does_not_resolve_is_configuration(azure: AzureWorld) -> None:
    """It fails every time until the site file is edited: not transient (the SDK's own
    retries wait out a resolver that is down for a moment)."""
    url = "http://rv-no-such-host.invalid/east"
    vault = azure.track(azure.provider.vault(azure.region(EAST, account_url=url, create=False)))
    with pytest.raises(VaultError) as failed:
        vault.get("a")
    assert not isinstance(failed.value, TransientError)
    assert "host name does not resolve" in str(failed.value)


@pytest.mark.parametrize(
    ("errno", "transient"),
    [("EAI_AGAIN", True), ("EAI_NONAME", False), ("EAI_NODATA", False)],
)
def test_a_resolver_that_did_not_answer_is_transient(errno: str, transient: bool) -> None:
    """A resolver that did not answer may answer later; a name with no address will not."""
    from azure.core.exceptions import ServiceRequestError
    from regionvault.providers.azure.errors import is_transient

    if not hasattr(socket, errno):
        pytest.skip(f"this platform has no socket.{errno}")
    error = ServiceRequestError("no connection", error=socket.gaierror(getattr(socket, errno), "x"))
    assert is_transient(error) is transient
