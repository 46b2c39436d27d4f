"""AwsProvider.close (called when the last open site using the provider closes): every
boto3 client the provider made is closed, its connection pool emptied, and the next service
gets new clients; against the moto server."""

from __future__ import annotations

from aws_world import AwsWorld
from regionvault.providers.aws.settings import AwsSettings


def _pools(client: object) -> int:
    # botocore's URLLib3Session keeps one urllib3 pool per host it talked to
    return len(client._endpoint.http_session._manager.pools)  # type: ignore[attr-defined]


def test_close_closes_every_boto3_client_the_provider_made(aws: AwsWorld) -> None:
    provider = aws.provider
    settings = AwsSettings.from_region(aws.region("us-east-1"))
    s3 = provider.clients.client(settings, "s3")
    kms = provider.clients.client(settings, "kms")
    assert provider.clients.client(settings, "s3") is s3  # cached while open
    s3.list_buckets()
    kms.list_keys()
    assert _pools(s3) >= 1 and _pools(kms) >= 1

    provider.close()
    assert _pools(s3) == 0 and _pools(kms) == 0
    # the provider is usable after its close: a new client, which works
    fresh = provider.clients.client(settings, "s3")
    assert fresh is not s3
    fresh.list_buckets()
    provider.close()
    provider.close()  # nothing left to close: no error
