"""Availability zones as regions on Azure: a region with ``availability_zone`` lists, finds,
captures and launches only the VMs of that zone of its location (VM ``zones``); the site
refuses two regions that would list one VM (one resource group, one of them whole or both on
one zone) and two regions on one container, inbox or Key Vault key. Against the ARM fake in
front of Azurite, with the unmodified azure-mgmt-compute client.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.mgmt.compute", reason="the Azure tests need pip install -e '.[test]'")

from azure_compute_world import LOCATION, RESOURCE_GROUP, ArmWorld
from regionvault.core.config import check_region_claims, parse_site
from regionvault.core.errors import ConfigError, InstanceNotFound
from regionvault.core.plugins import ProviderRegistry, make_plugin_manager, registry_from
from regionvault.core.types import CaptureKind, LaunchSpec
from regionvault.providers.azure.azurite import AzuriteServer
from regionvault.providers.azure.compute import AzureBlockSink, MiB
from regionvault.providers.azure.fakes.arm import ArmFake, seed_vm

SUB = "00000000-0000-0000-0000-000000000001"


@pytest.fixture(scope="module")
def registry() -> ProviderRegistry:
    return registry_from(make_plugin_manager())


def _compute(rg: str = "rv-east", **more: Any) -> dict[str, Any]:
    return {"subscription_id": SUB, "resource_group": rg, "location": "eastus", **more}


def _refusal(regions: dict[str, dict[str, Any]], registry: ProviderRegistry) -> str:
    with pytest.raises(ConfigError) as caught:
        check_region_claims(
            parse_site({"regions": regions}, source="site.toml", registry=registry), registry
        )
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_availability_zone_is_checked(registry: ProviderRegistry) -> None:
    text = _refusal({"azure:east": _compute(availability_zone="4")}, registry)
    assert text == (
        'site.toml: regions."azure:east".availability_zone: must be one of Azure\'s zones 1, '
        "2 or 3, got '4'"
    )
    site = parse_site(
        {"regions": {"azure:e1": _compute(availability_zone=1)}},
        source="site.toml",
        registry=registry,
    )
    assert list(site.regions) == ["azure:e1"]


def test_two_regions_claiming_one_vm_are_refused_naming_both(registry: ProviderRegistry) -> None:
    whole_and_zone = _refusal(
        {"azure:east": _compute(), "azure:east-1": _compute(availability_zone="1")}, registry
    )
    assert whole_and_zone == (
        'site.toml: regions."azure:east-1": regions "azure:east" and "azure:east-1" both list '
        f"the instances of zone 1 of eastus (azure subscription {SUB}, resource group rv-east): "
        "each instance would be "
        "backed up twice (give each region its own availability zone, cloud region or "
        "credentials, or merge them)"
    )
    same_zone = _refusal(
        {
            "azure:a": _compute(availability_zone="2"),
            "azure:b": _compute(availability_zone="2", location="East US"),
        },
        registry,
    )
    assert 'regions "azure:a" and "azure:b" both list the instances of zone 2 of eastus' in (
        same_zone
    )
    # zones 1 and 2 of one group, and the whole of another group: disjoint
    site = parse_site(
        {
            "regions": {
                "azure:e1": _compute(availability_zone="1"),
                "azure:e2": _compute(availability_zone="2"),
                "azure:other": _compute(rg="rv-other"),
            }
        },
        source="site.toml",
        registry=registry,
    )
    assert len(site.regions) == 3


def test_two_regions_on_one_container_inbox_or_key_are_refused(
    registry: ProviderRegistry,
) -> None:
    storage = {"storage_account": "rvstore"}
    key = {"key_vault_url": "https://rv-east.vault.azure.net"}
    one_vault = _refusal(
        {
            "azure:e1": {**_compute(availability_zone="1"), **storage},
            "azure:e2": {**_compute(availability_zone="2"), **storage},
        },
        registry,
    )
    assert (
        'regions "azure:e1" and "azure:e2" share one vault '
        "(https://rvstore.blob.core.windows.net/regionvault/)"
    ) in one_vault
    one_inbox = _refusal(
        {
            "azure:e1": {**_compute(availability_zone="1"), **storage, "prefix": "z1"},
            "azure:e2": {**_compute(availability_zone="2"), **storage, "prefix": "z2"},
        },
        registry,
    )
    assert "share one inbox (https://rvstore.blob.core.windows.net/regionvault-inbox/)" in (
        one_inbox
    )
    one_key = _refusal(
        {
            "azure:e1": {**_compute(availability_zone="1"), **key},
            "azure:e2": {**_compute(availability_zone="2"), **key},
        },
        registry,
    )
    assert "share one key (https://rv-east.vault.azure.net/keys/regionvault)" in one_key
    site = parse_site(
        {
            "regions": {
                "azure:e1": {**_compute(availability_zone="1"), **storage, **key, "prefix": "z1"},
                "azure:e2": {
                    **_compute(availability_zone="2"),
                    **storage,
                    **key,
                    "prefix": "z2",
                    "inbox_container": "inbox-z2",
                    "key_name": "regionvault-z2",
                },
            }
        },
        source="site.toml",
        registry=registry,
    )
    assert len(site.regions) == 2


@pytest.fixture
def world(azurite: AzuriteServer, tmp_path: Path) -> Iterator[ArmWorld]:
    account = sorted(azurite.accounts)[0]
    url = azurite.account_url(account)
    fake = ArmFake(
        blob_endpoint=url,
        account=account,
        account_key=azurite.accounts[account],
        workdir=tmp_path / "arm",
        container=f"disks-{uuid.uuid4().hex[:12]}",
    )
    with fake:
        world = ArmWorld(fake, url)
        try:
            yield world
        finally:
            world.close()


def test_a_zone_region_lists_finds_and_launches_its_zone_alone(world: ArmWorld) -> None:
    zone1 = world.compute(settings=replace(world.settings, availability_zone="1"))
    zone2 = world.compute(settings=replace(world.settings, availability_zone="2"))
    whole = world.compute()

    def vm(name: str, *zones: str) -> str:
        return seed_vm(world.client, RESOURCE_GROUP, LOCATION, name, zones=zones)

    in_1 = sorted(vm(f"vdu-1{n}", "1") for n in range(2))
    in_2 = [vm("vdu-20", "2")]
    regional = vm("ims-0")  # no zone: only the whole region lists it
    assert sorted(i.id for i in zone1.list_instances(page_size=1)) == in_1
    assert [i.id for i in zone2.list_instances()] == in_2
    assert sorted(i.id for i in whole.list_instances()) == sorted([*in_1, *in_2, regional])
    with pytest.raises(InstanceNotFound):
        zone1.get_instance(in_2[0])
    with pytest.raises(InstanceNotFound):
        zone2.get_instance(regional)
    assert zone2.get_instance(in_2[0]).extra["zones"] == ["2"]

    # a restore in zone 2: its disk is made in zone 2 and the VM launched there
    source = zone2.get_instance(in_2[0])
    spec = LaunchSpec(name="vdu-20 restored", tags=source.tags, source=source)
    sink = zone2.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, AzureBlockSink)
    sink.write(0, b"restored" + bytes(512 * 1024 - 8))
    sink.commit()
    launched = zone2.launch(spec, sink)
    vms = {v["id"].lower(): v for v in world.fake.resources("vm")}
    disks = {d["id"].lower(): d for d in world.fake.resources("disk")}
    assert vms[launched.id.lower()]["zones"] == ["2"]
    assert disks[sink.disk_id.lower()]["zones"] == ["2"]
    assert launched.extra["zones"] == ["2"]
    assert launched.id in {i.id for i in zone2.list_instances()}
    assert launched.id not in {i.id for i in zone1.list_instances()}


def test_the_zone_example_of_docs_azure_md_is_a_valid_site(registry: ProviderRegistry) -> None:
    text = (Path(__file__).parents[2] / "docs" / "azure.md").read_text()
    section = text.split("### Availability zones as regions", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    site = parse_site(tomllib.loads(block), source="azure.md", registry=registry)
    assert sorted(site.regions) == ["azure:eastus-1", "azure:eastus-2"]
    assert [str(r) for r in site.replication[0].destinations] == ["azure:eastus-2"]
