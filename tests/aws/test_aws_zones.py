"""Availability zones as regions on AWS, against the moto server: a site of two zone regions
of us-east-1 (``aws:us-east-1a`` replicating to ``aws:us-east-1b``, each with a bucket and a
KMS key of its own), instances in both zones.

Shown here: each region lists (and finds by id) only its zone's instances; one tick backs up
each instance exactly once, in its own zone's region, and copies 1a's points to 1b like any
other pair; 1a's key opens nothing in 1b's vault; a restore in 1b launches into us-east-1b.
And where settings cannot tell that two regions reach one AWS region (two profiles of one
account), the tick backs up by neither an instance both listed, and says so in one line.

moto does not tie a volume's contents to its snapshots: each instance's disk is seeded as an
EBS snapshot named by the ``regionvault:capture-snapshot`` tag (as in test_aws_end_to_end.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, AwsWorld
from regionvault.core.errors import InstanceNotFound, KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.testing import live_mode, mixed_disk_blocks, seed_snapshot

pytestmark = pytest.mark.skipif(
    live_mode(),
    reason="moto only: it seeds disks through snapshot tags and launches instances",
)

ZONE_A, ZONE_B = f"{EAST}a", f"{EAST}b"
A, B = f"aws:{ZONE_A}", f"aws:{ZONE_B}"


def _zone_settings(aws: AwsWorld, label: str, **more: Any) -> dict[str, Any]:
    """A region of us-east-1 with its own bucket and key (zone regions share neither)."""
    settings = aws.settings(
        EAST, bucket=f"rv-test-{aws.tag}-{label}", kms_key=f"alias/rv-test-{aws.tag}-{label}"
    )
    return {**settings, **more}


def _write_site(tmp_path: Path, regions: dict[str, Any], **more: Any) -> Path:
    doc = {"site": {"name": "zones", "state_dir": str(tmp_path / "state")}, "regions": regions}
    doc.update(more)
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


class Zones:
    """Instances run in chosen zones of us-east-1, each with a seeded 1 MiB disk."""

    def __init__(self, aws: AwsWorld) -> None:
        self.aws = aws
        self.ec2 = aws.client("ec2", EAST)
        self.ebs = aws.client("ebs", EAST)
        self.image = aws.base_image(EAST)

    def run(self, zone: str, name: str, seed: int) -> str:
        snapshot = seed_snapshot(self.ebs, mixed_disk_blocks(1024 * 1024, seed=seed))
        tags = {"backup": "1-7", "Name": name, CAPTURE_SNAPSHOT_TAG: snapshot}
        answer = self.ec2.run_instances(
            ImageId=self.image,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            Placement={"AvailabilityZone": zone},
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        )
        raw = answer["Instances"][0]
        assert raw["Placement"]["AvailabilityZone"] == zone
        return str(raw["InstanceId"])

    def zone_of(self, instance_id: str) -> str:
        answer = self.ec2.describe_instances(InstanceIds=[instance_id])
        return str(answer["Reservations"][0]["Instances"][0]["Placement"]["AvailabilityZone"])


def test_two_zone_regions_back_up_their_own_instances_once_and_launch_into_their_zone(
    aws: AwsWorld, tmp_path: Path
) -> None:
    zones = Zones(aws)
    in_a = sorted(zones.run(ZONE_A, f"vdu-a{n}", seed=n) for n in range(2))
    in_b = [zones.run(ZONE_B, "vdu-b0", seed=10)]
    elsewhere = zones.run(f"{EAST}c", "vcu-c", seed=20)  # in no region of the site
    path = _write_site(
        tmp_path,
        {A: _zone_settings(aws, "1a"), B: _zone_settings(aws, "1b")},
        replication=[{"from": A, "to": B}],
    )
    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    with Site.load(path, registry=registry_from(pm), plugin_manager=pm) as site:
        # ---- each region lists and finds its zone's instances alone
        listed = {
            r.name: sorted(i.id for i in r.compute.list_instances(page_size=1))
            for r in site.regions
        }
        assert listed == {A: in_a, B: in_b}
        with pytest.raises(InstanceNotFound):
            site.region(A).compute.get_instance(in_b[0])
        with pytest.raises(InstanceNotFound):
            site.region(B).compute.get_instance(elsewhere)
        assert site.region(B).compute.get_instance(in_b[0]).extra["availability_zone"] == ZONE_B

        # ---- one tick: each instance backed up once, in its zone's region; 1a's copied to 1b
        engine = Engine(site, clock=lambda: now)
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        schedule = {s.region: s for s in report.schedule}
        assert sorted(d.instance.id for d in schedule[A].due) == in_a
        assert [d.instance.id for d in schedule[B].due] == in_b
        backups = sorted(o.key.split("/")[1:3] for o in report.jobs if o.kind == BACKUP)
        assert backups == sorted([[A, i] for i in in_a] + [[B, i] for i in in_b])
        own = {
            region: sorted(p.instance_id for p in engine.points(region) if p.lineage is None)
            for region in (A, B)
        }
        assert own == {A: in_a, B: in_b}  # exactly one recovery point per instance
        copies = [p for p in engine.points(B) if p.lineage is not None]
        assert sorted(p.instance_id for p in copies) == in_a
        assert {p.lineage.source_region for p in copies if p.lineage} == {A}
        assert len([o for o in report.jobs if o.kind == COPY]) == len(in_a)
        # two zones of one AWS region are two regions: 1a's key opens nothing 1b holds
        with pytest.raises(KeyAccessDenied):
            Repository.open(site.region(B).vault, site.region(A).keys, region=B)

        # ---- a second tick in the slot: nothing is due again
        again = Service(engine).tick()
        assert again.ok and [o for o in again.jobs if o.kind in (BACKUP, COPY)] == []

        # ---- a restore in 1b launches into us-east-1b, and 1b lists it
        result = engine.restore(copies[0].id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        assert zones.zone_of(result.instance.id) == ZONE_B
        assert result.instance.extra["availability_zone"] == ZONE_B
        assert result.instance.id in {i.id for i in site.region(B).compute.list_instances()}
        assert result.instance.id not in {i.id for i in site.region(A).compute.list_instances()}


def test_an_instance_two_profiles_reach_is_backed_up_by_neither_region(
    aws: AwsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two profiles of one account: the settings cannot tell they reach the same instances
    credentials = tmp_path / "credentials"
    keys = "aws_access_key_id = testing\naws_secret_access_key = testing\n"
    credentials.write_text(f"[default]\n{keys}\n[partner]\n{keys}")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    zones = Zones(aws)
    shared = zones.run(ZONE_A, "ims-1", seed=1)
    path = _write_site(
        tmp_path,
        {
            "aws:east": _zone_settings(aws, "east", aws_region=EAST),
            "aws:partner": _zone_settings(aws, "partner", aws_region=EAST, profile="partner"),
        },
    )
    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    with Site.load(path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, clock=lambda: now)
        report = Service(engine).tick()
        line = (
            f"instance {shared} is listed by regions aws:east and aws:partner: not backed up "
            "until one region stops listing it (make the regions list disjoint instances: their "
            "own zone, cloud region, project/account or credentials, or merge them)"
        )
        assert line in report.problems and not report.ok
        assert [o for o in report.jobs if o.kind == BACKUP] == []
        for schedule in report.schedule:
            assert schedule.due == ()
            assert [n.instance_id for n in schedule.failed] == [shared]
        assert engine.points("aws:east") == engine.points("aws:partner") == []
