"""botocore's errors onto regionvault's error tree: the one place that says which AWS
failures are transient.

Transient, raised as :class:`~regionvault.core.errors.TransientError` (the executor retries
the job with backoff, docs/jobs.md), once botocore's own retries (standard mode, see
clients.py) have given up:

- a service answer whose error code is a throttling code (:data:`THROTTLING_CODES`: the
  codes botocore's standard retry mode treats as throttling, S3's ``SlowDown`` among them,
  except those a service uses for a quota, :data:`QUOTA_CODES`: KMS's
  ``LimitExceededException``) or a transient one (:data:`TRANSIENT_CODES`), or whose HTTP
  status is one of :data:`TRANSIENT_STATUSES` (429, 500, 502, 503, 504: botocore's; never
  501 or 505, which an S3-compatible endpoint sends for what it does not implement);
- no answer: a connect or read timeout, a refused or dropped connection, a response stream
  broken off (botocore's ``ConnectionError`` and ``HTTPClientError`` families), except a TLS
  failure (``SSLError``) and a host name that does not resolve (a mistyped region, endpoint
  or proxy), which are configuration problems and do not pass by waiting.

Everything else (denied, not found, invalid, a missing bucket) is the caller's error class
(``VaultError``, ``KeyServiceError``, ``ComputeError``, ``TransitError``) and is not retried.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, SSLError
from regionvault.core.errors import RegionVaultError, TransientError

__all__ = [
    "QUOTA_CODES",
    "THROTTLING_CODES",
    "TRANSIENT_CODES",
    "TRANSIENT_STATUSES",
    "aws_error",
    "error_code",
    "error_message",
    "error_status",
    "is_transient",
    "retry_after",
]

#: error codes of a throttled call: botocore's standard retry mode's list
#: (botocore/retries/standard.py, ThrottledRetryableChecker; a test checks it is covered)
THROTTLING_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
        "LimitExceededException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "TransactionInProgressException",
    }
)

#: error codes of a service that failed or timed out on its side: botocore's transient codes
#: and the 5xx codes of S3, KMS and EC2, for an answer whose status was lost on the way
TRANSIENT_CODES = frozenset(
    {
        "DependencyTimeoutException",
        "InternalError",
        "InternalFailure",
        "KMSInternalException",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "Unavailable",
        # EC2 CreateSnapshot (400): snapshots of one volume asked for too fast
        "SnapshotCreationPerVolumeRateExceeded",
        # S3 (409): a conflicting conditional operation on the bucket is in progress
        "OperationAborted",
    }
)

#: HTTP statuses of a throttled (429) or failed (500, 502, 503, 504) call: botocore's
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

#: per service, the codes of :data:`THROTTLING_CODES` it uses for a quota, which waiting does
#: not clear: KMS's ``LimitExceededException`` is a resource quota (keys, aliases, grants);
#: its throttling is ``ThrottlingException``
QUOTA_CODES: dict[str, frozenset[str]] = {"kms": frozenset({"LimitExceededException"})}


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def error_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def error_message(exc: BaseException) -> str:
    """A one-line description of a botocore error, for messages that name the operation."""
    code = error_code(exc)
    if code:
        message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", ""))
        return f"{code}: {message}" if message else code
    return f"{type(exc).__name__}: {exc}"


#: getaddrinfo's answers that the name has no address: a mistyped region, endpoint or proxy
#: host, which fails every time (EAI_AGAIN, a resolver that did not answer, passes)
_NO_SUCH_NAME = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
)


def _unresolved(exc: BaseException) -> bool:
    """Whether a host name has no address, as the resolver answered, somewhere in ``exc``'s
    causes (the ``socket.gaierror`` under urllib3's ``NameResolutionError``). A resolver
    that could not answer (``EAI_AGAIN``: down or unreachable for a moment) is not that: it
    may answer later."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    named = False
    while todo and len(seen) < 32:  # bounded: a chain of causes, not a graph to walk
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, socket.gaierror):
            return item.errno in _NO_SUCH_NAME
        if type(item).__name__ == "NameResolutionError":
            named = True
        kwargs = getattr(item, "kwargs", None)
        if isinstance(kwargs, dict):
            todo.append(kwargs.get("error"))
        todo.extend(
            getattr(item, name, None)
            for name in ("original_error", "reason", "_reason", "__cause__")
        )
        todo.append(item.__context__)
        todo.extend(item.args)
    # a resolution failure that does not say why: as before, taken for a name with no address
    return named


def is_transient(exc: BaseException, *, service: str = "") -> bool:
    """Whether ``exc`` (from a boto3 call to ``service``: ``s3``, ``kms``, ``ec2``, ...) may
    pass if the call is made again later."""
    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # botocore has retried it already (standard mode), a name that does not resolve too;
        # a name with no address is configuration, a resolver that did not answer is not
        return not _unresolved(exc)
    code = error_code(exc)
    if code in QUOTA_CODES.get(service, frozenset()):
        return False
    if code in THROTTLING_CODES or code in TRANSIENT_CODES:
        return True
    return error_status(exc) in TRANSIENT_STATUSES


def retry_after(exc: BaseException) -> float | None:
    """The seconds a ``Retry-After`` header of the answer asked for, if it gave a number."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    try:
        seconds = float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def aws_error(
    exc: BaseException,
    message: str,
    category: Callable[..., RegionVaultError],
    *,
    region: str,
    service: str = "",
) -> RegionVaultError:
    """The error to raise for ``exc``: :class:`TransientError` when it is transient (a call
    to ``service``, see :func:`is_transient`), else ``category(message, provider="aws",
    region=region)``. ``message`` names the operation and the object, and ends with
    :func:`error_message` of ``exc``."""
    if is_transient(exc, service=service):
        return TransientError(message, provider="aws", region=region, retry_after=retry_after(exc))
    return category(message, provider="aws", region=region)
