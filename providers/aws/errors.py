"""botocore's errors onto regionvault's error tree: the one place that says which AWS
failures are transient.

Transient, raised as :class:`~regionvault.core.errors.TransientError` (the executor retries
the job with backoff, docs/jobs.md), once botocore's own retries (standard mode, see
clients.py) have given up:

- a service answer whose error code is a throttling code (:data:`THROTTLING_CODES`: the
  codes botocore's standard retry mode treats as throttling, S3's ``SlowDown`` among them)
  or a transient one (:data:`TRANSIENT_CODES`), or whose HTTP status is 429 or 5xx;
- no answer: a connect or read timeout, a refused or dropped connection, a response stream
  broken off (botocore's ``ConnectionError`` and ``HTTPClientError`` families), except a TLS
  failure (``SSLError``), which is a configuration problem and does not pass by waiting.

Everything else (denied, not found, invalid, a missing bucket) is the caller's error class
(``VaultError``, ``KeyServiceError``, ``ComputeError``, ``TransitError``) and is not retried.
"""

from __future__ import annotations

from collections.abc import Callable

from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, SSLError
from regionvault.core.errors import RegionVaultError, TransientError

__all__ = [
    "THROTTLING_CODES",
    "TRANSIENT_CODES",
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
    }
)


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


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (from a boto3 call) may pass if the call is made again later."""
    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    code = error_code(exc)
    if code in THROTTLING_CODES or code in TRANSIENT_CODES:
        return True
    status = error_status(exc)
    return status is not None and (status == 429 or 500 <= status <= 599)


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
) -> RegionVaultError:
    """The error to raise for ``exc``: :class:`TransientError` when it is transient, else
    ``category(message, provider="aws", region=region)``. ``message`` names the operation
    and the object, and ends with :func:`error_message` of ``exc``."""
    if is_transient(exc):
        return TransientError(message, provider="aws", region=region, retry_after=retry_after(exc))
    return category(message, provider="aws", region=region)
