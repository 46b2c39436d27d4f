"""The one mapping of what apache-libcloud's OpenStack driver raises onto the framework's
errors, used by every call the openstack provider makes (docs/writing-a-provider.md,
"Errors: transient failures").

Transient (:class:`TransientError`, the executor runs the job again later): an answer with
HTTP status 408, 429, 500, 502, 503 or 504 (nova, cinder, glance or keystone throttling or
failing on their side), a refused or dropped connection, a connect or read timeout.
Configuration, never transient: a host name without an address (``EAI_NONAME``) and a TLS
failure, which fail every time until the site file changes (:func:`configuration_failure`).
Everything else (401, 403, 404, 400, a malformed answer) is the caller's ``category``.
"""

from __future__ import annotations

import re
import socket

import requests
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
from regionvault.core.errors import (
    ComputeError,
    RegionVaultError,
    TransientError,
    configuration_failure,
    exception_chain,
)

__all__ = ["CALL_ERRORS", "TRANSIENT_STATUS", "http_status", "is_transient", "openstack_error"]

#: the HTTP statuses that may pass if the request is sent again a little later
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: what a call through libcloud's driver may raise that :func:`openstack_error` maps
CALL_ERRORS: tuple[type[BaseException], ...] = (
    BaseHTTPError,
    LibcloudError,
    requests.exceptions.RequestException,
    OSError,
)

#: libcloud puts some statuses only in the text ("code: 503 body: ...")
_STATUS_TEXT = re.compile(r"(?:status[ _]code|code)[:=] ?(\d{3})\b", re.IGNORECASE)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request: BaseHTTPError's ``code`` (libcloud raises one
    subclass per status), else the one in the text of libcloud's other errors."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    code = getattr(exc, "http_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    found = _STATUS_TEXT.search(f"{getattr(exc, 'value', '')} {getattr(exc, 'body', '')}")
    return int(found.group(1)) if found else None


def _retry_after(exc: BaseException) -> float | None:
    headers = dict(getattr(exc, "headers", None) or {})
    try:
        value = float(str(headers.get("retry-after") or headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def is_transient(exc: BaseException) -> bool:
    """Whether the failed call may pass if it is made again later (module docstring)."""
    if configuration_failure(exc):
        return False
    if isinstance(exc, InvalidCredsError):
        return False
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    for cause in exception_chain(exc):
        if isinstance(
            cause,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | ConnectionError
            | TimeoutError
            | socket.timeout,
        ):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line about a libcloud failure: its status when it has one, and its text."""
    status = http_status(exc)
    if isinstance(exc, InvalidCredsError):
        text = "keystone refused the credentials (401)"
    elif isinstance(exc, requests.exceptions.Timeout | TimeoutError | socket.timeout):
        text = f"no answer in time: {exc}"
    elif isinstance(exc, requests.exceptions.ConnectionError | ConnectionError):
        text = f"no connection: {exc}"
    else:
        text = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        if status is not None and str(status) not in text:
            text = f"HTTP {status}: {text}"
    if configuration_failure(exc):
        text += " (a host name without an address or a TLS failure: check auth_url and the catalog)"
    return " ".join(text.split())[:500]


def openstack_error(
    exc: BaseException,
    what: str,
    *,
    region: str | None,
    category: type[RegionVaultError] = ComputeError,
) -> RegionVaultError:
    """``exc`` (raised while doing ``what``) as :class:`TransientError` when it may pass,
    else as ``category``; the error's cause is ``exc``."""
    message = f"{what}: {describe(exc)}"
    error: RegionVaultError
    if is_transient(exc):
        error = TransientError(
            message, provider="openstack", region=region, retry_after=_retry_after(exc)
        )
    else:
        error = category(message, provider="openstack", region=region)
    error.__cause__ = exc
    return error
