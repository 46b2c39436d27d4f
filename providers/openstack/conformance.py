"""The openstack provider's support for the conformance suite: a throwaway composed edge
site of two regions, ``openstack:east`` replicating to ``openstack:west``, each with

- its compute in an OpenStack cloud: the provider's own wire-level fake
  (providers/openstack/fakes), one per region, reached by libcloud's unmodified driver;
- its keys on a SoftHSM token (the pkcs11 provider's conformance support makes them);
- its vault, and the transit into it, in moto's S3 server through libcloud (the libcloud
  provider's conformance support starts it)::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=openstack

Providers never import one another: the other two providers' supports are reached through
the suite's own hook (``regionvault_conformance_support``), their test sites read, and their
regions' settings taken into this site's ``keys`` and ``vault`` tables. The password of the
fake clouds is in an environment variable the regions name, never in site.toml.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.conformance.support import (
    ConformanceSupport,
    make_suite_plugin_manager,
    tar_image,
)
from regionvault.core.errors import UnsupportedOperation

if TYPE_CHECKING:
    from regionvault.core.site import Region
    from regionvault.core.types import Instance
    from regionvault.providers.openstack.fakes.cloud import OpenStackFake

__all__ = ["PASSWORD_ENV", "OpenStackConformanceSupport", "site_text"]

#: the variable the test regions name for the fake clouds' password
PASSWORD_ENV = "RV_OPENSTACK_TEST_PASSWORD"
PASSWORD = "fake-cloud-password"
FLAVOR = "m1.small"
REGIONS = ("east", "west")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, settings: Mapping[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    lines += [
        f"{key} = {_toml(value)}"
        for key, value in settings.items()
        if not isinstance(value, (dict, list))
    ]
    return [*lines, ""]


def site_text(
    urls: Mapping[str, str],
    keys: Mapping[str, Mapping[str, Any]],
    vaults: Mapping[str, Mapping[str, Any]],
) -> str:
    """site.toml of the composed edge regions: region name -> fake cloud URL, pkcs11 keys
    settings, libcloud vault settings."""
    lines = ['[site]\nname = "openstack-conformance"\n']
    for name, url in urls.items():
        region = f'regions."openstack:{name}"'
        lines += _table(
            region,
            {
                "auth_url": f"{url}/identity",
                "username": "regionvault",
                "project": "regionvault",
                "password_env": PASSWORD_ENV,
                "flavor": FLAVOR,
                "poll_interval": 0.05,
            },
        )
        lines += _table(f"{region}.keys", {"provider": "pkcs11", **keys[name]})
        lines += _table(f"{region}.vault", {"provider": "libcloud", **vaults[name]})
    lines.append('[[replication]]\nfrom = "openstack:east"\nto = "openstack:west"\n')
    return "\n".join(lines)


def _other_site(stack: contextlib.ExitStack, provider: str, workdir: Path) -> dict[str, Any]:
    """The regions of ``provider``'s own conformance test site, started under ``stack``."""
    pm = make_suite_plugin_manager()
    support = pm.hook.regionvault_conformance_support(provider=provider)
    if support is None:
        raise UnsupportedOperation(
            f"the {provider} provider's conformance support (for the composed edge site)",
            provider="openstack",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    path = stack.enter_context(support.test_site(workdir))
    with Path(path).open("rb") as f:
        regions: dict[str, Any] = tomllib.load(f)["regions"]
    return {
        name.split(":", 1)[1]: {k: v for k, v in settings.items() if not isinstance(v, dict)}
        for name, settings in regions.items()
    }


@contextlib.contextmanager
def _password() -> Iterator[None]:
    saved = os.environ.get(PASSWORD_ENV)
    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PASSWORD_ENV, None)
        else:
            os.environ[PASSWORD_ENV] = saved


class OpenStackConformanceSupport(ConformanceSupport):
    """Two edge regions: fake OpenStack compute, SoftHSM keys, a libcloud vault on moto."""

    def __init__(self) -> None:
        self.fakes: dict[str, OpenStackFake] = {}

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        from regionvault.providers.openstack.fakes.cloud import OpenStackFake

        with contextlib.ExitStack() as stack:
            keys = _other_site(stack, "pkcs11", workdir / "pkcs11")
            vaults = _other_site(stack, "libcloud", workdir / "libcloud")
            stack.enter_context(_password())
            urls = {}
            for name in REGIONS:
                fake = OpenStackFake(
                    workdir / f"openstack-{name}", password=PASSWORD, project="regionvault"
                )
                urls[name] = fake.start()
                stack.callback(fake.stop)
                self.fakes[name] = fake
            path = workdir / "site.toml"
            path.write_text(site_text(urls, keys, vaults), encoding="utf-8")
            try:
                yield path
            finally:
                self.fakes.clear()

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        fake = self.fakes.get(region.name.split(":", 1)[1])
        if fake is None:
            return super().make_instance(region, name, data=data, tags=tags, workdir=workdir)
        server_id = fake.seed_server(name, tar_image(data), FLAVOR, dict(tags))
        return region.compute.get_instance(server_id)
