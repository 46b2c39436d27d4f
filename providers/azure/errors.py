"""azure-core's errors onto regionvault's error tree: the one place that says which Azure
failures are transient.

Transient, raised as :class:`~regionvault.core.errors.TransientError` (the executor retries
the job with backoff, docs/jobs.md), once azure-core's own retries have given up:

- an answer with HTTP status 429 or 5xx (but 501 and 505), or whose error code is one of
  :data:`TRANSIENT_CODES` (Storage's ``ServerBusy``, ``OperationTimedOut``, ``InternalError``;
  Key Vault's and ARM's throttling codes) for an answer whose status was lost on the way;
- no answer: azure-core's ``ServiceRequestError`` (could not connect, connect timeout) and
  ``ServiceResponseError`` (read timeout, connection dropped, answer cut off), except a TLS
  failure, which is a configuration problem and does not pass by waiting.

Everything else (denied, not found, a conflict the protocol defines, invalid) is the caller's
error class (``VaultError``, ``TransitError``, ...) and is not retried.
"""

from __future__ import annotations

from collections.abc import Callable

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from regionvault.core.errors import RegionVaultError, TransientError

__all__ = [
    "TRANSIENT_CODES",
    "azure_error",
    "error_code",
    "error_message",
    "error_status",
    "is_transient",
    "retry_after",
]

#: error codes of a throttled call or of a failure on the service's side
TRANSIENT_CODES = frozenset(
    {
        "ServerBusy",
        "OperationTimedOut",
        "InternalError",
        "ServiceUnavailable",
        "Throttled",
        "TooManyRequests",
    }
)


def error_code(exc: BaseException) -> str:
    """The Azure error code of an HttpResponseError ('' for anything else)."""
    code = getattr(exc, "error_code", None)
    if code:
        return str(getattr(code, "value", code))  # the SDK's StorageErrorCode is an enum
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        return str(headers.get("x-ms-error-code", "") or "")
    return ""


def error_status(exc: BaseException) -> int | None:
    """The HTTP status of an HttpResponseError (None for anything else)."""
    status = getattr(exc, "status_code", None)
    return int(status) if isinstance(status, int) else None


def error_message(exc: BaseException) -> str:
    """A one-line description of an azure-core error, for messages that name the operation.
    Only the code and the status: the SDK's own message repeats the request (its URL may
    carry a SAS signature), which must not reach a log."""
    code = error_code(exc)
    status = error_status(exc)
    if code or status is not None:
        return f"{code or 'error'} (HTTP {status})" if status is not None else code
    if isinstance(exc, ServiceRequestError):
        return "no connection to the service"
    if isinstance(exc, ServiceResponseError):
        return "no complete answer from the service (timeout or dropped connection)"
    return type(exc).__name__


def _tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    for _depth in range(10):
        if current is None or id(current) in seen:
            return False
        seen.add(id(current))
        if "SSL" in type(current).__name__ or "Certificate" in type(current).__name__:
            return True
        inner = getattr(current, "inner_exception", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (from an Azure SDK call) may pass if the call is made again later."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return not _tls_failure(exc)
    if not isinstance(exc, HttpResponseError):
        return False
    if error_code(exc) in TRANSIENT_CODES:
        return True
    status = error_status(exc)
    # 501 Not Implemented and 505 are answers about the request, which waiting never changes
    return status is not None and (
        status == 429 or (500 <= status <= 599 and status not in (501, 505))
    )


def retry_after(exc: BaseException) -> float | None:
    """The seconds a ``Retry-After`` header of the answer asked for, if it gave a number."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        seconds = float(headers.get("Retry-After", "") or "")
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def azure_error(
    exc: BaseException,
    message: str,
    category: Callable[..., RegionVaultError],
    *,
    region: str,
) -> RegionVaultError:
    """The error to raise for ``exc``: :class:`TransientError` when it is transient, else
    ``category(message, provider="azure", region=region)``. ``message`` names the operation
    and the object, and ends with :func:`error_message` of ``exc``."""
    if isinstance(exc, AzureError) and is_transient(exc):
        return TransientError(
            message, provider="azure", region=region, retry_after=retry_after(exc)
        )
    return category(message, provider="azure", region=region)
