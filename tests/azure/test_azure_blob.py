"""The Blob Storage Vault and the inbox Transit, with the real azure-storage-blob SDK over
HTTP against Azurite (two storage accounts, two regions): the conformance suites with the
provider's services as fixtures, then what the suites cannot see: staged blocks, the
requests that set immutability policies and legal holds, Azure's documented 409s mapped onto
``RetentionLocked``, and a sender that holds nothing but a create/write SAS."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure_world import EAST, WEST, Answer, AzureWorld, Seen, error_answer
from regionvault.core.config import SERVICES
from regionvault.core.conformance import TransitSuite, VaultSuite
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RetentionLocked,
    TransitError,
    UnsupportedOperation,
    VaultError,
)
from regionvault.core.interfaces import KeyService, Sealer, Transit, Vault
from regionvault.core.types import RegionConfig, RegionId, RetentionMode, ServiceConfig
from regionvault.providers.local.provider import LocalProvider

MiB = 1024 * 1024


def _local(tmp_path: Path, name: str) -> RegionConfig:
    settings = {"root": str(tmp_path / "keys" / name)}
    return RegionConfig(
        id=RegionId("local", name),
        settings=settings,
        services={svc: ServiceConfig("local", settings) for svc in SERVICES},
        base_dir=tmp_path,
        source="test-site.toml",
    )


class TestAzureVault(VaultSuite):
    """The Vault suite on two accounts' containers (no immutability: the WORM tests are
    skipped by capability, and the refusals of undeclared WORM calls run)."""

    @pytest.fixture
    def vault_a(self, azure: AzureWorld) -> Vault:
        return azure.track(azure.provider.vault(azure.region(EAST)))

    @pytest.fixture
    def vault_b(self, azure: AzureWorld) -> Vault:
        return azure.track(azure.provider.vault(azure.region(WEST)))


class TestAzureTransit(TransitSuite):
    """The Transit suite from east's account into west's inbox and back; the keys are the
    local provider's (the Key Vault service lands separately)."""

    @pytest.fixture
    def reopen_transit_ab(self, azure: AzureWorld) -> Callable[[], Transit]:
        return lambda: azure.track(azure.provider.transit(azure.region(EAST), azure.region(WEST)))

    @pytest.fixture
    def transit_ab(self, reopen_transit_ab: Callable[[], Transit]) -> Transit:
        return reopen_transit_ab()

    @pytest.fixture
    def transit_ba(self, azure: AzureWorld) -> Transit:
        return azure.track(azure.provider.transit(azure.region(WEST), azure.region(EAST)))

    @pytest.fixture
    def keys_a(self, tmp_path: Path) -> Iterator[KeyService]:
        keys = LocalProvider().key_service(_local(tmp_path, "east"))
        yield keys
        keys.close()

    @pytest.fixture
    def keys_b(self, tmp_path: Path) -> Iterator[KeyService]:
        keys = LocalProvider().key_service(_local(tmp_path, "west"))
        yield keys
        keys.close()

    @pytest.fixture
    def sealer_b(self, keys_b: KeyService) -> Sealer:
        return keys_b.sealer()


# --------------------------------------------------------------------------- the vault


def test_large_puts_are_staged_blocks_committed_once(azure: AzureWorld) -> None:
    provider, adapter = azure.scripted()
    vault = azure.track(
        provider.vault(azure.region(EAST, single_put_limit=4 * MiB, block_size=1 * MiB))
    )
    vault.vault_id  # noqa: B018 - makes the container before counting
    data = os.urandom(5 * MiB + 123)
    adapter.seen.clear()
    vault.put("packs/big", data, if_absent=True)
    blocks = [s for s in adapter.seen if "comp=block&" in s.query + "&"]
    commits = [s for s in adapter.seen if "comp=blocklist" in s.query]
    # five 1 MiB blocks, the 123-byte tail riding with the last one
    assert len(blocks) == 5 and len(commits) == 1, [(s.method, s.query) for s in adapter.seen]
    assert len({s.query for s in blocks}) == 5  # distinct block ids
    sizes = sorted(int(s.headers["Content-Length"]) for s in blocks)
    assert sizes == [MiB] * 4 + [MiB + 123]
    assert commits[0].headers.get("If-None-Match") == "*"
    assert vault.get("packs/big") == data
    assert vault.get("packs/big", offset=MiB - 3, length=6) == data[MiB - 3 : MiB + 3]
    with pytest.raises(ObjectExists):
        vault.put("packs/big", data, if_absent=True)
    assert vault.get("packs/big") == data
    vault.put("small", b"x" * 100, if_absent=True)
    small = [s for s in adapter.seen if s.method == "PUT" and s.path.endswith("/small")]
    assert len(small) == 1 and small[0].headers.get("x-ms-blob-type") == "BlockBlob"
    assert small[0].headers.get("If-None-Match") == "*"


