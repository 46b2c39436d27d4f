"""The GCP provider's settings and login, checked without touching GCP: every bad setting is
an error naming its key; a service missing a key it needs names that key; ``anonymous``
(no token) is refused for any endpoint that is not this machine's loopback; the provider
registers and validates with the Google SDK blocked; live mode's environment is named in one
error when incomplete; docs/gcp.md documents every key with its default."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.config import load_site, parse_site
from regionvault.core.errors import ConfigError
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.gcp import plugin as gcp_plugin
from regionvault.providers.gcp.provider import NEEDS_SDK
from regionvault.providers.gcp.settings import (
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
    GcpSettings,
    is_loopback,
)
from regionvault.providers.gcp.testing import (
    LIVE_KEY_NAME,
    LIVE_SEAL_KEY_NAME,
    LiveSettings,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "gcp.md"
REGION = "gcp:east"
BASE = {"project": "rv-project", "location": "europe-west1", "zone": "europe-west1-b"}


def _region(settings: dict[str, Any], region: str = REGION, base_dir: Path | None = None) -> Any:
    """(provider, region) of a one-region site; the site checks every region as it loads."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[gcp_plugin])
    registry = registry_from(pm)
    site = parse_site(
        {"regions": {region: settings}}, registry=registry, source="site.toml", base_dir=base_dir
    )
    return registry.get("gcp"), site.region(region.partition(":")[2])


