"""azure-core's errors onto regionvault's error tree: the one place that says which Azure
failures are transient.

Transient, raised as :class:`~regionvault.core.errors.TransientError` (the executor retries
the job with backoff, docs/jobs.md), once azure-core's own retries have given up:

- an answer with HTTP status 429, 500, 502, 503 or 504 (never 501 or 505), or whose error
  code is one of :data:`TRANSIENT_CODES` (Storage's ``ServerBusy``, ``OperationTimedOut``,
  ``InternalError``; Key Vault's and ARM's throttling codes) for an answer whose status was
  lost on the way;
- no answer: azure-core's ``ServiceRequestError`` (connection refused, connect timeout) and
  ``ServiceResponseError`` (read timeout, connection dropped, answer cut off), except a TLS
  failure and a host name with no address (``EAI_NONAME``, ``EAI_NODATA``), which are
  configuration and do not pass by waiting; a resolver that did not answer (``EAI_AGAIN``)
  is transient.

Everything else (denied, not found, a conflict the protocol defines, invalid) is the caller's
error class (``VaultError``, ``TransitError``, ...) and is not retried.
"""

from __future__ import annotations

import socket
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
    "TRANSIENT_STATUSES",
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
        if _unresolved(exc):
            return "the endpoint's host name does not resolve (check the site's account settings)"
        return "no connection to the service"
    if isinstance(exc, ServiceResponseError):
        return "no complete answer from the service (timeout or dropped connection)"
    return type(exc).__name__


#: HTTP statuses of a throttled call or a failure on the service's side (not 501 or 505,
#: which an endpoint answers for a feature it lacks, every time: Azurite's immutability)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what lies under it (azure-core's ``inner_exception``, requests' and
    urllib3's wrapped errors), bounded: a chain of causes, not a graph to walk."""
    seen: set[int] = set()
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 32:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        todo.extend(
            getattr(item, n, None) for n in ("inner_exception", "reason", "_reason", "__cause__")
        )
        todo.append(item.__context__)
        todo.extend(item.args)
    return found


#: the resolver's answers for a name with no address, which fail every time (EAI_AGAIN, a
#: resolver that did not answer, may pass: transient)
_NO_SUCH_NAME = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
)


def _unresolved(exc: BaseException) -> bool:
    """A host name with no address, as the resolver answered, somewhere under ``exc`` (the
    ``socket.gaierror`` under urllib3's ``NameResolutionError``); a resolution failure that
    does not say why is taken for one too, as in the aws provider."""
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return cause.errno in _NO_SUCH_NAME
    return any(type(c).__name__ == "NameResolutionError" for c in causes)


def _configuration_failure(exc: BaseException) -> bool:
    """A TLS failure, or a host name that does not resolve, somewhere under ``exc``: each
    fails every time until someone edits the site file (docs/writing-a-provider.md)."""
    tls = any("SSL" in type(c).__name__ or "Certificate" in type(c).__name__ for c in _causes(exc))
    return tls or _unresolved(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (from an Azure SDK call) may pass if the call is made again later."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return not _configuration_failure(exc)
    if not isinstance(exc, HttpResponseError):
        return False
    if error_code(exc) in TRANSIENT_CODES:
        return True
    return error_status(exc) in TRANSIENT_STATUSES


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