def test_listing_is_paged(azure: AzureWorld) -> None:
    provider, adapter = azure.scripted()
    vault = azure.track(provider.vault(azure.region(EAST, list_page_size=2)))
    names = [f"index/{i:02d}" for i in range(5)]
    for name in names:
        vault.put(name, name.encode())
    adapter.seen.clear()
    assert [o.name for o in vault.list("index/")] == names
    listings = [s for s in adapter.seen if "comp=list" in s.query]
    assert len(listings) == 3 and all("maxresults=2" in s.query for s in listings)
    assert "marker=" in listings[1].query


def test_vault_id_is_stable_and_hidden(azure: AzureWorld) -> None:
    first = azure.track(azure.provider.vault(azure.region(EAST)))
    vault_id = first.vault_id
    assert vault_id.startswith("azure-")
    assert azure.track(azure.provider.vault(azure.region(EAST))).vault_id == vault_id
    other = azure.track(azure.provider.vault(azure.region(EAST, prefix="other")))
    assert other.vault_id != vault_id
    assert list(first.list()) == []
    with pytest.raises(VaultError, match="reserves"):
        first.put(".regionvault/vault-id", b"x")


def test_missing_container_is_named(azure: AzureWorld) -> None:
    vault = azure.track(azure.provider.vault(azure.region(EAST, create=False)))
    with pytest.raises(VaultError) as missing:
        vault.put("a", b"x")
    text = str(missing.value)
    assert f"container 'rv-{azure.tag}' of account 'east' does not exist" in text
    assert "\n" not in text and "sig=" not in text


# --------------------------------------------------------------------------- WORM


def _worm_vault(azure: AzureWorld) -> tuple[Vault, Any]:
    provider, adapter = azure.scripted()
    vault = azure.track(provider.vault(azure.region(EAST, immutability=True)))
    vault.put("points/p1", b"kept")
    adapter.seen.clear()
    return vault, adapter


@pytest.mark.parametrize(
    ("mode", "header"),
    [(RetentionMode.GOVERNANCE, "Unlocked"), (RetentionMode.COMPLIANCE, "Locked")],
)
def test_retention_sends_the_version_level_immutability_policy(
    azure: AzureWorld, mode: RetentionMode, header: str
) -> None:
    """Azurite answers 501 to immutability policies; the request is what Azure would get."""
    vault, adapter = _worm_vault(azure)
    until = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    adapter.rules.append(lambda s: Answer(200) if "comp=immutabilityPolicies" in s.query else None)
    info = vault.set_retention("points/p1", until, mode)
    assert (info.retain_until, info.retention_mode) == (until, mode)
    sent = [s for s in adapter.seen if "comp=immutabilityPolicies" in s.query]
    assert len(sent) == 1 and sent[0].method == "PUT"
    assert sent[0].path.endswith(f"/rv-{azure.tag}/points/p1")
    assert sent[0].headers["x-ms-immutability-policy-until-date"] == "Tue, 06 May 2031 07:08:09 GMT"
    assert sent[0].headers["x-ms-immutability-policy-mode"] == header


@pytest.mark.parametrize("on", [True, False])
def test_legal_hold_sends_the_legal_hold_request(azure: AzureWorld, on: bool) -> None:
    vault, adapter = _worm_vault(azure)
    adapter.rules.append(
        lambda s: (
            Answer(200, headers={"x-ms-legal-hold": str(on).lower()})
            if "comp=legalhold" in s.query
            else None
        )
    )
    assert vault.set_legal_hold("points/p1", on).legal_hold is on
    sent = [s for s in adapter.seen if "comp=legalhold" in s.query]
    assert len(sent) == 1 and sent[0].method == "PUT"
    assert sent[0].headers["x-ms-legal-hold"] == str(on).lower()


