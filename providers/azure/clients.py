"""azure-storage-blob clients for the Azure provider (azure-core's errors: errors.py).

Clients are made when a service first talks to Blob Storage, never when the provider is
registered. A region's storage credential is its account key (``account_key_env``) when it
names one, else the region's Microsoft Entra identity: the token credential site.toml names
for it (identity.py, the same login its Key Vault uses) or the embedder's, with Azure RBAC
deciding what it may do; a sender's is only the inbox SAS. ``ca_file`` (a PEM bundle) is
trusted for the blob endpoint too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.storage.blob import BlobServiceClient, ContainerClient
from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline import PipelineRequest
    from regionvault.providers.azure.metrics import BlobMetrics
    from regionvault.providers.azure.settings import BlobSettings

__all__ = ["BlobClients"]


class _Counting:
    """A ``raw_request_hook``: the storage SDK calls it after its retry policy, so it
    records every attempt of every request."""

    def __init__(self, metrics: BlobMetrics, region: str) -> None:
        self.metrics = metrics
        self.region = region

    def __call__(self, request: PipelineRequest[Any]) -> None:
        http = request.http_request
        length = http.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else 0
        self.metrics.record(self.region, http.method, http.url, size)


class BlobClients:
    """Makes Blob Storage clients for a region's settings: with its account key when it
    names one, else with ``credential`` (a TokenCredential an embedder or identity.py
    supplies). ``options`` go to every client (a test's capturing ``transport``, say)."""

    def __init__(
        self,
        credential: TokenCredential | None = None,
        options: Mapping[str, Any] | None = None,
        metrics: BlobMetrics | None = None,
    ) -> None:
        self.token_credential = credential
        self.options = dict(options or {})
        self.metrics = metrics

    def _common(self, settings: BlobSettings) -> dict[str, Any]:
        hook = (
            {"raw_request_hook": _Counting(self.metrics, settings.region)} if self.metrics else {}
        )
        verify = {"connection_verify": settings.ca_file} if settings.ca_file else {}
        return {
            **hook,
            **verify,
            "retry_total": settings.sdk_retries,
            "connection_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
            "max_single_put_size": settings.single_put_limit,
            "max_block_size": settings.block_size,
            **self.options,
        }

    def credential(
        self, settings: BlobSettings, login: TokenCredential | None = None
    ) -> AzureNamedKeyCredential | TokenCredential:
        """The account key when the settings name one, else ``login`` (the region's token
        credential), else the one this factory was made with."""
        key = settings.account_key()
        if key is not None:
            return AzureNamedKeyCredential(settings.account_name, key)
        token = login or self.token_credential
        if token is None:
            raise ConfigError(
                f"no credential for storage account {settings.account_name!r}: set "
                "account_key_env, or give the region an identity (credential = ...)",
                key=f'regions."{settings.region}".account_key_env',
                provider="azure",
                region=settings.region,
            )
        return token

    def service(
        self, settings: BlobSettings, login: TokenCredential | None = None
    ) -> BlobServiceClient:
        return BlobServiceClient(
            settings.url, credential=self.credential(settings, login), **self._common(settings)
        )

    def container(
        self, settings: BlobSettings, name: str, login: TokenCredential | None = None
    ) -> ContainerClient:
        return ContainerClient(
            settings.url,
            name,
            credential=self.credential(settings, login),
            **self._common(settings),
        )

    def sas_container(self, settings: BlobSettings, name: str, sas: str) -> ContainerClient:
        """A client of container ``name`` that holds nothing but ``sas``."""
        return ContainerClient(
            settings.url, name, credential=AzureSasCredential(sas), **self._common(settings)
        )
