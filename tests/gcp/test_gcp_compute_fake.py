"""The Compute Engine fake (providers/gcp/fakes/compute.py) driven by the unmodified
``google.cloud.compute_v1`` clients over real 127.0.0.1 connections: what GceCompute and the
ComputeSuite rely on behaves as GCE documents it (operations that must be polled, label
filters and pages, fingerprints, disks refused while attached, worker device links)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("google.cloud.compute_v1", reason="the GCP tests need pip install -e '.[test]'")

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1
from regionvault.providers.gcp.fakes.compute import (
    EMPTY_LABEL_FINGERPRINT,
    FilterError,
    GceFake,
    GiB,
    copy_sparse,
    data_extents,
    parse_label_filter,
    seed_instance_over_api,
)

PROJECT = "rv-test-project"
ZONE = "europe-west1-b"
DONE = compute_v1.Operation.Status.DONE
RUNNING = compute_v1.Operation.Status.RUNNING
PENDING = compute_v1.Operation.Status.PENDING


@dataclass
class Gce:
    fake: GceFake
    instances: compute_v1.InstancesClient
    disks: compute_v1.DisksClient
    snapshots: compute_v1.SnapshotsClient
    zone_ops: compute_v1.ZoneOperationsClient
    global_ops: compute_v1.GlobalOperationsClient

    def wait(self, op: compute_v1.Operation, polls: int = 20) -> compute_v1.Operation:
        """Poll ``op`` (zone or global) until DONE, at most ``polls`` times."""
        for _ in range(polls):
            if op.status == DONE:
                return op
            if op.zone:
                op = self.zone_ops.wait(project=PROJECT, zone=ZONE, operation=op.name)
            else:
                op = self.global_ops.wait(project=PROJECT, operation=op.name)
        raise AssertionError(f"operation {op.name} not DONE after {polls} polls")

    def done(self, op: compute_v1.Operation) -> compute_v1.Operation:
        """``op`` polled to DONE, and without an error."""
        op = self.wait(op)
        assert not op.error.errors, op.error
        return op

    def names(self, **request: Any) -> list[str]:
        request = {"project": PROJECT, "zone": ZONE, **request}
        return [i.name for i in self.instances.list(request=request)]


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[Gce]:
    with GceFake(project=PROJECT, zone=ZONE, state_dir=tmp_path / "gce") as fake:
        options = {"api_endpoint": fake.endpoint}
        credentials = AnonymousCredentials()
        clients = [
            cls(credentials=credentials, client_options=options)  # type: ignore[operator]
            for cls in (
                compute_v1.InstancesClient,
                compute_v1.DisksClient,
                compute_v1.SnapshotsClient,
                compute_v1.ZoneOperationsClient,
                compute_v1.GlobalOperationsClient,
            )
        ]
        yield Gce(fake, *clients)
        for client in clients:
            client.transport.close()


def _disk(gce: Gce, name: str) -> compute_v1.Disk:
    return gce.disks.get(project=PROJECT, zone=ZONE, disk=name)


def _snapshot_of(gce: Gce, disk: str, name: str, **labels: str) -> compute_v1.Snapshot:
    op = gce.disks.create_snapshot_unary(
        project=PROJECT,
        zone=ZONE,
        disk=disk,
        snapshot_resource=compute_v1.Snapshot(name=name, labels=labels),
    )
    gce.done(op)
    return gce.snapshots.get(project=PROJECT, snapshot=name)


def _attach(
    gce: Gce, instance: str, disk: str, device: str, mode: str = "READ_WRITE"
) -> compute_v1.Operation:
    return gce.instances.attach_disk_unary(
        project=PROJECT,
        zone=ZONE,
        instance=instance,
        attached_disk_resource=compute_v1.AttachedDisk(
            source=f"zones/{ZONE}/disks/{disk}", device_name=device, mode=mode
        ),
    )


def _detach(gce: Gce, instance: str, device: str) -> None:
    gce.done(
        gce.instances.detach_disk_unary(
            project=PROJECT, zone=ZONE, instance=instance, device_name=device
        )
    )


def _blank(gce: Gce, name: str) -> None:
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name=name, size_gb=10)
        )
    )


def _blocks(path: Path) -> int:
    return path.stat().st_blocks * 512


def _reports_holes(path: Path) -> bool:
    """True when the file system of ``path`` reports holes (SEEK_DATA) for a sparse file."""
    probe = path / "probe"
    with probe.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"x")
    with probe.open("rb") as f:
        extents = list(data_extents(f.fileno(), 64 << 20))
    probe.unlink()
    return sum(end - start for start, end in extents) < 64 << 20


# --------------------------------------------------------------------------- label filters


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("", []),
        ('labels.env = "prod"', [("env", "prod")]),
        ("labels.env=prod", [("env", "prod")]),
        ('labels.env = ""', [("env", "")]),
        ("labels.rv-policy:*", [("rv-policy", None)]),
        (
            '(labels.env = "prod") (labels.tier:*)',
            [("env", "prod"), ("tier", None)],
        ),
        (
            '(labels.env = "prod") AND (labels.team = "core_1")',
            [("env", "prod"), ("team", "core_1")],
        ),
        ('  ( labels.a = "x" )  ', [("a", "x")]),
    ],
)
def test_label_filters_the_api_accepts(text: str, terms: list[tuple[str, str | None]]) -> None:
    assert parse_label_filter(text) == terms


@pytest.mark.parametrize(
    "text",
    [
        'labels.env != "prod"',
        '(labels.env = "prod") OR (labels.env = "dev")',
        'labels.env = "prod" labels.tier = "a"',
        'labels.env = "prod" AND labels.tier = "a"',
        '(labels.env = "prod") AND',
        'name = "vm-1"',
        'labels.Env = "prod"',
        'labels.env = "Prod"',
        "labels.env:prod",
        'NOT labels.env = "prod"',
        '(labels.env = "prod"',
    ],
)
def test_label_filters_the_fake_refuses(text: str) -> None:
    with pytest.raises(FilterError):
        parse_label_filter(text)


_KEYS = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_VALUES = st.from_regex(r"[a-z0-9_-]{0,8}", fullmatch=True)


@given(
    st.lists(st.tuples(_KEYS, st.none() | _VALUES), min_size=1, max_size=5),
    st.sampled_from([" AND ", " ", "  AND  "]),
    st.booleans(),
)
def test_any_and_of_label_expressions_parses_back(
    terms: list[tuple[str, str | None]], joiner: str, quoted: bool
) -> None:
    def render(key: str, value: str | None) -> str:
        if value is None:
            return f"labels.{key}:*"
        if quoted or not value:
            return f'labels.{key} = "{value}"'
        return f"labels.{key}={value}"

    text = joiner.join(f"({render(k, v)})" for k, v in terms)
    assert parse_label_filter(text) == terms
    if len(terms) == 1:
        assert parse_label_filter(render(*terms[0])) == terms
    else:  # the same expressions without their parentheses are refused
        with pytest.raises(FilterError):
            parse_label_filter(joiner.join(render(k, v) for k, v in terms))


def test_list_filters_on_labels_over_the_wire(gce: Gce) -> None:
    gce.fake.seed_instance("vm-prod-a", labels={"env": "prod", "tier": "web"})
    gce.fake.seed_instance("vm-prod-b", labels={"env": "prod"})
    gce.fake.seed_instance("vm-dev", labels={"env": "dev", "tier": "web"})
    assert gce.names(filter='labels.env = "prod"') == ["vm-prod-a", "vm-prod-b"]
    assert gce.names(filter="labels.tier:*") == ["vm-dev", "vm-prod-a"]
    assert gce.names(filter='(labels.env = "prod") AND (labels.tier = "web")') == ["vm-prod-a"]
    assert gce.names(filter='(labels.env = "prod") (labels.tier:*)') == ["vm-prod-a"]
    assert gce.names(filter='labels.env = "test"') == []
    # the worker has no labels: an unfiltered listing has it, a filtered one does not
    assert "rv-worker" in gce.names()
    with pytest.raises(gexc.BadRequest, match="filter"):
        gce.names(filter='labels.env = "prod" OR labels.env = "dev"')


def test_list_pages_with_max_results_and_page_token(gce: Gce) -> None:
    for i in range(5):
        gce.fake.seed_instance(f"vm-{i}", labels={"rv": "yes"})
    before = gce.fake.counts["instances.list"]
    assert gce.names(filter="labels.rv:*", max_results=2) == [f"vm-{i}" for i in range(5)]
    assert gce.fake.counts["instances.list"] - before == 3  # 2 + 2 + 1
    first = gce.instances.list(
        request={"project": PROJECT, "zone": ZONE, "filter": "labels.rv:*", "max_results": 3}
    )
    page = next(iter(first.pages))
    assert [i.name for i in page.items] == ["vm-0", "vm-1", "vm-2"]
    assert page.next_page_token
    # an instance made between pages appears in its place: tokens name the last item seen
    gce.fake.seed_instance("vm-2b", labels={"rv": "yes"})
    rest = gce.instances.list(
        request={
            "project": PROJECT,
            "zone": ZONE,
            "filter": "labels.rv:*",
            "max_results": 3,
            "page_token": page.next_page_token,
        }
    )
    assert [i.name for i in rest] == ["vm-2b", "vm-3", "vm-4"]
    # one deleted between pages is not listed, and nothing after it is skipped
    gce.done(gce.instances.delete_unary(project=PROJECT, zone=ZONE, instance="vm-3"))
    rest = gce.instances.list(
        request={
            "project": PROJECT,
            "zone": ZONE,
            "filter": "labels.rv:*",
            "max_results": 3,
            "page_token": page.next_page_token,
        }
    )
    assert [i.name for i in rest] == ["vm-2b", "vm-4"]
    with pytest.raises(gexc.BadRequest, match="pageToken"):
        gce.names(page_token="not-a-token")
    with pytest.raises(gexc.BadRequest, match="maxResults"):
        gce.names(max_results=501)


# --------------------------------------------------------------------------- instances


def test_get_answers_the_instance_as_gce_shapes_it(gce: Gce) -> None:
    gce.fake.seed_instance(
        "vm-a",
        disks=[b"boot", {0: b"a", 3 * GiB: b"b"}],
        machine_type="n2-standard-4",
        labels={"env": "prod"},
    )
    vm = gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a")
    assert vm.status == "RUNNING"
    assert vm.machine_type.endswith(f"/zones/{ZONE}/machineTypes/n2-standard-4")
    assert vm.labels == {"env": "prod"}
    assert vm.label_fingerprint and vm.label_fingerprint != EMPTY_LABEL_FINGERPRINT
    assert [(d.boot, d.device_name, d.index) for d in vm.disks] == [
        (True, "persistent-disk-0", 0),
        (False, "persistent-disk-1", 1),
    ]
    assert vm.disks[1].source.endswith(f"/projects/{PROJECT}/zones/{ZONE}/disks/vm-a-1")
    assert vm.network_interfaces[0].network.endswith("/global/networks/default")
    assert _disk(gce, "vm-a-1").size_gb == 10
    assert _disk(gce, "vm-a-1").users == [vm.self_link]
    with gce.fake.disk_path("vm-a-1").open("rb") as f:
        f.seek(3 * GiB)
        assert f.read(1) == b"b"
    with pytest.raises(gexc.NotFound, match="instances/nope"):
        gce.instances.get(project=PROJECT, zone=ZONE, instance="nope")
    with pytest.raises(gexc.NotFound, match="other-project"):
        gce.instances.get(project="other-project", zone=ZONE, instance="vm-a")
    with pytest.raises(gexc.BadRequest, match="zone"):
        gce.instances.get(project=PROJECT, zone="us-east1-b", instance="vm-a")


def test_seed_instance_refuses_what_gce_would(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a")
    with pytest.raises(ValueError, match="already exists"):
        gce.fake.seed_instance("vm-a")
    with pytest.raises(ValueError, match="Label keys"):
        gce.fake.seed_instance("vm-b", labels={"Bad": "x"})
    with pytest.raises(ValueError, match="regex"):
        gce.fake.seed_instance("VM_C")
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="vm-d-0", size_gb=10)
        )
    )
    with pytest.raises(ValueError, match="disks/vm-d-0"):
        gce.fake.seed_instance("vm-d")
    assert gce.fake.instance_names() == ["rv-worker", "vm-a"]


def test_set_labels_checks_the_fingerprint(gce: Gce) -> None:
    gce.fake.operation_polls = 3  # RUNNING through the next two requests of any method
    gce.fake.seed_instance("vm-a", labels={"env": "prod"})
    vm = gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a")

    def set_labels(labels: dict[str, str], fingerprint: str | None) -> compute_v1.Operation:
        body = compute_v1.InstancesSetLabelsRequest(labels=labels)
        if fingerprint is not None:
            body.label_fingerprint = fingerprint
        return gce.instances.set_labels_unary(
            project=PROJECT,
            zone=ZONE,
            instance="vm-a",
            instances_set_labels_request_resource=body,
        )

    op = set_labels({"env": "prod", "rv-policy": "1-7"}, vm.label_fingerprint)
    # the labels change when the operation is done, not before
    assert gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a").labels == {"env": "prod"}
    gce.done(op)
    after = gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a")
    assert after.labels == {"env": "prod", "rv-policy": "1-7"}
    assert after.label_fingerprint != vm.label_fingerprint
    with pytest.raises(gexc.PreconditionFailed, match="fingerprint"):
        set_labels({"env": "dev"}, vm.label_fingerprint)
    with pytest.raises(gexc.BadRequest, match="labelFingerprint"):
        set_labels({"env": "dev"}, None)
    with pytest.raises(gexc.BadRequest, match="Label keys"):
        set_labels({"Env": "dev"}, after.label_fingerprint)
    with pytest.raises(gexc.BadRequest, match="Label values"):
        set_labels({"env": "x" * 64}, after.label_fingerprint)
    gce.done(set_labels({}, after.label_fingerprint))
    cleared = gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a")
    assert cleared.labels == {}
    assert cleared.label_fingerprint == EMPTY_LABEL_FINGERPRINT


def test_insert_from_disks_and_snapshots_then_delete(gce: Gce) -> None:
    gce.fake.operation_polls = 3  # RUNNING through the next two requests of any method
    gce.fake.seed_instance("vm-src", disks=[b"boot-bytes", b"data-bytes"])
    _snapshot_of(gce, "vm-src-0", "snap-boot")
    _snapshot_of(gce, "vm-src-1", "snap-data")
    op = gce.disks.insert_unary(
        project=PROJECT,
        zone=ZONE,
        disk_resource=compute_v1.Disk(name="restored-boot", size_gb=12),
    )
    gce.done(op)
    instance = compute_v1.Instance(
        name="vm-new",
        machine_type=f"zones/{ZONE}/machineTypes/e2-standard-2",
        labels={"rv-restored": "yes"},
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
        disks=[
            compute_v1.AttachedDisk(
                boot=True, auto_delete=True, source=f"zones/{ZONE}/disks/restored-boot"
            ),
            compute_v1.AttachedDisk(
                auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_snapshot="global/snapshots/snap-data", disk_size_gb=20
                ),
            ),
            compute_v1.AttachedDisk(
                auto_delete=False,
                device_name="scratch",
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    disk_name="vm-new-scratch", disk_size_gb=10
                ),
            ),
        ],
    )
    op = gce.instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=instance)
    assert op.status == PENDING
    with pytest.raises(gexc.NotFound):
        gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-new")
    gce.done(op)
    vm = gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-new")
    assert [d.source.rsplit("/", 1)[1] for d in vm.disks] == [
        "restored-boot",
        "vm-new-1",
        "vm-new-scratch",
    ]
    assert vm.labels == {"rv-restored": "yes"}
    made = _disk(gce, "vm-new-1")
    assert made.size_gb == 20
    assert made.source_snapshot.endswith("/global/snapshots/snap-data")
    with gce.fake.disk_path("vm-new-1").open("rb") as f:
        assert f.read(10) == b"data-bytes"
    with pytest.raises(gexc.Conflict):
        gce.instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=instance)
    gce.done(gce.instances.delete_unary(project=PROJECT, zone=ZONE, instance="vm-new"))
    # auto-delete disks went with it, the other one stays and is free
    assert "restored-boot" not in gce.fake.disk_names()
    assert "vm-new-1" not in gce.fake.disk_names()
    assert not _disk(gce, "vm-new-scratch").users


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.disks[0].__setattr__("boot", False), "Boot disk must be the first"),
        (lambda i: i.__setattr__("network_interfaces", []), "networkInterfaces"),
        (lambda i: i.__setattr__("machine_type", "e2-standard-2"), "machineType"),
        (lambda i: i.__setattr__("name", "Bad_Name"), "name"),
        (lambda i: i.__setattr__("labels", {"rv": "A"}), "Label values"),
        (
            lambda i: i.disks[0].__setattr__("source", f"zones/{ZONE}/disks/missing"),
            "disks/missing",
        ),
        (
            lambda i: i.disks[0].__setattr__("source", "zones/us-east1-b/disks/vm-src-0"),
            "zone",
        ),
    ],
)
def test_insert_refuses_what_gce_refuses(gce: Gce, change: Any, message: str) -> None:
    gce.fake.seed_instance("vm-src", disks=[b"x"])
    gce.done(gce.instances.stop_unary(project=PROJECT, zone=ZONE, instance="vm-src"))
    gce.done(
        gce.instances.detach_disk_unary(
            project=PROJECT, zone=ZONE, instance="vm-src", device_name="persistent-disk-0"
        )
    )
    instance = compute_v1.Instance(
        name="vm-new",
        machine_type=f"zones/{ZONE}/machineTypes/e2-standard-2",
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
        disks=[compute_v1.AttachedDisk(boot=True, source=f"zones/{ZONE}/disks/vm-src-0")],
    )
    change(instance)
    with pytest.raises((gexc.BadRequest, gexc.NotFound), match=message):
        gce.instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=instance)
    assert "vm-new" not in gce.fake.instance_names()


def test_insert_refuses_a_disk_in_use(gce: Gce) -> None:
    gce.fake.seed_instance("vm-src", disks=[b"x"])
    instance = compute_v1.Instance(
        name="vm-new",
        machine_type=f"zones/{ZONE}/machineTypes/e2-standard-2",
        network_interfaces=[compute_v1.NetworkInterface()],
        disks=[compute_v1.AttachedDisk(boot=True, source=f"zones/{ZONE}/disks/vm-src-0")],
    )
    # GCE accepts the request; its operation fails
    op = gce.wait(
        gce.instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=instance)
    )
    assert [e.code for e in op.error.errors] == ["RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"]
    assert "already being used by" in op.error.errors[0].message
    assert op.http_error_status_code == 400
    assert "vm-new" not in gce.fake.instance_names()


def test_an_inserted_instance_goes_through_the_start_statuses(gce: Gce) -> None:
    gce.fake.start_statuses = ["PROVISIONING", "STAGING", "RUNNING"]
    gce.fake.seed_instance("vm-src", disks=[b"x"])
    _snapshot_of(gce, "vm-src-0", "snap")
    instance = compute_v1.Instance(
        name="vm-new",
        machine_type=f"zones/{ZONE}/machineTypes/e2-standard-2",
        network_interfaces=[compute_v1.NetworkInterface()],
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_snapshot="global/snapshots/snap"
                ),
            )
        ],
    )
    gce.done(gce.instances.insert_unary(project=PROJECT, zone=ZONE, instance_resource=instance))
    seen = [
        gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-new").status for _ in range(4)
    ]
    assert seen == ["PROVISIONING", "STAGING", "RUNNING", "RUNNING"]


def test_stop_and_start(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a")
    gce.done(gce.instances.stop_unary(project=PROJECT, zone=ZONE, instance="vm-a"))
    assert gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a").status == "TERMINATED"
    gce.done(gce.instances.start_unary(project=PROJECT, zone=ZONE, instance="vm-a"))
    assert gce.instances.get(project=PROJECT, zone=ZONE, instance="vm-a").status == "RUNNING"


# --------------------------------------------------------------------------- disks, snapshots


def test_blank_disks_are_sparse_and_at_least_10_gb(gce: Gce, tmp_path: Path) -> None:
    with pytest.raises(gexc.BadRequest, match="smaller than 10 GB"):
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="tiny", size_gb=1)
        )
    with pytest.raises(gexc.BadRequest, match="sizeGb"):
        gce.disks.insert_unary(project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d"))
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(
                name="blank",
                size_gb=10,
                type_=f"zones/{ZONE}/diskTypes/pd-balanced",
                labels={"rv-temp": "yes"},
            ),
        )
    )
    disk = _disk(gce, "blank")
    assert (disk.size_gb, disk.status, disk.labels) == (10, "READY", {"rv-temp": "yes"})
    assert disk.type_.endswith("/diskTypes/pd-balanced")
    path = gce.fake.disk_path("blank")
    assert path.stat().st_size == 10 * GiB
    assert _blocks(path) < 1 << 20
    names = [
        d.name
        for d in gce.disks.list(
            request={"project": PROJECT, "zone": ZONE, "filter": "labels.rv-temp:*"}
        )
    ]
    assert names == ["blank"]


def test_snapshots_hold_the_bytes_of_when_they_were_asked_for(gce: Gce, tmp_path: Path) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot", {0: b"first", 7 * GiB: b"far"}])
    snapshot = _snapshot_of(gce, "vm-a-1", "snap-1", rv="cap-1")
    assert (snapshot.disk_size_gb, snapshot.status) == (10, "READY")
    assert snapshot.source_disk.endswith("/disks/vm-a-1")
    assert snapshot.labels == {"rv": "cap-1"}
    with gce.fake.disk_path("vm-a-1").open("r+b") as f:
        f.write(b"later")
    data = gce.fake.snapshot_path("snap-1")
    with data.open("rb") as f:
        assert f.read(5) == b"first"
        f.seek(7 * GiB)
        assert f.read(3) == b"far"
    if _reports_holes(tmp_path):
        assert _blocks(data) < 64 << 20  # the holes stayed holes
        assert snapshot.storage_bytes < 64 << 20
    # a disk made from it: the snapshot's bytes, never smaller than the snapshot
    with pytest.raises(gexc.BadRequest, match="smaller than 10 GB"):
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(
                name="d", size_gb=5, source_snapshot="global/snapshots/snap-1"
            ),
        )
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(
                name="from-snap",
                source_snapshot=f"projects/{PROJECT}/global/snapshots/snap-1",
            ),
        )
    )
    disk = _disk(gce, "from-snap")
    assert disk.size_gb == 10
    assert disk.source_snapshot_id == str(snapshot.id)
    with gce.fake.disk_path("from-snap").open("rb") as f:
        assert f.read(5) == b"first"
    # list with a label filter, set labels with the fingerprint, delete (global operations)
    listed = gce.snapshots.list(request={"project": PROJECT, "filter": 'labels.rv = "cap-1"'})
    assert [s.name for s in listed] == ["snap-1"]
    op = gce.snapshots.set_labels_unary(
        project=PROJECT,
        resource="snap-1",
        global_set_labels_request_resource=compute_v1.GlobalSetLabelsRequest(
            labels={"rv": "kept"}, label_fingerprint=snapshot.label_fingerprint
        ),
    )
    assert not op.zone
    gce.done(op)
    assert gce.snapshots.get(project=PROJECT, snapshot="snap-1").labels == {"rv": "kept"}
    with pytest.raises(gexc.PreconditionFailed):
        gce.snapshots.set_labels_unary(
            project=PROJECT,
            resource="snap-1",
            global_set_labels_request_resource=compute_v1.GlobalSetLabelsRequest(
                labels={}, label_fingerprint=snapshot.label_fingerprint
            ),
        )
    gce.done(gce.snapshots.delete_unary(project=PROJECT, snapshot="snap-1"))
    assert not data.exists()
    with pytest.raises(gexc.NotFound, match="snapshots/snap-1"):
        gce.snapshots.get(project=PROJECT, snapshot="snap-1")
    # the disk made from it does not depend on it
    with gce.fake.disk_path("from-snap").open("rb") as f:
        assert f.read(5) == b"first"


def test_a_disk_from_a_snapshot_is_at_least_its_size(gce: Gce) -> None:
    gce.fake.seed_instance("vm-big", disks=[b"boot"], disk_size_gb=20)
    _snapshot_of(gce, "vm-big-0", "snap-big")
    with pytest.raises(gexc.BadRequest, match=r"smaller than the snapshot size \(20 GB\)"):
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(
                name="d", size_gb=15, source_snapshot="global/snapshots/snap-big"
            ),
        )
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(name="d", source_snapshot="global/snapshots/snap-big"),
        )
    )
    assert _disk(gce, "d").size_gb == 20


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    if not _reports_holes(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not report holes (SEEK_DATA)")
    source, target = tmp_path / "source", tmp_path / "target"
    with source.open("wb") as f:
        f.truncate(1 * GiB)
        for offset in (0, 100 << 20, GiB - 5):
            f.seek(offset)
            f.write(b"hello")
    assert copy_sparse(source, target, 2 * GiB) < 1 << 20
    assert target.stat().st_size == 2 * GiB
    assert _blocks(target) < 1 << 20
    with target.open("rb") as f:
        f.seek(100 << 20)
        assert f.read(5) == b"hello"
        f.seek(GiB - 5)
        assert f.read(5) == b"hello"


# --------------------------------------------------------------------------- attach, detach


def test_a_disk_attached_to_the_worker_appears_as_a_device_link(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot", b"payload"])
    _snapshot_of(gce, "vm-a-1", "snap-1")
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT,
            zone=ZONE,
            disk_resource=compute_v1.Disk(name="tmp-1", source_snapshot="global/snapshots/snap-1"),
        )
    )
    device = gce.fake.device_dir / "google-rv-cap-1"
    op = _attach(gce, gce.fake.worker_instance, "tmp-1", "rv-cap-1")
    assert not device.exists()  # not before the operation is done
    gce.done(op)
    assert device.is_symlink()
    assert device.resolve() == gce.fake.disk_path("tmp-1").resolve()
    with device.open("rb") as f:
        assert f.read(7) == b"payload"
    worker = gce.instances.get(project=PROJECT, zone=ZONE, instance=gce.fake.worker_instance)
    assert worker.disks[-1].device_name == "rv-cap-1"
    # the same device name twice, a disk in use elsewhere, deleting an attached disk: 400
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="tmp-2", size_gb=10)
        )
    )
    with pytest.raises(gexc.BadRequest, match="deviceName"):
        _attach(gce, gce.fake.worker_instance, "tmp-2", "rv-cap-1")
    in_use = gce.wait(_attach(gce, gce.fake.worker_instance, "vm-a-1", "rv-cap-2"))
    assert [e.code for e in in_use.error.errors] == ["RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"]
    assert not (gce.fake.device_dir / "google-rv-cap-2").exists()
    with pytest.raises(gexc.BadRequest, match="already being used by") as refused:
        gce.disks.delete_unary(project=PROJECT, zone=ZONE, disk="tmp-1")
    assert refused.value.errors[0]["reason"] == "resourceInUseByAnotherResource"
    # detach: the link goes when the operation is done, then the disk can be deleted
    with pytest.raises(gexc.BadRequest, match="deviceName"):
        gce.instances.detach_disk_unary(
            project=PROJECT, zone=ZONE, instance=gce.fake.worker_instance, device_name="nope"
        )
    gce.done(
        gce.instances.detach_disk_unary(
            project=PROJECT, zone=ZONE, instance=gce.fake.worker_instance, device_name="rv-cap-1"
        )
    )
    assert not device.exists() and not device.is_symlink()
    gce.done(gce.disks.delete_unary(project=PROJECT, zone=ZONE, disk="tmp-1"))
    assert "tmp-1" not in gce.fake.disk_names()


def test_the_boot_disk_of_a_running_instance_stays(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot"])
    with pytest.raises(gexc.BadRequest, match="boot disk"):
        gce.instances.detach_disk_unary(
            project=PROJECT, zone=ZONE, instance="vm-a", device_name="persistent-disk-0"
        )


def test_disks_of_other_instances_make_no_device_link(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot"])
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="extra", size_gb=10)
        )
    )
    gce.done(_attach(gce, "vm-a", "extra", "extra"))
    assert not (gce.fake.device_dir / "google-extra").exists()


def test_read_only_attachments_share_a_disk_and_a_write_is_found(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot"])
    gce.fake.seed_instance("vm-b", disks=[b"boot"])
    worker = gce.fake.worker_instance
    _blank(gce, "shared")
    gce.done(_attach(gce, worker, "shared", "ro-1", "READ_ONLY"))
    gce.done(_attach(gce, "vm-a", "shared", "ro-2", "READ_ONLY"))  # many readers: allowed
    in_use = gce.wait(_attach(gce, "vm-b", "shared", "rw-1"))  # a writer among readers
    assert [e.code for e in in_use.error.errors] == ["RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"]
    with pytest.raises(gexc.BadRequest, match="Disk already attached"):
        _attach(gce, worker, "shared", "ro-again", "READ_ONLY")
    with pytest.raises(gexc.BadRequest, match="READ_WRITE or READ_ONLY"):
        _attach(gce, worker, "shared", "x", "SHARED")
    assert len(_disk(gce, "shared").users) == 2
    device = gce.fake.device_dir / "google-ro-1"
    with device.open("rb") as f:
        assert f.read(4) == bytes(4)
    _detach(gce, "vm-a", "ro-2")
    _detach(gce, worker, "ro-1")
    assert gce.fake.read_only_writes == []
    # root may write through a read-only device; the fake tells on detach
    gce.done(_attach(gce, worker, "shared", "ro-3", "READ_ONLY"))
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            (gce.fake.device_dir / "google-ro-3").open("r+b")
        gce.fake.disk_path("shared").chmod(0o644)  # as root could
    with (gce.fake.device_dir / "google-ro-3").open("r+b") as f:
        f.write(b"oops")
    _detach(gce, worker, "ro-3")
    assert gce.fake.read_only_writes == [("shared", worker, "ro-3")]
    # a writer, then a reader: refused too
    gce.done(_attach(gce, worker, "shared", "rw-2"))
    in_use = gce.wait(_attach(gce, "vm-a", "shared", "ro-4", "READ_ONLY"))
    assert [e.code for e in in_use.error.errors] == ["RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"]


def test_the_device_link_may_come_after_the_attach(gce: Gce) -> None:
    import time

    worker = gce.fake.worker_instance
    _blank(gce, "late")
    gce.fake.device_link_delay = 3600.0
    gce.done(_attach(gce, worker, "late", "late-1"))
    assert not (gce.fake.device_dir / "google-late-1").exists()  # not for an hour
    _detach(gce, worker, "late-1")
    gce.fake.device_link_delay = 0.05
    gce.done(_attach(gce, worker, "late", "late-2"))
    device = gce.fake.device_dir / "google-late-2"
    for _ in range(1000):  # at most 10 s
        if device.exists():
            break
        time.sleep(0.01)
    assert device.resolve() == gce.fake.disk_path("late").resolve()


# --------------------------------------------------------------------------- operations


def test_operations_stay_running_for_the_configured_polls(gce: Gce) -> None:
    gce.fake.operation_polls = 3
    op = gce.disks.insert_unary(
        project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="slow", size_gb=10)
    )
    assert op.status == PENDING
    # every later request moves it on, a poll or not: GCE runs operations nobody polls
    assert gce.zone_ops.get(project=PROJECT, zone=ZONE, operation=op.name).status == RUNNING
    with pytest.raises(gexc.NotFound):
        _disk(gce, "slow")  # not made yet; the request is the second step
    op = gce.zone_ops.get(project=PROJECT, zone=ZONE, operation=op.name)
    assert op.status == DONE
    assert op.target_link.endswith("/disks/slow")
    assert op.operation_type == "insert"
    assert _disk(gce, "slow").size_gb == 10
    # a DONE operation stays DONE; an unknown one is 404; a zonal one is not global
    assert gce.zone_ops.wait(project=PROJECT, zone=ZONE, operation=op.name).status == DONE
    with pytest.raises(gexc.NotFound):
        gce.zone_ops.get(project=PROJECT, zone=ZONE, operation="operation-nope")
    with pytest.raises(gexc.NotFound):
        gce.global_ops.get(project=PROJECT, operation=op.name)
    # while an insert is pending its name is taken
    op = gce.disks.insert_unary(
        project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="slow-2", size_gb=10)
    )
    with pytest.raises(gexc.Conflict):
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="slow-2", size_gb=10)
        )
    gce.done(op)


def test_an_operation_nobody_polls_takes_effect_all_the_same(gce: Gce) -> None:
    """As on GCE: a client that never polls (it crashed, or gave up on an earlier error)
    does not stop an operation; requests of other methods move it on, :meth:`settle` ends
    it."""
    gce.fake.operation_polls = 2
    for name in ("a", "b"):
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name=name, size_gb=10)
        )
    # "a" took one step at the insert of "b", and takes its second now
    assert "a" in [d.name for d in gce.disks.list(project=PROJECT, zone=ZONE)]
    assert len(gce.fake.pending_operations()) == 1  # "b": one more step
    gce.fake.operation_polls = 50
    gce.disks.insert_unary(
        project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="c", size_gb=10)
    )
    # a disk being made cannot be deleted yet: 400 resourceNotReady, as GCE answers
    with pytest.raises(gexc.BadRequest, match="is not ready") as refused:
        gce.disks.delete_unary(project=PROJECT, zone=ZONE, disk="c")
    assert refused.value.reason == "resourceNotReady" or "resourceNotReady" in str(
        refused.value.errors
    )
    gce.fake.settle()
    assert gce.fake.pending_operations() == []
    assert "c" in gce.fake.disk_names()


def test_zero_polls_answers_done_at_once(gce: Gce) -> None:
    gce.fake.operation_polls = 0
    op = gce.disks.insert_unary(
        project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="fast", size_gb=10)
    )
    assert op.status == DONE
    assert _disk(gce, "fast").name == "fast"


def test_an_operation_can_end_in_an_error_and_change_nothing(gce: Gce) -> None:
    gce.fake.fail_next_operation("disks.insert", "QUOTA_EXCEEDED", status=403)
    op = gce.wait(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d1", size_gb=10)
        )
    )
    assert op.status == DONE
    assert [e.code for e in op.error.errors] == ["QUOTA_EXCEEDED"]
    assert op.http_error_status_code == 403
    assert "d1" not in gce.fake.disk_names()
    # the name is free again, and the next insert succeeds
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d1", size_gb=10)
        )
    )


def test_a_conflict_found_when_the_operation_ends_is_its_error(gce: Gce) -> None:
    gce.fake.seed_instance("vm-a", disks=[b"boot"])
    gce.done(
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d1", size_gb=10)
        )
    )
    first = _attach(gce, gce.fake.worker_instance, "d1", "dev-1")
    second = _attach(gce, "vm-a", "d1", "dev-1")  # both accepted: d1 was free at the time
    assert not gce.done(first).error.errors
    ended = gce.wait(second)
    assert [e.code for e in ended.error.errors] == ["RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"]
    assert _disk(gce, "d1").users[0].endswith(f"/instances/{gce.fake.worker_instance}")


def test_fail_next_answers_an_http_error_and_changes_nothing(gce: Gce) -> None:
    gce.fake.fail_next("compute.disks.insert", 503)
    with pytest.raises(gexc.ServiceUnavailable):
        gce.disks.insert_unary(
            project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d1", size_gb=10)
        )
    assert "d1" not in gce.fake.disk_names()
    gce.fake.fail_next("instances.list", 429, count=2, reason="rateLimitExceeded")
    for _ in range(2):
        with pytest.raises(gexc.TooManyRequests):
            gce.names()
    assert "rv-worker" in gce.names()
    assert gce.fake.counts["instances.list"] == 3
    assert gce.fake.counts["disks.insert"] == 1
    with pytest.raises(ValueError, match="no method"):
        gce.fake.fail_next("instances.frobnicate")


def test_a_repeated_request_id_gets_the_first_operation(gce: Gce) -> None:
    request = compute_v1.InsertDiskRequest(
        project=PROJECT,
        zone=ZONE,
        disk_resource=compute_v1.Disk(name="once", size_gb=10),
        request_id="6b1e5c6e-2f0c-4a8e-9d4b-0c1f3e2a9b7d",
    )
    first = gce.disks.insert_unary(request=request)
    again = gce.disks.insert_unary(request=request)
    assert again.name == first.name
    gce.done(again)
    assert gce.fake.disk_names().count("once") == 1


def test_a_lost_answer_leaves_the_effect_and_a_request_id_finds_it(gce: Gce) -> None:
    gce.fake.fail_next("disks.insert", 503, lose_answer=True)
    request = compute_v1.InsertDiskRequest(
        project=PROJECT,
        zone=ZONE,
        disk_resource=compute_v1.Disk(name="lost", size_gb=10),
        request_id="0d6f3c1a-3c53-4a55-8d0e-9e4f3a2b1c0d",
    )
    with pytest.raises(gexc.ServiceUnavailable):
        gce.disks.insert_unary(request=request)
    # the retry with the same requestId is the same operation, not a 409
    gce.done(gce.disks.insert_unary(request=request))
    assert _disk(gce, "lost").size_gb == 10
    inserts = [a for a in gce.fake.answers if a[0] == "disks.insert"]
    assert inserts == [("disks.insert", 503), ("disks.insert", 200)]
    with pytest.raises(ValueError, match="makes no operation"):
        gce.fake.fail_next_operation("instances.list")


def test_an_unserved_path_is_a_404_that_says_so(gce: Gce) -> None:
    images = compute_v1.ImagesClient(
        credentials=AnonymousCredentials(), client_options={"api_endpoint": gce.fake.endpoint}
    )
    try:
        with pytest.raises(gexc.NotFound, match="does not serve"):
            images.get(project=PROJECT, image="debian")
    finally:
        images.transport.close()
    assert gce.fake.answers[-1] == ("?", 404)


def test_seed_instance_over_the_api_writes_through_the_worker(gce: Gce) -> None:
    boot = b"\x7fELF" + bytes(4096) + b"tail"
    name = seed_instance_over_api(
        endpoint=gce.fake.endpoint,
        project=PROJECT,
        zone=ZONE,
        worker_instance=gce.fake.worker_instance,
        device_dir=gce.fake.device_dir,
        name="vm-seeded",
        disks=[boot, b"data disk"],
        labels={"rv-policy": "1-7"},
        machine_type="n2-standard-2",
    )
    vm = gce.instances.get(project=PROJECT, zone=ZONE, instance=name)
    assert vm.labels == {"rv-policy": "1-7"}
    assert vm.machine_type.endswith("/n2-standard-2")
    assert [(d.boot, d.source.rsplit("/", 1)[1]) for d in vm.disks] == [
        (True, "vm-seeded-0"),
        (False, "vm-seeded-1"),
    ]
    with gce.fake.disk_path("vm-seeded-0").open("rb") as f:
        assert f.read(len(boot)) == boot
    with gce.fake.disk_path("vm-seeded-1").open("rb") as f:
        assert f.read(9) == b"data disk"
    # the worker holds nothing of it any more
    assert sorted(p.name for p in gce.fake.device_dir.iterdir()) == ["google-persistent-disk-0"]
    # a failure removes the disks it made
    gce.fake.fail_next("instances.insert", 400, reason="invalid")
    with pytest.raises(gexc.BadRequest):
        seed_instance_over_api(
            endpoint=gce.fake.endpoint,
            project=PROJECT,
            zone=ZONE,
            worker_instance=gce.fake.worker_instance,
            device_dir=gce.fake.device_dir,
            name="vm-failed",
            disks=[b"x"],
        )
    assert not [d for d in gce.fake.disk_names() if d.startswith("vm-failed")]


def test_a_new_fake_removes_the_device_links_an_old_one_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "devices").mkdir(parents=True)
    (state / "devices" / "google-old").symlink_to(tmp_path / "gone")
    fake = GceFake(project=PROJECT, zone=ZONE, state_dir=state)
    assert sorted(p.name for p in fake.device_dir.iterdir()) == ["google-persistent-disk-0"]


def test_concurrent_clients_see_one_consistent_zone(gce: Gce) -> None:
    """Eight threads, each with its own clients, make, snapshot, attach, detach and delete
    disks at once: every operation succeeds, every device link was its own disk's."""
    from concurrent.futures import ThreadPoolExecutor

    def work(index: int) -> str:
        options = {"api_endpoint": gce.fake.endpoint}
        credentials = AnonymousCredentials()
        mine = Gce(
            gce.fake,
            compute_v1.InstancesClient(credentials=credentials, client_options=options),
            compute_v1.DisksClient(credentials=credentials, client_options=options),
            compute_v1.SnapshotsClient(credentials=credentials, client_options=options),
            compute_v1.ZoneOperationsClient(credentials=credentials, client_options=options),
            compute_v1.GlobalOperationsClient(credentials=credentials, client_options=options),
        )
        try:
            disk, device = f"par-{index}", f"dev-{index}"
            _blank(mine, disk)
            mine.done(_attach(mine, gce.fake.worker_instance, disk, device))
            with (gce.fake.device_dir / f"google-{device}").open("r+b") as f:
                f.write(disk.encode())
            _detach(mine, gce.fake.worker_instance, device)
            _snapshot_of(mine, disk, f"snap-{index}")
            mine.done(mine.disks.delete_unary(project=PROJECT, zone=ZONE, disk=disk))
            mine.names()
            with gce.fake.snapshot_path(f"snap-{index}").open("rb") as f:
                return f.read(len(disk)).decode()
        finally:
            for client in (mine.instances, mine.disks, mine.snapshots):
                client.transport.close()
            mine.zone_ops.transport.close()
            mine.global_ops.transport.close()

    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(work, range(8)))
    assert read == [f"par-{i}" for i in range(8)]
    assert gce.fake.snapshot_names() == sorted(f"snap-{i}" for i in range(8))
    assert not [d for d in gce.fake.disk_names() if d.startswith("par-")]
    assert sorted(p.name for p in gce.fake.device_dir.iterdir()) == ["google-persistent-disk-0"]
    assert not [status for _m, status in gce.fake.answers if status >= 400]


