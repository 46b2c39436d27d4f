"""boto3 sessions and clients for the AWS provider, and botocore error helpers.

This is the only place boto3 is imported; it happens when the first service talks to AWS,
never when the provider is registered.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.providers.aws.metrics import AwsMetrics
    from regionvault.providers.aws.settings import AwsSettings

__all__ = ["ClientFactory", "error_code", "error_status"]


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError(
            "the aws provider needs boto3: pip install 'regionvault[aws]'", provider="aws"
        ) from None
    return boto3


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def error_status(exc: BaseException) -> int | None:
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


class ClientFactory:
    """Makes and caches boto3 clients: one session per profile, one client per
    (profile, AWS region, service, endpoint). boto3 clients are thread-safe; sessions are
    not, so they are only touched under the lock."""

    def __init__(self, metrics: AwsMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._sessions: dict[str | None, Any] = {}
        self._clients: dict[tuple[str | None, str, str, str | None], Any] = {}

    def client(self, settings: AwsSettings, service: str, *, aws_region: str | None = None) -> Any:
        """A client for ``service`` in ``aws_region`` (the settings' region by default),
        with the settings' profile and endpoint."""
        where = aws_region or settings.aws_region
        key = (settings.profile, where, service, settings.endpoint_url)
        with self._lock:
            found = self._clients.get(key)
            if found is not None:
                return found
            boto3 = _boto3()
            from botocore.config import Config

            session = self._sessions.get(settings.profile)
            if session is None:
                try:
                    session = boto3.session.Session(profile_name=settings.profile)
                except Exception as exc:  # botocore's ProfileNotFound and friends
                    raise ConfigError(
                        f"cannot use AWS profile {settings.profile!r}: {exc}",
                        key=f'regions."{settings.region}".profile',
                        region=settings.region,
                    ) from None
                self._sessions[settings.profile] = session
            options: dict[str, Any] = {
                "retries": {"mode": "standard", "max_attempts": 5},
                "max_pool_connections": 32,
                "connect_timeout": 10,
                "read_timeout": 120,
            }
            if settings.endpoint_url is not None:
                # a local endpoint (moto) has no per-bucket host names
                options["s3"] = {"addressing_style": "path"}
            client = session.client(
                service,
                region_name=where,
                endpoint_url=settings.endpoint_url,
                config=Config(**options),
            )
            self.metrics.attach(client, where)
            self._clients[key] = client
            return client
