"""Errors of the Cloud Storage vault and transit that must name the right thing: a token
endpoint or metadata server that does not answer (transient), a login refused (naming the
credentials), and a 404 to a chunk of a resumable upload (its session, not the bucket).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from regionvault.core.errors import RegionVaultError, TransientError, TransitError, VaultError
from regionvault.providers.gcp.storage import GcsVault
from regionvault.providers.gcp.transit import GcsTransit
from storage_world import EAST, WEST, GcsWorld, RecordingAdapter, gcs, gcs_error

__all__ = ["gcs"]  # the fixtures, imported for pytest to find

MiB = 1024 * 1024


class _FailingLogin(auth_credentials.Credentials):  # type: ignore[misc]
    """Credentials whose token refresh raises ``error`` (google-auth's own exceptions)."""

    def __init__(self, error: Exception, email: str | None = None) -> None:
        super().__init__()
        self._error = error
        if email is not None:
            self.service_account_email = email

    def refresh(self, request: Any) -> None:
        raise self._error


def _calls(service: GcsVault | GcsTransit) -> list[tuple[str, Callable[[], object]]]:
    if isinstance(service, GcsVault):
        vault = service
        return [
            ("get", lambda: vault.get("x")),
            ("put", lambda: vault.put("x", b"1")),
            ("put if-absent", lambda: vault.put("x", b"1", if_absent=True)),
            ("list", lambda: list(vault.list(""))),
            ("delete", lambda: vault.delete("x")),
        ]
    transit = service
    return [
        ("send", lambda: transit.send("x", b"1")),
        ("has", lambda: transit.has("x")),
        ("receive", lambda: transit.receive("x")),
    ]


def _services(gcs: GcsWorld, credentials: Any) -> list[GcsVault | GcsTransit]:
    region = gcs.region(EAST, create=False)
    settings = gcs.provider.settings(region)
    vault = GcsVault(
        region=region,
        settings=settings,
        credentials=credentials,
        capabilities=gcs.provider._vault_capabilities(settings),
    )
    destination = gcs.region(WEST, create=False)
    transit = GcsTransit(
        source=region,
        destination=destination,
        settings=gcs.provider.settings(destination),
        credentials=credentials,
        capabilities=gcs.provider.capabilities,
    )
    return [gcs.track(vault), gcs.track(transit)]


def test_a_token_endpoint_that_does_not_answer_is_transient(gcs: GcsWorld) -> None:
    no_answer = auth_exceptions.TransportError(
        "HTTPSConnectionPool(host='oauth2.googleapis.com'): connection reset"
    )
    for service in _services(gcs, _FailingLogin(no_answer)):
        for what, call in _calls(service):
            with pytest.raises(TransientError) as failed:
                call()
            assert "no answer from the token endpoint or metadata server" in str(failed.value), what


@pytest.mark.parametrize(
    ("email", "named"),
    [
        ("backup@proj.iam.gserviceaccount.com", "service account backup@proj.iam"),
        (None, "anonymous credentials"),
    ],
)
def test_a_refused_login_names_the_credentials(
    gcs: GcsWorld, email: str | None, named: str
) -> None:
    refused = auth_exceptions.RefreshError(
        "invalid_grant: Invalid JWT Signature.", {"error": "invalid_grant"}
    )
    for service in _services(gcs, _FailingLogin(refused, email)):
        expected: type[RegionVaultError] = (
            VaultError if isinstance(service, GcsVault) else TransitError
        )
        for what, call in _calls(service):
            with pytest.raises(expected) as failed:
                call()
            assert not isinstance(failed.value, TransientError), what
            text = str(failed.value)
            assert named in text and "cannot log in" in text, (what, text)
            assert "invalid_grant: Invalid JWT Signature." in text, what


def test_a_404_to_an_upload_chunk_is_the_session_not_the_bucket(gcs: GcsWorld) -> None:
    """Cloud Storage answers 404 to a chunk of a resumable upload whose session it no longer
    knows (expired after a week, or cancelled): a new put starts a new session, so transient;
    the bucket exists. A 404 to the request that starts an upload is the missing bucket."""
    adapter = RecordingAdapter()
    vault = gcs.vault(adapter=adapter, single_put_limit=1 * MiB, upload_chunk_size=256 * 1024)
    vault.vault_id  # noqa: B018 - makes the bucket first
    adapter.rules.append(
        lambda s: (
            gcs_error(404, "notFound", "No such upload")
            if s.method == "PUT" and "upload_id" in s.query
            else None
        )
    )
    with pytest.raises(TransientError) as expired:
        vault.put("packs/big", os.urandom(1 * MiB + 100))
    text = str(expired.value)
    assert "no longer knows its resumable upload session" in text
    assert "does not exist" not in text
    adapter.rules[:] = [
        lambda s: gcs_error(404, "notFound") if s.path.startswith("/upload/") else None
    ]
    for size in (100, 1 * MiB + 100):
        with pytest.raises(VaultError, match="does not exist") as missing:
            vault.put("packs/other", os.urandom(size))
        assert not isinstance(missing.value, TransientError)


def test_a_name_that_does_not_resolve_or_a_tls_failure_is_not_transient() -> None:
    """Storage and compute agree: no answer may pass later, but a host name without an
    address or a TLS failure fails every time until the site file changes."""
    import requests
    import urllib3
    from regionvault.providers.gcp.clients import is_transient

    def refused(cause: BaseException) -> requests.ConnectionError:
        try:
            raise requests.ConnectionError("no answer") from cause
        except requests.ConnectionError as exc:
            return exc

    resolving = urllib3.exceptions.NameResolutionError(
        "storage.example.invalid", None, OSError("Name or service not known")
    )
    assert not is_transient(refused(resolving))
    assert not is_transient(refused(requests.exceptions.SSLError("certificate verify failed")))
    assert is_transient(refused(ConnectionRefusedError(111, "Connection refused")))
    assert is_transient(requests.Timeout("read timed out"))
