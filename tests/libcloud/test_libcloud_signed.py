"""The provider's own S3 requests (the single PUT, the if-absent PUT and its probe, the
multipart upload, HEAD, ranged GET, DELETE, the sweep's abort) against a moto server that
checks SigV4 signatures and IAM credentials (INITIAL_NO_AUTH_ACTION_COUNT): the shared moto
server takes any request, so a wrongly signed one would pass there unseen.

moto recomputes a signature with botocore, which never signs User-Agent, while libcloud signs
every header it sends (S3 takes that): here libcloud's signer leaves User-Agent out as
botocore does, and signs everything else (path, query, the other headers, the payload's
hash) as it always does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from libcloud_world import KEY_ENV, SECRET_ENV, build_region
from regionvault.core.errors import ObjectExists, VaultError
from regionvault.providers.libcloud.testing import free_port

MiB = 1 << 20


@pytest.fixture(scope="module")
def signed_s3() -> Iterator[tuple[str, int, str, str]]:
    """(host, port, access key, secret) of a moto server that checks every request after
    the three that make its IAM user, key and policy."""
    boto3 = pytest.importorskip("boto3", reason="the IAM user is made with boto3")
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json"):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("moto server with signature checks did not start")
                time.sleep(0.05)
        iam = boto3.client(
            "iam", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="edge")
        key = iam.create_access_key(UserName="edge")["AccessKey"]
        iam.put_user_policy(
            UserName="edge",
            PolicyName="s3",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
            '"Action": "s3:*", "Resource": "*"}]}',
        )
        yield "127.0.0.1", port, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _user_agent_unsigned(monkeypatch: pytest.MonkeyPatch) -> None:
    from libcloud.common.aws import AWSRequestSignerAlgorithmV4 as Signer

    canonical, signed = Signer._get_canonical_headers, Signer._get_signed_headers

    def without(headers: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in headers.items() if k.lower() != "user-agent"}

    monkeypatch.setattr(Signer, "_get_canonical_headers", lambda s, h: canonical(s, without(h)))
    monkeypatch.setattr(
        Signer, "_get_signed_headers", lambda s, headers: signed(s, without(headers))
    )


def _vault(signed_s3: tuple[str, int, str, str], **overrides: Any) -> Any:
    host, port, _, _ = signed_s3
    settings = {
        "driver": "s3", "container": "rv-signed", "host": host, "port": port, "secure": False,
        "key_env": KEY_ENV, "secret_env": SECRET_ENV, "create": True, **overrides,
    }  # fmt: skip
    provider, region = build_region(settings)
    return provider.vault(region.for_service("vault"))


def test_every_request_the_provider_builds_is_signed_right(
    signed_s3: tuple[str, int, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, key, secret = signed_s3
    monkeypatch.setenv(KEY_ENV, key)
    monkeypatch.setenv(SECRET_ENV, secret)
    vault = _vault(signed_s3, single_put_limit=MiB)
    try:
        vault.put("config", b"first", if_absent=True)  # the probe, then the if-absent PUT
        with pytest.raises(ObjectExists):
            vault.put("config", b"second", if_absent=True)
        data = os.urandom(9 * MiB + 3)
        assert vault.put("packs/big", data).size == len(data)  # multipart
        assert vault.get("packs/big", offset=9 * MiB, length=3) == data[-3:]
        assert vault.head("config").size == 5
        assert [i.name for i in vault.list()] == ["config", "packs/big"]
        vault._store.driver._initiate_multipart(vault._store.container(), "vault/packs/killed")
        (stale,) = vault.stale_temporaries(timedelta(0))
        vault.remove_temporary(stale)
        vault.delete("packs/big")
        assert not vault.exists("packs/big")
    finally:
        vault.close()


def test_a_wrong_secret_is_named(
    signed_s3: tuple[str, int, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, key, _ = signed_s3
    monkeypatch.setenv(KEY_ENV, key)
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    vault = _vault(signed_s3, container="rv-signed-wrong")
    try:
        with pytest.raises(VaultError, match=f"credentials from {KEY_ENV}/{SECRET_ENV}"):
            vault.put("x", b"x")
    finally:
        vault.close()