def test_azurite_does_not_implement_worm_and_the_vault_says_so(azure: AzureWorld) -> None:
    azure.server  # noqa: B018 - Azurite's gap: offline only (Azure enforces, live)
    vault, _adapter = _worm_vault(azure)
    with pytest.raises(VaultError, match=r"APINotImplemented \(HTTP 501\)") as refused:
        vault.set_legal_hold("points/p1", True)
    assert "points/p1" in str(refused.value)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("BlobImmutableDueToPolicy", "its immutability policy"),
        ("BlobImmutableDueToLegalHold", "a legal hold"),
    ],
)
def test_azures_409s_on_delete_and_overwrite_are_retention_locked(
    azure: AzureWorld, code: str, reason: str
) -> None:
    """Azure refuses a delete or an overwrite of a protected blob with a documented 409 (say
    the policy was set since the vault looked): replayed here, each is RetentionLocked."""
    vault, adapter = _worm_vault(azure)
    adapter.rules.append(
        lambda s: (
            error_answer(409, code)
            if s.method in ("DELETE", "PUT") and s.path.endswith("/points/p1") and not s.query
            else None
        )
    )
    with pytest.raises(RetentionLocked) as deleting:
        vault.delete("points/p1")
    with pytest.raises(RetentionLocked) as overwriting:
        vault.put("points/p1", b"new")
    for refused, what in ((deleting, "delete"), (overwriting, "overwrite")):
        assert refused.value.name == "points/p1"
        assert f"Azure refused to {what} it because of {reason} ({code})" in str(refused.value)
    adapter.rules.clear()
    assert vault.get("points/p1") == b"kept"


def _protected(
    until: datetime | None, mode: str | None, hold: bool
) -> Callable[[Seen], Answer | None]:
    """Blob properties as Azure reports a blob under a policy and/or a legal hold."""
    headers = {
        "Content-Length": "4",
        "x-ms-blob-type": "BlockBlob",
        "Last-Modified": "Mon, 07 Dec 2026 10:00:00 GMT",
        "ETag": '"0x1"',
        "x-ms-legal-hold": "true" if hold else "false",
    }
    if until is not None and mode is not None:
        headers["x-ms-immutability-policy-until-date"] = until.strftime("%a, %d %b %Y %H:%M:%S GMT")
        headers["x-ms-immutability-policy-mode"] = mode

    def rule(seen: Seen) -> Answer | None:
        if seen.method == "HEAD" and seen.path.endswith("/points/p1"):
            return Answer(200, headers=headers)
        return None

    return rule


def test_the_vault_refuses_deleting_a_protected_blob_itself(azure: AzureWorld) -> None:
    """The framework's promise does not wait for Azure: a blob whose properties show a policy
    in force or a hold is not deleted (no DELETE is sent), nor overwritten."""
    vault, adapter = _worm_vault(azure)
    soon = datetime.now(UTC) + timedelta(days=1)
    for until, mode, hold, bypass, why in (
        (soon, "Locked", False, True, "compliance retention until"),
        (soon, "Unlocked", False, False, "governance retention until"),
        (None, None, True, True, "legal hold is on"),
    ):
        adapter.rules[:] = [_protected(until, mode, hold)]
        adapter.seen.clear()
        with pytest.raises(RetentionLocked, match=why):
            vault.delete("points/p1", bypass_governance=bypass)
        with pytest.raises(RetentionLocked, match="cannot be overwritten"):
            vault.put("points/p1", b"new")
        assert not [s for s in adapter.seen if s.method in ("DELETE", "PUT")]
    head = vault.head("points/p1")
    assert head.legal_hold and head.retain_until is None


VERSIONS = """<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="{endpoint}" ContainerName="{container}">
<Prefix>points/p1</Prefix><Blobs>
<Blob><Name>points/p1</Name><VersionId>2026-12-07T10:00:00.0000000Z</VersionId>
<Properties><Last-Modified>Mon, 07 Dec 2026 10:00:00 GMT</Last-Modified><Etag>0x1</Etag>
<Content-Length>4</Content-Length><BlobType>BlockBlob</BlobType>{policy}</Properties></Blob>
<Blob><Name>points/p10</Name><VersionId>2026-12-07T10:00:01.0000000Z</VersionId>
<Properties><Last-Modified>Mon, 07 Dec 2026 10:00:01 GMT</Last-Modified><Etag>0x2</Etag>
<Content-Length>4</Content-Length><BlobType>BlockBlob</BlobType></Properties></Blob>
</Blobs><NextMarker /></EnumerationResults>"""


