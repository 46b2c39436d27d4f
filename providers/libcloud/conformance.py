"""The libcloud provider's support for the conformance suite: a throwaway site of two
regions, ``libcloud:east`` replicating to ``libcloud:west``, whose vaults and inboxes are
in an object store reached through libcloud, and whose keys and compute are the local
provider's (the libcloud provider offers neither: a composed site, as an edge site is)::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=libcloud

The store: by default moto's S3 server, started here and stopped at the end. With
``REGIONVAULT_LIBCLOUD_DRIVER`` (``s3`` or ``azure_blobs``), ``REGIONVAULT_LIBCLOUD_HOST``,
``REGIONVAULT_LIBCLOUD_PORT``, ``REGIONVAULT_LIBCLOUD_KEY`` and ``REGIONVAULT_LIBCLOUD_SECRET``
a store already running (Azurite: the account name and key) is used instead; with
``REGIONVAULT_LIBCLOUD_DRIVER=openstack_swift``, a Swift behind keystone v3 at
``REGIONVAULT_LIBCLOUD_AUTH_URL`` (``_PROJECT``, ``_DOMAIN``, ``_SERVICE_REGION``; ``_KEY`` and
``_SECRET`` the user and password), its regions claiming ``conditional_put``
(tests/libcloud/test_libcloud_conformance.py runs the suite all three ways).

``libcloud:east`` keeps its inbox in the vault's container under another prefix,
``libcloud:west`` in a container of its own: both layouts are tested.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.conformance.support import ConformanceSupport, env_name
from regionvault.providers.libcloud.testing import S3Server

__all__ = ["KEY_ENV", "SECRET_ENV", "LibcloudConformanceSupport", "site_text"]

#: the variables the test site's regions name for their credentials (key_env, secret_env)
KEY_ENV = "RV_LIBCLOUD_TEST_KEY"
SECRET_ENV = "RV_LIBCLOUD_TEST_SECRET"


def site_text(
    *, driver: str, host: str, port: int, root: Path, swift: dict[str, str] | None = None
) -> str:
    """site.toml of the two test regions on the store at ``host:port`` (Swift: the keystone
    settings ``swift`` names)."""
    if swift is not None:
        where = [f"{key} = {json.dumps(value)}" for key, value in swift.items()]
        where.append("conditional_put = true")
    else:
        where = [f'host = "{host}"', f"port = {port}", "secure = false"]
    regions = {
        "east": ['container = "rv-east-vault"', 'prefix = "vault/"'],
        "west": ['container = "rv-west-vault"', 'inbox_container = "rv-west-inbox"'],
    }
    lines = ['[site]\nname = "libcloud-conformance"\n']
    for name, own in regions.items():
        lines += [
            f'[regions."libcloud:{name}"]',
            f'driver = "{driver}"',
            *own,
            *where,
            f'key_env = "{KEY_ENV}"',
            f'secret_env = "{SECRET_ENV}"',
            "create = true",
            "",
        ]
        for service in ("keys", "compute"):
            lines += [
                f'[regions."libcloud:{name}".{service}]',
                'provider = "local"',
                f'root = "{(root / name).as_posix()}"',
                "",
            ]
    lines.append('[[replication]]\nfrom = "libcloud:east"\nto = "libcloud:west"\n')
    return "\n".join(lines)


@contextlib.contextmanager
def _credentials(key: str, secret: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in (KEY_ENV, SECRET_ENV)}
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = key, secret
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LibcloudConformanceSupport(ConformanceSupport):
    """Two libcloud regions on moto's S3 (or the store the environment names)."""

    @property
    def known_limits(self) -> dict[str, str]:  # type: ignore[override]
        if os.environ.get(env_name("libcloud", "DRIVER")) != "openstack_swift":
            return {}
        return {
            "test_if_absent_race_has_exactly_one_winner": (
                "Swift's own gap, not the fake's: Swift checks If-None-Match: * when a PUT "
                "arrives, so racing PUTs in flight together may all succeed; an openstack_swift "
                "region claims conditional_put only when set (docs/edge-vault.md)"
            )
        }

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        path = workdir / "site.toml"
        root = (workdir / "local").resolve()
        driver = os.environ.get(env_name("libcloud", "DRIVER"), "s3")
        host = os.environ.get(env_name("libcloud", "HOST"))
        swift = None
        if driver == "openstack_swift":
            swift = {
                key: os.environ[env_name("libcloud", key.upper())]
                for key in ("auth_url", "project", "domain", "service_region")
            }
        with contextlib.ExitStack() as stack:
            if swift is not None:
                host, port = "", 0  # keystone's catalog gives the endpoint
                key = os.environ[env_name("libcloud", "KEY")]
                secret = os.environ[env_name("libcloud", "SECRET")]
            elif host is None:
                server = stack.enter_context(S3Server())
                host, port, key, secret = server.host, server.port, "testing", "testing"
            else:
                port = int(os.environ[env_name("libcloud", "PORT")])
                key = os.environ[env_name("libcloud", "KEY")]
                secret = os.environ[env_name("libcloud", "SECRET")]
            stack.enter_context(_credentials(key, secret))
            path.write_text(
                site_text(driver=driver, host=host, port=port, root=root, swift=swift),
                encoding="utf-8",
            )
            yield path
