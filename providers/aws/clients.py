"""boto3 sessions and clients for the AWS provider (botocore's errors: errors.py).

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

__all__ = ["ClientFactory"]


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError(
            "the aws provider needs boto3: pip install 'regionvault[aws]'", provider="aws"
        ) from None
    return boto3


class ClientFactory:
    """Makes and caches boto3 clients: one session per profile, one client per
    (profile, AWS region, service, endpoint, retries and timeouts). boto3 clients are
    thread-safe; sessions are not, so they are only touched under the lock."""

    def __init__(self, metrics: AwsMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._sessions: dict[str | None, Any] = {}
        self._clients: dict[tuple[Any, ...], Any] = {}

    def client(self, settings: AwsSettings, service: str, *, aws_region: str | None = None) -> Any:
        """A client for ``service`` in ``aws_region`` (the settings' region by default),
        with the settings' profile and endpoint."""
        where = aws_region or settings.aws_region
        key = (
            settings.profile,
            where,
            service,
            settings.endpoint_url,
            settings.sdk_retries,
            settings.connect_timeout,
            settings.read_timeout,
        )
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
                # botocore's max_attempts counts the retries, not the first try
                "retries": {"mode": "standard", "max_attempts": settings.sdk_retries},
                "max_pool_connections": 32,
                "connect_timeout": settings.connect_timeout,
                "read_timeout": settings.read_timeout,
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

    def close(self) -> None:
        """Close every client made (botocore closes its HTTP connection pool) and forget
        the clients and sessions."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            self._sessions = {}
        for client in clients:
            client.close()