def _refused(settings: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as bad:
        _region(settings)
    return str(bad.value)


# --------------------------------------------------------------------------- settings.py


#: (settings, the key named, what the error says): at least one row for every key
BAD_SETTINGS: list[tuple[dict[str, Any], str, str]] = [
    ({"project": "Bad_Project"}, "project", "is not a GCP project id"),
    ({"project": "short"}, "project", "is not a GCP project id"),
    ({"project": 12}, "project", "must be a non-empty string"),
    ({"location": "Europe West"}, "location", "is not a GCP location"),
    ({"zone": "europe-west1"}, "zone", "is not a GCP zone"),
    ({"zone": "us-central1-a"}, "zone", "is not a zone of location 'europe-west1'"),
    ({"credentials": "password"}, "credentials", "must be one of application-default"),
    ({"credentials": "service-account"}, "credentials_file", "needs the key file"),
    ({"credentials_file": ""}, "credentials_file", "missing or not a string path"),
    ({"storage_endpoint": "ftp://127.0.0.1:1"}, "storage_endpoint", "is not an endpoint URL"),
    ({"storage_endpoint": "http://storage.example.com"}, "storage_endpoint", "plain http"),
    ({"compute_endpoint": "http://10.0.0.1:8080"}, "compute_endpoint", "plain http"),
    ({"compute_endpoint": "127.0.0.1:8080"}, "compute_endpoint", "is not an endpoint URL"),
    ({"kms_endpoint": "127.0.0.1:grpc"}, "kms_endpoint", "is not host:port"),
    ({"kms_endpoint": "127.0.0.1"}, "kms_endpoint", "is not host:port"),
    ({"kms_endpoint": "http://127.0.0.1:9"}, "kms_endpoint", "is not host:port"),
    ({"kms_plaintext": True}, "kms_plaintext", "only with a kms_endpoint on this machine"),
    (
        {"kms_endpoint": "kms.example.com:443", "kms_plaintext": True},
        "kms_plaintext",
        "only with a kms_endpoint on this machine",
    ),
    ({"kms_plaintext": "yes"}, "kms_plaintext", "must be true or false"),
    ({"create": 1}, "create", "must be true or false"),
    ({"key_ring": "ring/with/slashes"}, "key_ring", "is not a Cloud KMS id"),
    ({"key_name": "x" * 64}, "key_name", "is not a Cloud KMS id"),
    ({"seal_key_name": "regionvault"}, "seal_key_name", "must differ from key_name"),
    ({"bucket": "Bad_Bucket"}, "bucket", "is not a Cloud Storage bucket name"),
    ({"inbox_bucket": "-inbox"}, "inbox_bucket", "is not a Cloud Storage bucket name"),
    ({"bucket": "rv-east", "inbox_bucket": "rv-east"}, "inbox_bucket", "must differ"),
    ({"prefix": "/abs"}, "prefix", "without a leading '/'"),
    ({"prefix": 3}, "prefix", "without a leading '/'"),
    ({"object_retention": "true"}, "object_retention", "must be true or false"),
    ({"single_put_limit": 1024}, "single_put_limit", "must be between"),
    ({"single_put_limit": 2.5}, "single_put_limit", "must be an integer"),
    ({"upload_chunk_size": 300 * 1024}, "upload_chunk_size", "multiple of 256 KiB"),
    ({"upload_chunk_size": 1024}, "upload_chunk_size", "must be between"),
    ({"list_page_size": 0}, "list_page_size", "must be between"),
    ({"list_page_size": 1001}, "list_page_size", "must be between"),
    ({"worker_instance": "Worker_1"}, "worker_instance", "is not a Compute Engine name"),
    ({"device_dir": 5}, "device_dir", "missing or not a string path"),
    ({"machine_type": "E2 Standard"}, "machine_type", "is not a Compute Engine name"),
    ({"network": ""}, "network", "must be a non-empty string"),
    ({"subnetwork": 7}, "subnetwork", "must be a non-empty string"),
    ({"disk_type": "pd_ssd"}, "disk_type", "is not a Compute Engine name"),
    ({"poll_interval": 0}, "poll_interval", "must be between"),
    ({"poll_interval": True}, "poll_interval", "must be a number of seconds"),
    ({"operation_timeout": 0}, "operation_timeout", "must be between"),
    ({"sdk_retries": 21}, "sdk_retries", "must be between"),
    ({"sdk_retries": "3"}, "sdk_retries", "must be an integer"),
    ({"timeout": 0}, "timeout", "must be between"),
]


@pytest.mark.parametrize(("settings", "key", "message"), BAD_SETTINGS)
def test_every_bad_setting_names_its_key(settings: dict[str, Any], key: str, message: str) -> None:
    text = _refused({**BASE, **settings})
    assert f'site.toml: regions."{REGION}".{key}: ' in text, text
    assert message in text and "\n" not in text


def test_every_setting_the_provider_declares_is_checked_by_the_parser() -> None:
    """The bad-settings table above covers every key settings.py declares: a key added later
    without a check of its own shows up here."""
    covered = {key for _settings, key, _message in BAD_SETTINGS}
    assert covered == REQUIRED_SETTINGS | OPTIONAL_SETTINGS


def test_a_region_without_a_project_names_it() -> None:
    text = _refused({"location": "europe-west1"})
    assert f'regions."{REGION}".project: missing' in text


def test_an_unknown_setting_names_itself_and_the_known_ones() -> None:
    text = _refused({**BASE, "bucket_name": "rv-east"})
    assert f'regions."{REGION}".bucket_name: unknown setting for the gcp provider' in text
    assert "inbox_bucket" in text


def test_the_declared_keys_are_the_settings_fields() -> None:
    fields = {f.name for f in dataclasses.fields(GcpSettings)} - {"region"}
    assert fields == REQUIRED_SETTINGS | OPTIONAL_SETTINGS


def test_good_settings_are_read_with_their_defaults(tmp_path: Path) -> None:
    _, region = _region(
        {
            **BASE,
            "credentials": "service-account",
            "credentials_file": "keys/east.json",
            "prefix": "team-a",
            "kms_endpoint": "[::1]:9443",
            "kms_plaintext": True,
            "storage_endpoint": "http://localhost:9023/",
            "device_dir": "devices",
        },
        base_dir=tmp_path,
    )
    settings = GcpSettings.from_region(region)
    assert settings.credentials_file == str(tmp_path / "keys" / "east.json")
    assert settings.device_dir == str(tmp_path / "devices")
    assert settings.prefix == "team-a/" and settings.storage_endpoint == "http://localhost:9023"
    assert settings.on_loopback("kms") and settings.on_loopback("storage")
    assert not settings.on_loopback("compute")  # not configured: the public endpoint
    assert settings.key_ring_path == (
        "projects/rv-project/locations/europe-west1/keyRings/regionvault"
    )
    assert settings.key_path(settings.seal_key_name).endswith("/cryptoKeys/regionvault-seal")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("127.0.0.1.nip.io", False),  # a name that resolves anywhere
        ("localhost.example.com", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("storage.googleapis.com", False),
        ("", False),
    ],
)
def test_only_the_loopback_is_the_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("build", "key", "service"),
    [
        ("key_service", "location", "keys"),
        ("sealer", "location", "sealer"),
        ("vault", "bucket", "vault"),
        ("compute", "zone", "compute"),
    ],
)
def test_a_service_without_the_setting_it_needs_names_it(
    build: str, key: str, service: str
) -> None:
    provider, region = _region({"project": "rv-project"})
    with pytest.raises(ConfigError) as missing:
        getattr(provider, build)(region)
    assert str(missing.value) == (
        f'site.toml: regions."{REGION}".{key}: missing (the gcp provider needs {key} for the '
        f"{service})"
    )