def _versions(azure: AzureWorld, policy: str = "") -> Callable[[Seen], Answer | None]:
    """A listing of the blob's versions as a versioned account gives it: one earlier
    version of points/p1 (with ``policy`` among its properties), and one of another blob."""
    body = VERSIONS.format(
        endpoint=azure.server.account_url(EAST), container=f"rv-{azure.tag}", policy=policy
    ).encode()

    def rule(seen: Seen) -> Answer | None:
        if seen.method == "GET" and "include=versions" in seen.query.replace("%2C", ","):
            return Answer(200, headers={"Content-Type": "application/xml"}, body=body)
        if seen.method == "DELETE" and "versionid=" in seen.query:
            return Answer(202)
        return None

    return rule


def test_a_delete_in_a_versioned_account_removes_every_version(azure: AzureWorld) -> None:
    vault, adapter = _worm_vault(azure)
    adapter.rules.append(_versions(azure))
    vault.delete("points/p1")
    deletes = [s.query for s in adapter.seen if s.method == "DELETE"]
    assert deletes == ["", "versionid=2026-12-07T10%3A00%3A00.0000000Z"], deletes
    adapter.rules.clear()
    assert not vault.exists("points/p1")


def test_an_earlier_version_under_a_policy_refuses_the_delete(azure: AzureWorld) -> None:
    vault, adapter = _worm_vault(azure)
    policy = (
        "<ImmutabilityPolicyUntilDate>Fri, 01 Jan 2100 00:00:00 GMT</ImmutabilityPolicyUntilDate>"
        "<ImmutabilityPolicyMode>Locked</ImmutabilityPolicyMode>"
    )
    adapter.rules.append(_versions(azure, policy))
    with pytest.raises(RetentionLocked, match=r"compliance retention until 2100.* \(its version"):
        vault.delete("points/p1", bypass_governance=True)
    assert not [s for s in adapter.seen if s.method == "DELETE"]
    adapter.rules.clear()
    assert vault.get("points/p1") == b"kept"


def test_bypassing_governance_removes_the_unlocked_policy_then_the_blob(azure: AzureWorld) -> None:
    vault, adapter = _worm_vault(azure)
    soon = datetime.now(UTC) + timedelta(days=1)
    adapter.rules[:] = [
        _protected(soon, "Unlocked", False),
        lambda s: (
            Answer(200) if s.method == "DELETE" and "comp=immutabilityPolicies" in s.query else None
        ),
    ]
    vault.delete("points/p1", bypass_governance=True)
    deletes = [s.query for s in adapter.seen if s.method == "DELETE"]
    assert deletes == ["comp=immutabilityPolicies", ""], deletes
    adapter.rules.clear()
    with pytest.raises(ObjectNotFound):
        vault.head("points/p1")


def test_compliance_retention_is_never_shortened_or_weakened(azure: AzureWorld) -> None:
    vault, adapter = _worm_vault(azure)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    adapter.rules[:] = [_protected(until, "Locked", False)]
    with pytest.raises(RetentionLocked, match="can only be extended"):
        vault.set_retention("points/p1", until - timedelta(days=1))
    with pytest.raises(RetentionLocked, match="can only be extended"):
        vault.set_retention("points/p1", until, RetentionMode.GOVERNANCE, bypass_governance=True)
    assert not [s for s in adapter.seen if "comp=immutabilityPolicies" in s.query]


def test_worm_calls_need_immutability(azure: AzureWorld) -> None:
    vault = azure.track(azure.provider.vault(azure.region(EAST)))
    vault.put("a", b"x")
    assert not vault.capabilities.worm_lock and not vault.capabilities.legal_hold
    with pytest.raises(UnsupportedOperation, match="immutability = true"):
        vault.set_retention("a", datetime.now(UTC) + timedelta(seconds=30))
    with pytest.raises(UnsupportedOperation, match="immutability = true"):
        vault.set_legal_hold("a", True)


# --------------------------------------------------------------------------- transit


