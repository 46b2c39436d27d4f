"""Live mode of the GCP tests and conformance suite: ``REGIONVAULT_GCP_LIVE=1`` runs them
against real GCP, in two regions (A and B) the environment describes; offline (the storage
emulator and the provider's KMS and Compute Engine fakes) stays the default.

=========================================  =================================================
variable                                   meaning
=========================================  =================================================
``REGIONVAULT_GCP_LIVE``                   ``1``: live mode
``REGIONVAULT_GCP_PROJECT``                the project of every test resource
``REGIONVAULT_GCP_ZONE_A``, ``_B``         the regions' zones (``europe-west1-b``); the
                                           compute, the test instances and the workers
``REGIONVAULT_GCP_LOCATION_A``, ``_B``     the regions' locations (key rings, buckets);
                                           by default the zone's (``europe-west1``)
``REGIONVAULT_GCP_BUCKET_A``, ``_B``       the regions' vault buckets (each run writes under
                                           a prefix of its own)
``REGIONVAULT_GCP_INBOX_BUCKET_A``, ``_B`` the regions' transit inbox buckets
``REGIONVAULT_GCP_KEY_RING`` (or ``_A``,   the key ring in each location; its keys
``_B``)                                    ``regionvault-conformance`` (and ``-seal``) are
                                           made on first use
``REGIONVAULT_GCP_WORKER_A``, ``_B``       the backup worker instance of each zone (the
                                           compute tests run ON it: they read the disks it
                                           attaches under ``/dev/disk/by-id``)
``REGIONVAULT_GCP_CREDENTIALS_FILE``       a service account's JSON key file; or
``REGIONVAULT_GCP_CREDENTIALS``            ``application-default`` to use Application
                                           Default Credentials (a worker's own service
                                           account) instead
``REGIONVAULT_GCP_OBJECT_RETENTION``       ``1`` when both vault buckets have object
                                           retention enabled: the WORM tests then run
``REGIONVAULT_GCP_MACHINE_TYPE``           the test instances' type (``e2-small``)
``REGIONVAULT_GCP_NETWORK``,               the launched instances' network
``REGIONVAULT_GCP_SUBNETWORK_A``, ``_B``   (``global/networks/default``) and subnetworks
=========================================  =================================================

Key rings and keys cannot be deleted on GCP: every run uses the same ones (rotation adds
versions); each run's objects go under ``rv-<run>/`` in the buckets and are removed at its
end, and each test's instances, disks and snapshots after it. Nothing here imports the
Google SDK.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from regionvault.core.errors import ConfigError

__all__ = [
    "LIVE_ENV",
    "LIVE_KEY_NAME",
    "LIVE_REGIONS",
    "LIVE_SEAL_KEY_NAME",
    "LiveRegion",
    "LiveSettings",
    "live_mode",
]

#: set to ``1`` to run the GCP tests against real GCP
LIVE_ENV = "REGIONVAULT_GCP_LIVE"
#: the Cloud KMS keys the live runs use in each key ring (made on first use, never deleted:
#: GCP keeps a key's name forever)
LIVE_KEY_NAME = "regionvault-conformance"
LIVE_SEAL_KEY_NAME = "regionvault-conformance-seal"
#: the region ids of live test regions A and B
LIVE_REGIONS = {"A": "gcp:east", "B": "gcp:west"}
_PREFIX = "REGIONVAULT_GCP_"


def live_mode() -> bool:
    """True when the GCP tests should talk to real GCP (``REGIONVAULT_GCP_LIVE=1``)."""
    return os.environ.get(LIVE_ENV, "") == "1"


@dataclass(frozen=True)
class LiveRegion:
    """One live test region (A or B) as the environment describes it."""

    letter: str
    location: str
    zone: str
    bucket: str
    inbox_bucket: str
    key_ring: str
    worker_instance: str
    subnetwork: str | None


@dataclass(frozen=True)
class LiveSettings:
    project: str
    regions: tuple[LiveRegion, LiveRegion]
    #: a service account key file, or None for Application Default Credentials
    credentials_file: str | None
    object_retention: bool
    machine_type: str
    network: str

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> LiveSettings:
        """The live settings; one :class:`ConfigError` naming every variable that is missing
        (or whose file does not exist)."""
        env = os.environ if environ is None else environ
        missing: list[str] = []

        def value(name: str) -> str:
            return env.get(name, "").strip()

        def need(name: str) -> str:
            found = value(name)
            if not found:
                missing.append(name)
            return found

        project = need(f"{_PREFIX}PROJECT")
        regions = []
        for letter in ("A", "B"):
            zone = need(f"{_PREFIX}ZONE_{letter}")
            # a zone is its location and a letter: europe-west1-b is in europe-west1
            location = value(f"{_PREFIX}LOCATION_{letter}") or zone.rpartition("-")[0]
            regions.append(
                LiveRegion(
                    letter=letter,
                    location=location,
                    zone=zone,
                    bucket=need(f"{_PREFIX}BUCKET_{letter}"),
                    inbox_bucket=need(f"{_PREFIX}INBOX_BUCKET_{letter}"),
                    key_ring=value(f"{_PREFIX}KEY_RING_{letter}") or need(f"{_PREFIX}KEY_RING"),
                    worker_instance=need(f"{_PREFIX}WORKER_{letter}"),
                    subnetwork=value(f"{_PREFIX}SUBNETWORK_{letter}") or None,
                )
            )
        credentials_file: str | None = None
        if value(f"{_PREFIX}CREDENTIALS") != "application-default":
            credentials_file = need(f"{_PREFIX}CREDENTIALS_FILE")
            if credentials_file and not Path(credentials_file).expanduser().is_file():
                missing.append(f"{_PREFIX}CREDENTIALS_FILE (no such file: {credentials_file})")
        if missing:
            unique = sorted(set(missing))
            raise ConfigError(
                f"{LIVE_ENV}=1 needs these environment variables (docs/gcp.md, "
                f"'Live mode'): {', '.join(unique)}",
                provider="gcp",
            )
        return cls(
            project=project,
            regions=(regions[0], regions[1]),
            credentials_file=credentials_file,
            object_retention=value(f"{_PREFIX}OBJECT_RETENTION") == "1",
            machine_type=value(f"{_PREFIX}MACHINE_TYPE") or "e2-small",
            network=value(f"{_PREFIX}NETWORK") or "global/networks/default",
        )

    def region(self, letter: str) -> LiveRegion:
        return self.regions[0] if letter == "A" else self.regions[1]

    def region_settings(self, letter: str, *, tag: str) -> dict[str, Any]:
        """site.toml settings of live test region ``letter`` (A or B): its buckets (this
        run's objects under ``rv-<tag>/``), its key ring with the live keys (made on first
        use), its zone and worker, the login the environment names."""
        region = self.region(letter)
        settings: dict[str, Any] = {
            "project": self.project,
            "location": region.location,
            "zone": region.zone,
            "key_ring": region.key_ring,
            "key_name": LIVE_KEY_NAME,
            "seal_key_name": LIVE_SEAL_KEY_NAME,
            "bucket": region.bucket,
            "prefix": f"rv-{tag}/",
            "inbox_bucket": region.inbox_bucket,
            "object_retention": self.object_retention,
            "create": True,
            "worker_instance": region.worker_instance,
            "machine_type": self.machine_type,
            "network": self.network,
        }
        if self.credentials_file is None:
            settings["credentials"] = "application-default"
        else:
            settings["credentials"] = "service-account"
            settings["credentials_file"] = str(Path(self.credentials_file).expanduser())
        if region.subnetwork:
            settings["subnetwork"] = region.subnetwork
        return settings

    def site_text(self, *, tag: str, name: str = "conformance-gcp-live") -> str:
        """The site.toml of a live run: regions ``gcp:east`` (A) and ``gcp:west`` (B) from
        the environment, this run's objects under ``rv-<tag>/``, east replicating to west."""
        site = {
            "site": {"name": name},
            "regions": {
                region: self.region_settings(letter, tag=tag)
                for letter, region in LIVE_REGIONS.items()
            },
            "replication": [{"from": LIVE_REGIONS["A"], "to": LIVE_REGIONS["B"]}],
        }
        return tomli_w.dumps(site)