def test_the_transit_names_the_destinations_missing_inbox() -> None:
    pm = make_plugin_manager(load_entry_points=False, plugins=[gcp_plugin])
    registry = registry_from(pm)
    site = parse_site(
        {
            "regions": {
                "gcp:east": {**BASE, "inbox_bucket": "rv-east-inbox"},
                "gcp:west": {"project": "rv-project", "location": "us-central1"},
            }
        },
        registry=registry,
        source="site.toml",
    )
    with pytest.raises(ConfigError) as missing:
        registry.get("gcp").transit(site.region("east"), site.region("west"))
    assert 'regions."gcp:west".inbox_bucket: missing' in str(missing.value)


# --------------------------------------------------------------------------- auth.py


def _credentials(settings: dict[str, Any], service: str, override: Any = None) -> Any:
    pytest.importorskip("google.auth", reason="the login needs google-auth")
    from regionvault.providers.gcp.auth import credentials_for

    _, region = _region({**BASE, **settings})
    return credentials_for(region, GcpSettings.from_region(region), service, override)


@pytest.mark.parametrize(
    ("settings", "service"),
    [
        ({}, "storage"),  # no endpoint: storage.googleapis.com
        ({}, "kms"),
        ({}, "compute"),
        ({"storage_endpoint": "https://storage.example.com"}, "storage"),
        ({"storage_endpoint": "https://127.0.0.1.nip.io:9023"}, "storage"),
        ({"kms_endpoint": "cloudkms.googleapis.com:443"}, "kms"),
        ({"kms_endpoint": "10.1.2.3:9443"}, "kms"),
        ({"compute_endpoint": "https://compute.example.com"}, "compute"),
        # a loopback endpoint of ANOTHER service does not make this one's loopback
        ({"storage_endpoint": "http://127.0.0.1:9023"}, "compute"),
    ],
)
def test_anonymous_is_refused_for_an_endpoint_off_the_loopback(
    settings: dict[str, Any], service: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _credentials({"credentials": "anonymous", **settings}, service)
    text = str(refused.value)
    assert text.startswith(f'site.toml: regions."{REGION}".credentials: ')
    assert f'credentials = "anonymous" needs {service}_endpoint on this machine' in text


@pytest.mark.parametrize(
    ("settings", "service"),
    [
        ({"storage_endpoint": "http://127.0.0.1:9023"}, "storage"),
        ({"storage_endpoint": "https://localhost:9023"}, "storage"),
        ({"kms_endpoint": "127.0.0.1:9443"}, "kms"),
        ({"kms_endpoint": "[::1]:9443"}, "kms"),
        ({"compute_endpoint": "http://[::1]:8080"}, "compute"),
    ],
)
def test_anonymous_against_the_loopback_sends_no_token(
    settings: dict[str, Any], service: str
) -> None:
    from google.auth.credentials import AnonymousCredentials

    credentials = _credentials({"credentials": "anonymous", **settings}, service)
    assert isinstance(credentials, AnonymousCredentials)
    headers: dict[str, str] = {}
    credentials.apply(headers)
    assert "authorization" not in {k.lower() for k in headers}


def test_an_unreadable_service_account_key_names_the_file(tmp_path: Path) -> None:
    settings = {"credentials": "service-account"}
    with pytest.raises(ConfigError) as absent:
        _credentials({**settings, "credentials_file": str(tmp_path / "none.json")}, "storage")
    assert f'regions."{REGION}".credentials_file: cannot read the service account key' in str(
        absent.value
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"type": "service_account"}')
    with pytest.raises(ConfigError) as bad:
        _credentials({**settings, "credentials_file": str(garbage)}, "kms")
    assert f'regions."{REGION}".credentials_file: ' in str(bad.value)
    assert str(garbage) in str(bad.value)


def test_a_service_account_key_is_read_with_the_cloud_platform_scope(tmp_path: Path) -> None:
    """A key file of the shape the console downloads (a throwaway RSA key): credentials for
    that account, scoped, holding no token yet (nothing was sent)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "east.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "rv-project",
                "private_key_id": "0123456789abcdef",
                "private_key": pem,
                "client_email": "rv-east@rv-project.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    credentials = _credentials(
        {"credentials": "service-account", "credentials_file": str(path)}, "storage"
    )
    assert credentials.service_account_email == "rv-east@rv-project.iam.gserviceaccount.com"
    assert tuple(credentials.scopes) == ("https://www.googleapis.com/auth/cloud-platform",)
    assert credentials.token is None


def test_no_application_default_credentials_is_one_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADC itself probes the metadata server, which no offline test may do: google.auth.default
    is replaced by one that fails the way it does on a machine without any login."""
    pytest.importorskip("google.auth")
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_login(**_: Any) -> Any:
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_login)
    with pytest.raises(ConfigError) as missing:
        _credentials({}, "storage")
    assert str(missing.value) == (
        f'site.toml: regions."{REGION}".credentials: no Application Default Credentials: '
        "Your default credentials were not found."
    )


