"""What a launch could not carry over of the source instance (``Instance.not_carried``, set
by the compute's ``launch``) reaches the user: ``RestoreResult.not_carried``, warning lines
on standard error and ``not_carried`` in ``restore --launch --json``, and the restore event
in the region's event log. The local provider carries everything it knows, so its launch is
wrapped here to report what a cloud's would (tests/aws/test_aws_whole_instance.py shows the
AWS provider's own lines)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok
from regionvault.core.site import Site

LINES = (
    "key pair ops: none of that name in local:east",
    "security group vdu-oam (sg-0a1b): no group tagged regionvault:security-group=vdu-oam",
)


def test_what_was_not_carried_over_is_said_and_recorded(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.providers.local.compute import LocalCompute

    data = workdir / "nf-data"
    data.mkdir()
    (data / "subscribers.db").write_bytes(b"imsi 001010000000001\n" * 100)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = ok("backup", "nf1").stdout.strip().splitlines()[-1]
    launch = LocalCompute.launch

    def launch_listing(self: LocalCompute, spec: Any, sink: Any) -> Any:
        return dataclasses.replace(launch(self, spec, sink), not_carried=LINES)

    monkeypatch.setattr(LocalCompute, "launch", launch_listing)
    result = ok("restore", point, "--region", "east", "--launch", "--json")
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    assert report["not_carried"] == list(LINES)
    warnings = [line for line in result.stderr.splitlines() if "not carried over" in line]
    assert warnings == [f"regionvault: warning: not carried over: {line}" for line in LINES]

    site = Site.load(workdir / "site.toml")
    try:
        from regionvault.core.pipeline import Engine

        engine = Engine(site)
        events = [e for e in engine.repository("local:east").events() if e.action == "restore"]
        assert events[-1].detail["not_carried"] == list(LINES)
        site.region("east").compute.terminate(report["instance"])
    finally:
        site.close()

    # a launch that carried everything says nothing of it
    monkeypatch.setattr(LocalCompute, "launch", launch)
    again = ok("restore", point, "--region", "east", "--launch", "--json")
    assert json.loads(again.stdout)["not_carried"] == []
    assert "not carried over" not in again.stderr
    site = Site.load(workdir / "site.toml")
    try:
        site.region("east").compute.terminate(json.loads(again.stdout)["instance"])
    finally:
        site.close()


def test_launch_facts_a_compute_does_not_apply_are_listed_by_name(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A point whose capture recorded AWS launch facts, launched by a compute that applies
    none (local here; azure, gcp, openstack alike): the facts are listed, never a value."""
    import base64

    from regionvault.providers.local.compute import LocalFileCapture

    secret = b"#!/bin/sh\nexport TOKEN=s3cr3t-0123456789"
    facts: dict[str, Any] = {
        "aws": 1,
        "key_name": "ops-key",
        "security_groups": [{"id": "sg-1", "name": "vdu"}],
        "user_data": base64.b64encode(secret).decode(),
    }
    monkeypatch.setattr(LocalFileCapture, "launch_facts", lambda self: facts, raising=False)
    data = workdir / "nf-data"
    data.mkdir()
    (data / "db").write_bytes(b"x" * 1000)
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = ok("backup", "nf1").stdout.strip().splitlines()[-1]
    result = ok("restore", point, "--region", "east", "--launch", "--json")
    report = json.loads(result.stdout)
    assert report["not_carried"] == [
        "launch facts recorded by aws at capture (key_name, security_groups, user_data): "
        "not applied by local"
    ]
    assert "not applied by local" in result.stderr
    for value in ("ops-key", "sg-1", facts["user_data"], "s3cr3t"):
        assert value not in result.stdout and value not in result.stderr
    site = Site.load(workdir / "site.toml")
    try:
        site.region("east").compute.terminate(report["instance"])
    finally:
        site.close()
