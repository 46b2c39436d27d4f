"""docs/edge.md's composed edge site is a valid site for the providers as they are: every
region's services come from the providers it says, with the settings it shows, and the
commands it gives exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from regionvault.core.config import parse_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.types import RegionId
from regionvault.providers.aws import plugin as aws_plugin
from regionvault.providers.libcloud import plugin as libcloud_plugin
from regionvault.providers.openstack import plugin as openstack_plugin
from regionvault.providers.pkcs11 import plugin as pkcs11_plugin
from regionvault.providers.pkcs11.__main__ import USAGE
from regionvault.providers.pkcs11.settings import Pkcs11Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_composed_edge_site_parses_with_each_service_from_its_provider() -> None:
    text = (DOCS / "edge.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    registry = registry_from(
        make_plugin_manager(
            load_entry_points=False,
            plugins=[openstack_plugin, libcloud_plugin, pkcs11_plugin, aws_plugin],
        )
    )
    site = parse_site(tomllib.loads(block.group(1)), registry=registry, source="edge.md")
    for name in ("edge-a", "edge-b"):
        region = site.region(name)
        assert region.id.provider == "openstack"
        assert region.services["keys"].provider == "pkcs11"
        assert region.services["vault"].provider == "libcloud"
        # each service's settings pass its own provider's checks
        registry.get("openstack").settings(region.for_service("compute"))
        keys = Pkcs11Settings.from_region(region.for_service("keys"))
        assert keys.public_key is not None and keys.pin_env is not None
        registry.get("libcloud").settings(region.for_service("vault"))
    a, b = RegionId("openstack", "edge-a"), RegionId("openstack", "edge-b")
    assert site.destinations_of(a) == (b, RegionId("aws", "eu-west-1"))
    assert site.destinations_of(b) == (a,)
    # the two edge vaults are different kinds of store
    drivers = {
        registry.get("libcloud").settings(site.region(n).for_service("vault")).driver
        for n in ("edge-a", "edge-b")
    }
    assert len(drivers) == 2


def test_the_export_command_in_the_docs_is_the_one_the_module_takes() -> None:
    usage = USAGE.removeprefix("usage: ").split()
    for page in ("edge.md", "edge-keys.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        for line in re.findall(r"python -m regionvault\.providers\.pkcs11 .*", text):
            words = line.split()
            assert words[:4] == usage[:4], line
            assert len(words) == len(usage), line
