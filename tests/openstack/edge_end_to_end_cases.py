"""Issue #17, end to end on composed edge regions (providers/openstack/conformance.py): each
region's compute is a fake OpenStack cloud of its own, its keys a SoftHSM token of its own,
its vault a libcloud vault in moto's S3 server. The two edge regions' vaults are two
different buckets (``rv-east-vault``, ``rv-west-vault``) of that moto server.

- a server tagged ``backup=1-7`` in openstack:east is backed up by a Service tick under
  east's HSM key, copied to openstack:west and launched there from the restored image: its
  image bytes equal the original server's, with the original flavor and metadata; east's
  token refuses every wrapped key west's vault holds;
- a mixed site: an edge region replicating to an AWS region (a moto server) and an AWS
  region replicating to the edge region, each copy under the destination's keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from at_rest import wrapped_keys
from openstack_world import edge_regions
from regionvault.core.conformance.support import tar_image
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site

pytest.importorskip("moto", reason="the edge end-to-end tests need moto[server]")
pytest.importorskip("pkcs11", reason="the edge regions' keys need python-pkcs11")

A, B = "openstack:east", "openstack:west"
#: not the regions' own flavor (m1.small): the launch must take the original's
FLAVOR = "m1.medium"
METADATA = {"backup": "1-7", "function": "vcu", "cell-site": "cs-0042"}


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, dict[str, Any]], dict[str, Any]]]:
    """One edge site for the module: SoftHSM reads one configuration per process."""
    try:
        with edge_regions(tmp_path_factory.mktemp("edge")) as made:
            yield made
    except Exception as exc:  # SoftHSM missing: UnsupportedOperation
        if type(exc).__name__ == "UnsupportedOperation":
            pytest.skip(str(exc))
        raise


def _site_file(tmp_path: Path, regions: dict[str, Any], replication: list[tuple[str, str]]) -> Path:
    doc = {
        "site": {"name": "edge-e2e", "state_dir": str(tmp_path / "state")},
        "regions": regions,
        "replication": [{"from": a, "to": b} for a, b in replication],
    }
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def _tick(engine: Engine) -> Any:
    report = Service(engine).tick()
    assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
    return report


@pytest.fixture(scope="module")
def azurite() -> Iterator[Any]:
    """Another kind of store for west's vault: Azure Blobs (Azurite), through libcloud."""
    from regionvault.providers.azure.azurite import AzuriteServer, AzuriteUnavailable

    server = AzuriteServer({"rvedge": None})
    try:
        server.start()
    except AzuriteUnavailable as exc:
        pytest.skip(f"Azurite is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


#: the settings of a libcloud vault that are not about where it is
_PLACELESS = ("provider", "container", "prefix", "inbox_container", "inbox_prefix", "create")


def test_edge_server_backed_up_copied_and_launched_in_another_edge_region(
    edge: tuple[dict[str, dict[str, Any]], dict[str, Any]],
    azurite: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """East's vault is an S3 bucket (moto); west's is another store, an Azure Blobs container
    (Azurite), both through libcloud: the copy crosses from one kind of store to another."""
    regions, fakes = edge
    west_vault = {k: v for k, v in regions[B]["vault"].items() if k in _PLACELESS}
    monkeypatch.setenv("RV_EDGE_AZ_ACCOUNT", "rvedge")
    monkeypatch.setenv("RV_EDGE_AZ_KEY", azurite.accounts["rvedge"])
    west_vault.update(
        driver="azure_blobs",
        host=azurite.host,
        port=azurite.port,
        secure=False,
        key_env="RV_EDGE_AZ_ACCOUNT",
        secret_env="RV_EDGE_AZ_KEY",
        create=True,
    )
    assert regions[A]["vault"]["driver"] == "s3"
    regions = {**regions, B: {**regions[B], "vault": west_vault}}
    east, west = fakes["east"], fakes["west"]
    original = tar_image({"disk": os.urandom(3 * 1024 * 1024) + b"edge-e2e" * 4096})
    server_id = east.seed_server("vcu-1", original, FLAVOR, dict(METADATA))
    (seeded,) = [s for s in east.servers() if s["id"] == server_id]
    assert east.image_bytes(seeded["image"]) == original
    west_servers_before = {s["id"] for s in west.servers()}

    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    path = _site_file(tmp_path, regions, [(A, B)])
    with Site.load(path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, clock=lambda: now)
        report = _tick(engine)
        backup = next(o for o in report.jobs if o.kind == BACKUP)
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        point = engine.find_point(backup.result["point"], A)
        copy = engine.find_point(copy_job.result["copy"], B)
        assert (point.instance_id, point.region, copy.region) == (server_id, A, B)
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id

        # the backup is under east's HSM key: east's token opens east's repository
        east_keys, west_keys = site.region(A).keys, site.region(B).keys
        Repository.open(site.region(A).vault, east_keys, region=A)

        result = engine.restore(copy.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        assert result.instance.region == B and result.instance.tags == METADATA
        (launched,) = [s for s in west.servers() if s["id"] not in west_servers_before]
        assert launched["status"] == "ACTIVE"
        assert launched["flavor_name"] == FLAVOR
        assert launched["metadata"] == METADATA
        assert west.volume_bytes(launched["id"])[: len(original)] == original

        # west's points are in Azurite's container, read beside the provider
        from azure.storage.blob import BlobServiceClient

        account = {"account_name": "rvedge", "account_key": azurite.accounts["rvedge"]}
        with BlobServiceClient(azurite.account_url("rvedge"), credential=account) as service:
            container = service.get_container_client(west_vault["container"])
            stored = [b.name for b in container.list_blobs()]
        assert any("packs/" in n for n in stored) and any("points/" in n for n in stored)

        # east's token cannot unwrap anything west holds
        west_vault = site.region(B).vault
        west_wrapped = wrapped_keys(west_vault, repository_id=engine.repository(B).repository_id)
        names = [w.object_name for w in west_wrapped]
        assert "config" in names and any(n.startswith("packs/") for n in names)
        for wrapped in west_wrapped:
            assert len(west_keys.unwrap(wrapped.wrapped, wrapped.context)) == 32
            with pytest.raises(KeyAccessDenied):
                east_keys.unwrap(wrapped.wrapped, wrapped.context)
        with pytest.raises(KeyAccessDenied):
            Repository.open(west_vault, east_keys, region=B)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from regionvault.providers.aws.testing import MotoServer

    with MotoServer(log=tmp_path_factory.mktemp("moto") / "moto-server.log") as server:
        yield server


def _find(engine: Engine, point_id: str, regions: tuple[str, ...]) -> Any:
    for region in regions:
        try:
            return engine.find_point(point_id, region)
        except Exception:  # not in this region
            continue
    raise AssertionError(f"no point {point_id} in {regions}")


def test_mixed_site_edge_to_aws_and_aws_to_edge_each_copy_under_destination_keys(
    edge: tuple[dict[str, dict[str, Any]], dict[str, Any]],
    moto_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from cross_cloud import ROOT_DEVICE, aws_endpoint, seed_ec2_instance, volume_blocks
    from regionvault.providers.aws.testing import region_settings

    regions, fakes = edge
    aws = "aws:us-east-1"
    with aws_endpoint(moto_server, monkeypatch, tmp_path) as endpoint:
        ec2_id, _ = seed_ec2_instance(endpoint, {ROOT_DEVICE: volume_blocks(17)}, METADATA)
        server_id = fakes["east"].seed_server(
            "vcu-edge", tar_image({"disk": os.urandom(1024 * 1024)}), FLAVOR, dict(METADATA)
        )
        site_regions = {
            A: regions[A],
            aws: region_settings("us-east-1", endpoint_url=endpoint, tag=uuid.uuid4().hex[:10]),
        }
        path = _site_file(tmp_path, site_regions, [(A, aws), (aws, A)])
        pm = make_plugin_manager()
        now = datetime.now(UTC).replace(microsecond=0)
        with Site.load(path, registry=registry_from(pm), plugin_manager=pm) as site:
            engine = Engine(site, clock=lambda: now)
            report = _tick(engine)
            copies = [o for o in report.jobs if o.kind == COPY]
            made = {}
            for job in copies:
                copy = _find(engine, job.result["copy"], (A, aws))
                assert copy.lineage is not None
                lineage = copy.lineage
                source = engine.find_point(lineage.source_recovery_point, lineage.source_region)
                if source.instance_id in (server_id, ec2_id):
                    made[(str(lineage.source_region), str(copy.region))] = (source, copy)
            assert set(made) == {(A, aws), (aws, A)}
            assert made[(A, aws)][0].instance_id == server_id
            assert made[(aws, A)][0].instance_id == ec2_id
            # each copy is under its destination's keys: the source's cannot open it
            for (src, dst), (_source, copy) in made.items():
                repo = engine.repository(dst)
                assert repo.load_manifest(copy.id) is not None
                with pytest.raises(KeyAccessDenied):
                    Repository.open(site.region(dst).vault, site.region(src).keys, region=dst)
                vault = site.region(dst).vault
                for wrapped in wrapped_keys(vault, repository_id=repo.repository_id):
                    with pytest.raises(KeyAccessDenied):
                        site.region(src).keys.unwrap(wrapped.wrapped, wrapped.context)
