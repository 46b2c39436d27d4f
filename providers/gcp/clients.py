"""google-cloud-storage clients for the GCP provider, every HTTP attempt counted, and the
one place that maps the storage SDK's errors onto regionvault's error tree.

A client is the real ``google.cloud.storage.Client``, aimed at ``storage_endpoint`` when one
is set (``client_options={"api_endpoint": ...}``), talking through a google-auth
``AuthorizedSession`` that records every request it sends (retries included: the SDK's
retry wrappers call the session again) as ``metrics.record(region, "storage", op, bytes)``.

Transient (raised as :class:`~regionvault.core.errors.TransientError`, retried by the
executor): HTTP 408, 429, 500, 502, 503, 504, no answer at all (a refused or dropped
connection, a timeout), and no answer from the token endpoint or metadata server (google-auth's
``TransportError``). Everything else is the caller's error class; a login refused
(google-auth's ``RefreshError``) names the credentials.
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.transport.requests import AuthorizedSession
from google.cloud.storage import Client
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY
from regionvault.core.errors import RegionVaultError, TransientError, configuration_failure

if TYPE_CHECKING:
    from regionvault.providers.gcp.metrics import GcpMetrics
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = [
    "TRANSIENT_STATUSES",
    "CountedRetry",
    "CountingSession",
    "describe_credentials",
    "error_reason",
    "error_status",
    "error_text",
    "is_transient",
    "operation_of",
    "sdk_retry",
    "storage_client",
    "storage_error",
]

#: HTTP statuses of a throttled call or a failure on the service's side
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def operation_of(method: str, url: str) -> str:
    """The short name of one Cloud Storage JSON API request, for the metrics."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    path = parts.path
    method = method.upper()
    if path.startswith("/upload/"):
        if method == "POST":
            kind = (query.get("uploadType") or [""])[0]
            return "POST upload-session" if kind == "resumable" else "POST upload"
        return f"{method} upload-chunk"
    if path.startswith("/download/") or (query.get("alt") or [""])[0] == "media":
        return f"{method} media"
    segments = [s for s in path.split("/") if s]
    # storage/v1/b[/BUCKET[/o[/OBJECT]]]
    if len(segments) >= 6 and segments[4] == "o":
        return f"{method} object"
    if len(segments) == 5 and segments[4] == "o":
        return f"{method} list" if method == "GET" else f"{method} objects"
    if len(segments) in (3, 4) and segments[2] == "b":
        return f"{method} bucket"
    return f"{method} other"


def _body_size(data: Any) -> int:
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data)
    if isinstance(data, str):
        return len(data.encode("utf-8"))
    return 0


class CountingSession(AuthorizedSession):
    """An AuthorizedSession that records every request it sends in ``metrics``."""

    def __init__(self, credentials: Any, *, metrics: GcpMetrics | None, region: str) -> None:
        super().__init__(credentials)  # type: ignore[no-untyped-call]
        self._metrics = metrics
        self._region = region

    def request(  # type: ignore[override]
        self, method: str, url: str, data: Any = None, headers: Any = None, **kwargs: Any
    ) -> requests.Response:
        if self._metrics is not None:
            self._metrics.record(
                self._region, "storage", operation_of(method, url), _body_size(data)
            )
        response: requests.Response = super().request(  # type: ignore[no-untyped-call]
            method, url, data=data, headers=headers, **kwargs
        )
        return response


def storage_client(
    settings: GcpSettings,
    credentials: Any,
    *,
    metrics: GcpMetrics | None,
    adapter: requests.adapters.HTTPAdapter | None = None,
) -> Client:
    """A Cloud Storage client for a region's settings. ``adapter`` (tests) is mounted on
    its session for http and https: it sees every request the SDK sends."""
    session = CountingSession(credentials, metrics=metrics, region=settings.region)
    if adapter is not None:
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    options = {"api_endpoint": settings.storage_endpoint} if settings.storage_endpoint else None
    return Client(
        project=settings.project,
        credentials=credentials,
        _http=session,
        client_options=options,
    )


class CountedRetry(Retry):
    """The storage SDK's retry (its predicate, exponential backoff, ``timeout``) that also
    gives up after :attr:`retries` retries of one call: google-api-core bounds retries by
    time only. The count is a class attribute so that the SDK's ``with_*`` copies (made with
    the base constructor's arguments) keep it; :func:`sdk_retry` makes the subclass."""

    retries: ClassVar[int] = 0

    def __call__(
        self, func: Callable[..., Any], on_error: Callable[[Exception], Any] | None = None
    ) -> Callable[..., Any]:
        base = self._predicate
        limit = self.retries

        @functools.wraps(func)
        def counted(*args: Any, **kwargs: Any) -> Any:
            left = limit

            def predicate(exc: Exception) -> bool:
                nonlocal left
                if left <= 0 or not base(exc):
                    return False
                left -= 1
                return True

            once = Retry(
                predicate=predicate,
                initial=self._initial,
                maximum=self._maximum,
                multiplier=self._multiplier,
                timeout=self._timeout,
                on_error=self._on_error,
            )
            return once(func, on_error)(*args, **kwargs)

        return counted