def test_compute_settings_are_a_valid_region(gce: Gce, tmp_path: Path) -> None:
    from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
    from regionvault.providers.gcp.auth import credentials_for
    from regionvault.providers.gcp.settings import GcpSettings

    values = gce.fake.compute_settings()
    region = RegionConfig(
        id=RegionId.parse("gcp:east"),
        settings=values,
        services={"compute": ServiceConfig("gcp", values)},
        base_dir=tmp_path,
        source="site.toml",
    )
    settings = GcpSettings.from_region(region)
    assert (settings.zone, settings.location) == (ZONE, "europe-west1")
    assert settings.compute_endpoint == gce.fake.endpoint
    assert settings.device_dir == str(gce.fake.device_dir)
    assert type(credentials_for(region, settings, "compute")).__name__ == "AnonymousCredentials"


# --------------------------------------------------------------------------- as a process


def test_runs_as_a_process_until_sigterm(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "regionvault.providers.gcp.fakes.compute",
            "--project",
            PROJECT,
            "--zone",
            ZONE,
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        client = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        names = [i.name for i in client.list(project=PROJECT, zone=ZONE)]
        client.transport.close()
        assert names == ["rv-worker"]
        assert (tmp_path / "state" / "devices" / "google-persistent-disk-0").is_symlink()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()


def test_an_unknown_machine_type_is_refused(gce: Gce) -> None:
    """GCE refuses a machine type its zone does not have; the fake knows the predefined
    families and custom types, or only :attr:`GceFake.machine_types` when set."""
    gce.fake.seed_instance("vm-src", disks=[b"boot"])
    _snapshot_of(gce, "vm-src-0", "snap-boot")

    def launch(name: str, machine_type: str) -> compute_v1.Operation:
        return gce.instances.insert_unary(
            project=PROJECT,
            zone=ZONE,
            instance_resource=compute_v1.Instance(
                name=name,
                machine_type=f"zones/{ZONE}/machineTypes/{machine_type}",
                network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")],
                disks=[
                    compute_v1.AttachedDisk(
                        boot=True,
                        initialize_params=compute_v1.AttachedDiskInitializeParams(
                            source_snapshot="global/snapshots/snap-boot"
                        ),
                    )
                ],
            ),
        )

    with pytest.raises(gexc.BadRequest, match="'n2-highmem-4x' does not exist in zone"):
        launch("vm-a", "n2-highmem-4x")
    gce.done(launch("vm-b", "custom-4-16384"))
    gce.fake.machine_types = {"e2-standard-2"}
    with pytest.raises(gexc.BadRequest, match="'n2-highmem-4' does not exist in zone"):
        launch("vm-c", "n2-highmem-4")
    gce.done(launch("vm-d", "e2-standard-2"))
    assert gce.fake.instance_names() == ["rv-worker", "vm-b", "vm-d", "vm-src"]
