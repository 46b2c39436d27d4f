"""The local provider as a whole: settings, capabilities, one root per region."""

from __future__ import annotations

from pathlib import Path

import pytest
from regionvault.core import CaptureKind, ConfigError, Site
from regionvault.providers.local import LocalProvider
from site_support import open_site


def load(tmp_path: Path, region_table: str) -> Site:
    path = tmp_path / "site.toml"
    path.write_text(f'[regions."local:east"]\n{region_table}\n')
    return open_site(path)


def test_capabilities_are_declared() -> None:
    caps = LocalProvider.capabilities
    assert caps.worm_lock and caps.legal_hold and caps.conditional_put and caps.ranged_get
    assert caps.launch and caps.register_instance and caps.key_rotation
    assert not caps.server_side_copy
    assert caps.capture_kinds == {CaptureKind.FILES}
    assert LocalProvider.required_settings == {"root"}


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ("", "root", "missing"),
        ("root = 3", "root", "not a string path"),
        ('root = "r"\nterminate_timeout = 0', "terminate_timeout", "positive number"),
        ('root = "r"\nterminate_timeout = "5"', "terminate_timeout", "positive number"),
        ('root = "r"\nflavour = "x"', "flavour", "unknown setting"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, table: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, table)
    assert err.value.key == f'regions."local:east".{key}'
    assert str(tmp_path / "site.toml") in str(err.value)


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        load(tmp_path, 'root = "r"')


def test_every_service_lives_under_the_region_root(tmp_path: Path) -> None:
    with load(tmp_path, 'root = "r"\nterminate_timeout = 2.5') as site:
        region = site.region("east")
        region.vault.put("x", b"1")
        region.keys.generate_data_key({"kind": "test"})
        (tmp_path / "data").mkdir()
        region.compute.register_instance("n", tmp_path / "data")
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["compute", "keys", "vault"]
        assert {region.compute.provider, region.keys.provider, region.vault.provider} == {"local"}
        assert region.vault.region == "local:east"
