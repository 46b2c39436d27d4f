"""The login of one region's services: google-auth credentials for the kind the region's
settings name (settings.py, ``credentials``).

``anonymous`` sends no token and is honoured only for a service whose endpoint is on this
machine's loopback (the emulator and the fakes): anything else would send unauthenticated
requests to the real cloud. ``application-default`` never runs in the offline tests (it
probes the metadata server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = ["SCOPES", "credentials_for"]

#: the one OAuth scope every GCP API the provider calls accepts
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def credentials_for(
    region: RegionConfig, settings: GcpSettings, service: str, override: Any = None
) -> Any:
    """google-auth credentials for ``service`` ("storage", "kms" or "compute") of ``region``:
    ``override`` (an embedder's credentials) when given, else the kind its settings name."""
    if override is not None:
        return override
    if settings.credentials == "anonymous":
        if not settings.on_loopback(service):
            raise ConfigError(
                f'credentials = "anonymous" needs {service}_endpoint on this machine\'s '
                f"loopback (the {service} would send unauthenticated requests to GCP)",
                file=region.source,
                key=region.key("credentials"),
                provider="gcp",
                region=region.name,
            )
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()  # type: ignore[no-untyped-call]
    if settings.credentials == "service-account":
        from google.oauth2 import service_account

        assert settings.credentials_file is not None
        try:
            return service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                settings.credentials_file, scopes=SCOPES
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the service account key {settings.credentials_file}: {exc}",
                file=region.source,
                key=region.key("credentials_file"),
                provider="gcp",
                region=region.name,
            ) from None
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _project = google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError as exc:
        raise ConfigError(
            f"no Application Default Credentials: {exc}",
            file=region.source,
            key=region.key("credentials"),
            provider="gcp",
            region=region.name,
        ) from None
    return credentials
