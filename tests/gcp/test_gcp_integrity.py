"""Flipped bits in a GCP vault: a point backed up from a GCE instance into gcp:east (the
session's gcp-storage-emulator, a Cloud KMS fake, a Compute Engine fake), then one bit of one
object of each kind (the config, a pack, an index, a manifest) flipped by rewriting the
object through the plain google-cloud-storage client beside the provider, as damage at rest
would be. ``verify --read-data`` names the damaged object every time (Cloud Storage's own
CRC32C is of the stored, damaged bytes: the data plane's authentication is what finds it),
and the repository restores byte-exact again once the object is put back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from at_rest import disk_pieces
from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.providers.gcp.conformance import PROJECT, OfflineRegion, offline_region
from regionvault.providers.gcp.emulator import GcsEmulator

A = "gcp:east"
KINDS = ("config", "packs/", "index/", "points/")


@pytest.fixture
def east(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[OfflineRegion]:
    with offline_region(
        "east", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=os.urandom(5).hex()
    ) as region:
        yield region


def _bucket(endpoint: str, name: str) -> object:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": endpoint},
    )
    return client.bucket(name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_bit_in_each_kind_of_object_is_named_by_verify(
    gcs_emulator: GcsEmulator, east: OfflineRegion, tmp_path: Path, kind: str
) -> None:
    east.gce.seed_instance("vcu-1", disks=[disk_pieces(seed=7)], labels={"backup": "1-7"})
    doc = {
        "site": {"name": "integrity-gcp", "state_dir": str(tmp_path / "state")},
        "regions": {A: east.settings},
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site)
        (instance,) = [i for i in site.region(A).compute.list_instances() if i.name == "vcu-1"]
        point = engine.backup(instance.id, region=A)
        vault, keys = site.region(A).vault, site.region(A).keys
        assert Repository.open(vault, keys, region=A).verify(read_data=True).ok

        names = sorted(o.name for o in vault.list("") if o.name.startswith(kind))
        assert names, f"no {kind} object in the vault"
        name = names[0]
        bucket = _bucket(gcs_emulator.endpoint, east.buckets[0])
        blob = bucket.blob(name)  # type: ignore[attr-defined]
        original = blob.download_as_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x10
        blob.upload_from_string(bytes(damaged))
        assert vault.get(name) == bytes(damaged)  # the vault hands out what is stored

        if kind == "config":
            # the config holds the repository's keys: nothing opens without it, by name
            with pytest.raises(RegionVaultError, match="config"):
                Repository.open(vault, keys, region=A)
        else:
            report = Repository.open(vault, keys, region=A).verify(read_data=True)
            assert not report.ok
            assert name in {p.object for p in report.errors}, report.errors

        blob.upload_from_string(original)  # put back: whole again
        repo = Repository.open(vault, keys, region=A)
        assert repo.verify(read_data=True).ok
        assert engine.find_point(point.id, A).id == point.id