def test_an_embedders_credentials_win_over_the_settings() -> None:
    mine = object()
    assert _credentials({"credentials": "anonymous"}, "storage", override=mine) is mine


# --------------------------------------------------------------------------- without the SDK

BLOCK_SDK = """
import importlib.abc, sys
BLOCKED = {"google", "grpc", "proto", "google_crc32c"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def test_registers_and_validates_without_the_sdk(tmp_path: Path) -> None:
    """A child with the Google SDK (and grpc) blocked: the provider registers through its
    entry point, a site of every setting validates, a bad one is still named, and building a
    login says in one line which extra to install; no Google module is ever loaded."""
    code = """
        import json
        from regionvault.core.config import parse_site
        from regionvault.core.errors import RegionVaultError
        from regionvault.core.plugins import get_plugin_manager
        import regionvault.providers.gcp.testing

        pm, registry = get_plugin_manager()
        provider = registry.get("gcp")
        good = {
            "project": "rv-project", "location": "europe-west1", "zone": "europe-west1-b",
            "credentials": "anonymous", "bucket": "rv-east", "inbox_bucket": "rv-east-inbox",
            "storage_endpoint": "http://127.0.0.1:9", "kms_endpoint": "127.0.0.1:9",
            "kms_plaintext": True, "compute_endpoint": "http://127.0.0.1:9",
            "worker_instance": "rv-worker",
        }
        site = parse_site({"regions": {"gcp:east": good}}, registry=registry)
        region = site.region("east")
        provider.validate(region)
        refused = []
        try:
            parse_site({"regions": {"gcp:east": {**good, "zone": "x"}}}, registry=registry)
        except RegionVaultError as exc:
            refused.append(str(exc))
        settings = provider.settings(region)
        for service in ("storage", "kms", "compute"):
            try:
                provider.credentials(region, settings, service)
            except RegionVaultError as exc:
                refused.append(str(exc))
        loaded = sorted(
            m for m in sys.modules
            if m.partition(".")[0] in {"google", "grpc", "proto", "google_crc32c"}
        )
        print(json.dumps({"names": registry.names(), "loaded": loaded, "refused": refused}))
    """
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SDK + textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert "gcp" in found["names"] and found["loaded"] == []
    assert found["refused"][0].endswith(
        "regions.\"gcp:east\".zone: 'x' is not a GCP zone such as europe-west1-b"
    )
    assert found["refused"][1:] == 3 * [f"[gcp:east] {NEEDS_SDK}"]


@pytest.mark.parametrize(
    ("build", "module"),
    [
        ("key_service", "kms"),
        ("sealer", "kms"),
        ("vault", "storage"),
        ("transit", "transit"),
        ("compute", "compute"),
    ],
)
def test_every_service_without_the_sdk_says_which_extra_to_install(
    tmp_path: Path, build: str, module: str
) -> None:
    """Each service module imports the SDK; with it blocked, building the service is the
    one-line NEEDS_SDK error, not an import traceback."""
    from importlib.util import find_spec

    if find_spec(f"regionvault.providers.gcp.{module}") is None:
        pytest.fail(f"providers/gcp/{module}.py is not in this tree yet", pytrace=False)
    code = f"""
        import json
        from regionvault.core.config import parse_site
        from regionvault.core.errors import RegionVaultError
        from regionvault.core.plugins import get_plugin_manager

        pm, registry = get_plugin_manager()
        provider = registry.get("gcp")
        good = {{
            "project": "rv-project", "location": "europe-west1", "zone": "europe-west1-b",
            "credentials": "anonymous", "bucket": "rv-east", "inbox_bucket": "rv-east-inbox",
            "storage_endpoint": "http://127.0.0.1:9", "kms_endpoint": "127.0.0.1:9",
            "kms_plaintext": True, "compute_endpoint": "http://127.0.0.1:9",
            "worker_instance": "rv-worker",
        }}
        site = parse_site({{"regions": {{"gcp:east": good}}}}, registry=registry)
        region = site.region("east")
        args = (region, region) if {build!r} == "transit" else (region,)
        try:
            getattr(provider, {build!r})(*args)
            print(json.dumps("built"))
        except RegionVaultError as exc:
            print(json.dumps(str(exc)))
    """
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SDK + textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == f"[gcp:east] {NEEDS_SDK}"


# --------------------------------------------------------------------------- live mode

LIVE = {
    "REGIONVAULT_GCP_PROJECT": "rv-live-project",
    "REGIONVAULT_GCP_ZONE_A": "europe-west1-b",
    "REGIONVAULT_GCP_ZONE_B": "us-central1-a",
    "REGIONVAULT_GCP_BUCKET_A": "rv-live-east",
    "REGIONVAULT_GCP_BUCKET_B": "rv-live-west",
    "REGIONVAULT_GCP_INBOX_BUCKET_A": "rv-live-east-inbox",
    "REGIONVAULT_GCP_INBOX_BUCKET_B": "rv-live-west-inbox",
    "REGIONVAULT_GCP_KEY_RING": "rv-live",
    "REGIONVAULT_GCP_WORKER_A": "rv-worker-east",
    "REGIONVAULT_GCP_WORKER_B": "rv-worker-west",
}


def test_an_incomplete_live_environment_is_one_error_naming_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        LiveSettings.from_environment({"REGIONVAULT_GCP_BUCKET_A": "rv-live-east"})
    message = str(exc.value)
    assert message.startswith(
        "REGIONVAULT_GCP_LIVE=1 needs these environment variables (docs/gcp.md, 'Live mode'): "
    )
    named = message.partition("'Live mode'): ")[2].split(", ")
    assert named == sorted(
        {
            "REGIONVAULT_GCP_PROJECT",
            "REGIONVAULT_GCP_ZONE_A",
            "REGIONVAULT_GCP_ZONE_B",
            "REGIONVAULT_GCP_BUCKET_B",
            "REGIONVAULT_GCP_INBOX_BUCKET_A",
            "REGIONVAULT_GCP_INBOX_BUCKET_B",
            "REGIONVAULT_GCP_KEY_RING",
            "REGIONVAULT_GCP_WORKER_A",
            "REGIONVAULT_GCP_WORKER_B",
            "REGIONVAULT_GCP_CREDENTIALS_FILE",
        }
    )
    assert "\n" not in message


def test_a_live_key_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    absent = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as exc:
        LiveSettings.from_environment({**LIVE, "REGIONVAULT_GCP_CREDENTIALS_FILE": str(absent)})
    assert str(exc.value).endswith(f"REGIONVAULT_GCP_CREDENTIALS_FILE (no such file: {absent})")


def test_a_live_environment_gives_a_site_every_gcp_service_accepts(tmp_path: Path) -> None:
    key_file = tmp_path / "sa.json"
    key_file.write_text("{}")
    live = LiveSettings.from_environment(
        {
            **LIVE,
            "REGIONVAULT_GCP_CREDENTIALS_FILE": str(key_file),
            "REGIONVAULT_GCP_KEY_RING_B": "rv-live-west",
            "REGIONVAULT_GCP_SUBNETWORK_A": "regions/europe-west1/subnetworks/rv",
            "REGIONVAULT_GCP_OBJECT_RETENTION": "1",
        }
    )
    path = tmp_path / "site.toml"
    path.write_text(live.site_text(tag="run1"), encoding="utf-8")
    pm = make_plugin_manager(load_entry_points=False, plugins=[gcp_plugin])
    config = load_site(path, registry=registry_from(pm))  # every region validated
    assert config.name == "conformance-gcp-live"
    assert [(str(r.source), [str(d) for d in r.destinations]) for r in config.replication] == [
        ("gcp:east", ["gcp:west"])
    ]
    east = GcpSettings.from_region(config.regions["gcp:east"])
    west = GcpSettings.from_region(config.regions["gcp:west"])
    assert (east.location, east.zone, west.location, west.zone) == (
        "europe-west1",
        "europe-west1-b",
        "us-central1",
        "us-central1-a",
    )
    assert (east.bucket, east.inbox_bucket, east.prefix) == (
        "rv-live-east",
        "rv-live-east-inbox",
        "rv-run1/",
    )
    assert (east.key_ring, west.key_ring) == ("rv-live", "rv-live-west")
    assert (east.key_name, east.seal_key_name) == (LIVE_KEY_NAME, LIVE_SEAL_KEY_NAME)
    assert east.credentials == "service-account" and east.credentials_file == str(key_file)
    assert east.object_retention and east.create and west.worker_instance == "rv-worker-west"
    assert east.subnetwork == "regions/europe-west1/subnetworks/rv" and west.subnetwork is None
    # the public endpoints: nothing of the offline stack
    assert all(s.endpoint_of(v) is None for s in (east, west) for v in ("storage", "kms"))
    assert east.machine_type == "e2-small"


def test_live_mode_may_log_in_with_application_default_credentials() -> None:
    live = LiveSettings.from_environment(
        {**LIVE, "REGIONVAULT_GCP_CREDENTIALS": "application-default"}
    )
    settings = live.region_settings("A", tag="t")
    assert settings["credentials"] == "application-default"
    assert "credentials_file" not in settings and live.credentials_file is None


# --------------------------------------------------------------------------- docs/gcp.md


def _documented_settings() -> dict[str, str]:
    """key -> default, from docs/gcp.md's settings table (rows ``| `key` | type | default |``)."""
    rows: dict[str, str] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4:
            for key in re.findall(r"^`([a-z_]+)`$", cells[0]):
                rows[key] = cells[2]
    return rows


def test_the_docs_name_every_setting_with_its_default() -> None:
    documented = _documented_settings()
    assert set(documented) == REQUIRED_SETTINGS | OPTIONAL_SETTINGS
    defaults = {f.name: f.default for f in dataclasses.fields(GcpSettings) if f.name != "region"}
    for key, default in defaults.items():
        if default is None or default is dataclasses.MISSING:
            assert documented[key] == "—", (key, documented[key])
        elif isinstance(default, bool):
            assert documented[key] == f"`{str(default).lower()}`", key
        elif isinstance(default, int) and default % (1024 * 1024) == 0 and default >= 1 << 20:
            assert documented[key] == f"{default >> 20} MiB", key
        elif isinstance(default, int | float):
            assert documented[key] == f"`{default:g}`", key
        else:
            assert documented[key] == f'`"{default}"`', key