def sdk_retry(settings: GcpSettings) -> Retry | None:
    """The retry policy of every storage call: none with ``sdk_retries = 0``, else the
    SDK's own (its transient answers, exponential backoff from 1 s), at most
    ``sdk_retries`` retries and no new one after ``timeout`` seconds."""
    if settings.sdk_retries == 0:
        return None
    counted = type(
        f"Retry{settings.sdk_retries}", (CountedRetry,), {"retries": settings.sdk_retries}
    )
    retry: Retry = counted(
        predicate=DEFAULT_RETRY._predicate,
        initial=DEFAULT_RETRY._initial,
        maximum=DEFAULT_RETRY._maximum,
        multiplier=DEFAULT_RETRY._multiplier,
        timeout=float(settings.timeout),
    )
    return retry


# --------------------------------------------------------------------------- errors


def error_status(exc: BaseException) -> int | None:
    """The HTTP status of a google-api-core error (None for anything else)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return int(status) if isinstance(status, int) else None


def error_reason(exc: BaseException) -> str:
    """The first ``reason`` of a Cloud Storage error answer ('' when it gave none)."""
    errors = list(getattr(exc, "errors", None) or [])
    if not errors:
        # the media paths (uploads, downloads) raise with the answer, not its parsed errors
        response = getattr(exc, "response", None)
        try:
            document = response.json() if response is not None else {}
            errors = list(document.get("error", {}).get("errors", []))
        except (ValueError, AttributeError, RuntimeError):
            errors = []
    for item in errors:
        if isinstance(item, dict) and item.get("reason"):
            return str(item["reason"])
    return ""


def error_text(exc: BaseException) -> str:
    """The message of a Cloud Storage error answer ('' when it gave none), for matching
    the service's documented wording; never for logs (error_message is for those)."""
    response = getattr(exc, "response", None)
    try:
        document = response.json() if response is not None else {}
        text = document.get("error", {}).get("message", "")
    except (ValueError, AttributeError, RuntimeError):
        text = ""
    return str(text or getattr(exc, "message", "") or "")


def describe_credentials(settings: GcpSettings, credentials: Any) -> str:
    """Which credentials a client logs in with, for an error that says they were refused:
    the service account's e-mail when they have one, else the kind the settings name (and
    its key file)."""
    email = getattr(credentials, "service_account_email", None)
    if isinstance(email, str) and "@" in email:
        return f"service account {email}"
    if settings.credentials_file is not None:
        return f"{settings.credentials} credentials ({settings.credentials_file})"
    return f"{settings.credentials} credentials"


def _first_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line[:limit] + "..." if len(line) > limit else line


def error_message(exc: BaseException) -> str:
    """One line about a storage error: its status and reason, or what happened on the way;
    never the SDK's own text, which repeats the request's URL."""
    if isinstance(exc, DataCorruption):
        return "the bytes transferred do not match their checksum"
    if isinstance(exc, auth_exceptions.TransportError):
        return "no answer from the token endpoint or metadata server (TransportError)"
    if isinstance(exc, auth_exceptions.GoogleAuthError):
        return f"the login was refused ({type(exc).__name__}: {_first_line(str(exc))})"
    status = error_status(exc)
    if status is not None:
        reason = error_reason(exc)
        return f"{reason or type(exc).__name__} (HTTP {status})"
    if isinstance(exc, requests.ConnectionError):
        return "no connection to Cloud Storage"
    if isinstance(exc, requests.Timeout):
        return "no answer from Cloud Storage in time"
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (from a storage call) may pass if the call is made again later."""
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        # no answer; but a TLS failure or a name that does not resolve fails every time
        return not configuration_failure(exc)
    if isinstance(exc, api_exceptions.RetryError | DataCorruption | auth_exceptions.TransportError):
        # out of retries on transient answers; a transfer damaged on the way; no token
        return True
    return error_status(exc) in TRANSIENT_STATUSES


#: what a storage call may raise besides the HTTP errors
SDK_ERRORS: tuple[type[BaseException], ...] = (
    api_exceptions.GoogleAPIError,
    requests.RequestException,
    DataCorruption,
    InvalidResponse,
    auth_exceptions.GoogleAuthError,  # no token: the token endpoint, or a refused login
)


def storage_error(
    exc: BaseException,
    message: str,
    category: Callable[..., RegionVaultError],
    *,
    region: str,
    credentials: str | None = None,
) -> RegionVaultError:
    """:class:`TransientError` when ``exc`` is transient, else ``category(message)``;
    ``message`` names the operation and ends with :func:`error_message` of ``exc``; a
    refused login names ``credentials`` (:func:`describe_credentials`)."""
    text = f"{message}: {error_message(exc)}"
    if credentials is not None and isinstance(exc, auth_exceptions.RefreshError):
        text = f"{message}: {credentials} cannot log in: {error_message(exc)}"
    if is_transient(exc):
        return TransientError(text, provider="gcp", region=region)
    return category(text, provider="gcp", region=region)