def test_the_sender_holds_only_a_create_write_sas(azure: AzureWorld) -> None:
    provider, adapter = azure.scripted()
    transit = azure.track(provider.transit(azure.region(EAST), azure.region(WEST)))
    transit.send("rp1/index", b"sealed index")
    assert transit.has("rp1/index") and not transit.has("rp1/nothing")
    sender_requests = [s for s in adapter.seen if "sig=" in s.query]
    assert sender_requests, "the sender did not use a SAS"
    for seen in sender_requests:
        assert "sp=cw&" in seen.query + "&", seen.query
        assert "Authorization" not in seen.headers
        assert seen.method in ("PUT",), (seen.method, seen.query)
    # has() writes nothing: a Set Blob Metadata under a condition every blob fails
    probes = [s for s in sender_requests if "comp=metadata" in s.query]
    assert len(probes) == 2
    assert all(p.headers["If-Unmodified-Since"] == "Sat, 01 Jan 2000 00:00:00 GMT" for p in probes)
    # the payload sits in west's account, in the inbox container, under the source's prefix
    assert all(
        s.path.startswith(f"/west/rv-{azure.tag}-inbox/azure/east/") for s in sender_requests
    )
    sender = transit._sender().client
    for attempt in (
        lambda: sender.get_blob_client("azure/east/rp1/index").download_blob().readall(),
        lambda: sender.get_blob_client("azure/east/rp1/index").get_blob_properties(),
        lambda: list(sender.list_blobs()),
        lambda: sender.delete_blob("azure/east/rp1/index"),
    ):
        with pytest.raises(Exception) as refused:
            attempt()
        assert getattr(refused.value, "status_code", None) == 403
        assert getattr(refused.value, "error_code", None) == "AuthorizationPermissionMismatch"
    assert transit.receive("rp1/index") == b"sealed index"
    transit.discard("rp1/index")
    transit.discard("rp1/index")
    with pytest.raises(TransitError, match="not in the inbox from azure:east"):
        transit.receive("rp1/index")
    with pytest.raises(TransitError, match="bad inbox prefix '/abs'"):
        list(transit.inbox("/abs"))


def test_a_given_sas_is_used_as_it_is(azure: AzureWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    from regionvault.providers.azure.transit import mint_inbox_sas

    west = azure.region(WEST)
    list(azure.track(azure.provider.transit(azure.region(EAST), west)).inbox())  # makes it
    minter = azure.provider.clients(west).service(azure.provider.settings(west))
    token, _expiry = mint_inbox_sas(
        minter, azure.provider.settings(west), account_key=azure.server.accounts[WEST]
    )
    monkeypatch.setenv("RV_TEST_INBOX_SAS", token)
    monkeypatch.delenv("REGIONVAULT_AZURITE_KEY_WEST")
    provider, adapter = azure.scripted()
    given = azure.region(WEST, inbox_sas_env="RV_TEST_INBOX_SAS", account_key_env=None)
    transit = azure.track(provider.transit(azure.region(EAST), given))
    transit.send("p", b"1")
    assert transit.bytes_sent == 1
    assert [s.method for s in adapter.seen] == ["PUT"]
    assert token.split("sig=")[1].split("&")[0] in adapter.seen[0].query


def test_the_provider_counts_every_request(azure: AzureWorld) -> None:
    vault = azure.track(
        azure.provider.vault(azure.region(EAST, single_put_limit=4 * MiB, block_size=1 * MiB))
    )
    vault.vault_id  # noqa: B018 - makes the container before counting
    before = azure.provider.metrics.snapshot()
    vault.put("packs/big", os.urandom(5 * MiB + 1), if_absent=True)
    vault.put("index/0", b"x" * 100)
    assert [o.name for o in vault.list()] == ["index/0", "packs/big"]
    used = azure.provider.metrics.since(before)
    assert used.by_operation() == {
        "GET list": 1,
        "PUT blob": 1,
        "PUT block": 5,
        "PUT blocklist": 1,
    }
    assert used.count(region="azure:east") == 8
    assert used.bytes_sent(region="azure:east") >= 5 * MiB + 101


def test_a_pack_just_over_the_limit_is_two_blocks(azure: AzureWorld) -> None:
    """The data plane closes packs at 16 MiB and a bit: two 8 MiB-and-more blocks, not two
    full blocks and a sliver."""
    vault = azure.track(azure.provider.vault(azure.region(EAST)))
    vault.vault_id  # noqa: B018 - makes the container before counting
    data = os.urandom(16 * MiB + 300 * 1024)
    before = azure.provider.metrics.snapshot()
    vault.put("packs/just-over", data, if_absent=True)
    used = azure.provider.metrics.since(before)
    assert used.by_operation() == {"PUT block": 2, "PUT blocklist": 1}
    assert vault.get("packs/just-over") == data
