"""docs/aws.md's IAM policy documents against what the AWS provider really sends (issue #22
item 4): no IAM evaluator, a static reading of the documents and one recorded run on moto.

- Every fenced ``json`` block of the "Least-privilege IAM" section parses and carries a marker
  (``<!-- iam: backup-role us-east-1 -->``, ``admin-role``, ``key-policy-statement``).
- The whole pipeline runs on moto as the backup role would (``create = false``): tag,
  schedule, backup, copy, retention, restore and launch, status, verify, a legal hold and
  its release, terminate, forget, prune. Every API operation the provider's clients send is
  recorded (botocore's ``before-parameter-build`` event, on the clients the provider's
  metrics hook), mapped to its IAM action (EC2, EBS and KMS by name; S3 by a table that sees
  ``VersionId`` and lock parameters), and must be allowed by an action of the backup role
  (its wildcards only where the document writes them).
- The administrator's first run (``create = true``: buckets, key, alias) and ``rotate-keys``
  are recorded apart: their operations must be in the admin policy, and those the pipeline
  never sends (CreateKey, UpdateAlias, ...) must not be in the backup role.
- No statement allows Decrypt, ReEncrypt or GenerateDataKey on a key outside the role's own
  region; every statement allowing a destructive EC2/EBS action carries a resource-tag
  condition.
- The tag conditions hold for the run: each instance, image, snapshot the provider launched,
  registered, wrote, tagged or destroyed, as it was just before the call (read with a raw
  client) and with the tags the request asked, meets the ``aws:ResourceTag``,
  ``aws:RequestTag`` and ``aws:TagKeys`` conditions of a statement that allows the call on
  that type of resource. (Conditions on other keys are AWS's to evaluate.)
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY, slot_of
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.metrics import AwsMetrics
from regionvault.providers.aws.testing import live_mode, mixed_disk_blocks, seed_snapshot

pytestmark = pytest.mark.skipif(
    live_mode(), reason="moto only: it launches and terminates instances"
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "aws.md"
SECTION = "## Least-privilege IAM"
MARKER = re.compile(r"<!--\s*iam:\s*(?P<kind>[a-z-]+)(?:\s+(?P<region>[a-z0-9-]+))?\s*-->")
KINDS = {"backup-role", "admin-role", "key-policy-statement"}
A, B = f"aws:{EAST}", f"aws:{WEST}"

#: S3 operations -> IAM actions (S3's action names differ from its operation names); an
#: operation missing here fails the test, naming it
S3_ACTIONS: Mapping[str, str] = {
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "ListObjectVersions": "s3:ListBucketVersions",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "ListParts": "s3:ListMultipartUploadParts",
    "GetBucketVersioning": "s3:GetBucketVersioning",
    "PutBucketVersioning": "s3:PutBucketVersioning",
    "GetObjectLockConfiguration": "s3:GetBucketObjectLockConfiguration",
    "PutObjectLockConfiguration": "s3:PutBucketObjectLockConfiguration",
    "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
    "GetBucketLocation": "s3:GetBucketLocation",
    "CreateBucket": "s3:CreateBucket",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "GetObjectRetention": "s3:GetObjectRetention",
    "PutObjectRetention": "s3:PutObjectRetention",
    "GetObjectLegalHold": "s3:GetObjectLegalHold",
    "PutObjectLegalHold": "s3:PutObjectLegalHold",
    "GetObjectTagging": "s3:GetObjectTagging",
}
#: the same operations on one version of an object
S3_VERSION_ACTIONS: Mapping[str, str] = {
    "GetObject": "s3:GetObjectVersion",
    "HeadObject": "s3:GetObjectVersion",
    "DeleteObject": "s3:DeleteObjectVersion",
    "GetObjectTagging": "s3:GetObjectVersionTagging",
}
#: operations that need no permission
FREE = {("sts", "GetCallerIdentity")}
#: the operations that destroy what the provider made: their statements need a tag condition
DESTRUCTIVE = {
    "ec2:TerminateInstances",
    "ec2:DeleteSnapshot",
    "ec2:DeregisterImage",
    "ec2:DeleteVolume",
    "ec2:DetachVolume",
}
#: the KMS actions that open or make data keys: only on the role's own region's key
KEY_USE = (
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
)
#: what rotate-keys reads that the backup role reads too, though not in this run: the chain
#: of a rotated key's predecessors (providers/aws/kms.py, ``_previous_keys``)
BACKUP_READS = {"kms:ListResourceTags"}
#: what only an administrator does (rotate-keys, create = true)
ADMIN_ONLY = (
    "kms:CreateKey",
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:PutKeyPolicy",
    "s3:CreateBucket",
    "s3:PutBucketPolicy",
    "s3:BypassGovernanceRetention",
)


# --------------------------------------------------------------------------- the documents


@dataclass(frozen=True)
class PolicyDoc:
    kind: str
    region: str | None
    line: int
    document: Mapping[str, Any]

    @property
    def statements(self) -> list[Mapping[str, Any]]:
        found = self.document.get("Statement", self.document)
        return list(found) if isinstance(found, list) else [found]

    def allows(self) -> list[Mapping[str, Any]]:
        return [s for s in self.statements if s.get("Effect") == "Allow"]

    def allowing(self, action: str) -> list[Mapping[str, Any]]:
        """The Allow statements with an action pattern that matches ``action`` (IAM action
        names are case-insensitive; ``*`` and ``?`` as IAM reads them)."""
        return [
            s
            for s in self.allows()
            if any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in _list(s.get("Action")))
        ]

    def denies(self, action: str) -> bool:
        return any(
            s.get("Effect") == "Deny"
            and any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in _list(s.get("Action")))
            and "Condition" not in s
            for s in self.statements
        )


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def iam_documents(text: str) -> list[PolicyDoc]:
    """Every fenced json block of the IAM section, with the marker on the line before it."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    first_line = text[:start].count("\n") + 1
    lines = section.splitlines()
    docs: list[PolicyDoc] = []
    for n, line in enumerate(lines):
        if line.strip() != "```json":
            continue
        where = first_line + n
        before = next((lines[i] for i in range(n - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.fullmatch(before.strip())
        assert marker, f"docs/aws.md line {where}: a json block without an <!-- iam: ... --> marker"
        assert marker["kind"] in KINDS, f"docs/aws.md line {where}: unknown kind {marker['kind']}"
        close = next(i for i in range(n + 1, len(lines)) if lines[i].strip() == "```")
        body = "\n".join(lines[n + 1 : close])
        try:
            document = json.loads(body)
        except json.JSONDecodeError as exc:
            pytest.fail(f"docs/aws.md line {where + exc.lineno}: not JSON: {exc.msg}")
        docs.append(PolicyDoc(marker["kind"], marker["region"], where, document))
    return docs


@pytest.fixture(scope="module")
def documents() -> dict[str, PolicyDoc]:
    docs = iam_documents(DOC.read_text(encoding="utf-8"))
    kinds = [d.kind for d in docs]
    for kind in ("backup-role", "admin-role"):
        assert kinds.count(kind) == 1, f"docs/aws.md: {kinds.count(kind)} {kind} documents"
    return {d.kind: d for d in docs if d.kind != "key-policy-statement"}


def test_every_policy_document_parses_and_is_marked(documents: dict[str, PolicyDoc]) -> None:
    for doc in documents.values():
        assert doc.region, f"docs/aws.md line {doc.line}: {doc.kind} names no region"
        assert doc.document.get("Version") == "2012-10-17", doc.kind
        for statement in doc.statements:
            assert statement.get("Effect") in ("Allow", "Deny"), (doc.kind, statement)
            assert _list(statement.get("Action")), (doc.kind, statement.get("Sid"))
            assert _list(statement.get("Resource")), (doc.kind, statement.get("Sid"))
        sids = [s.get("Sid") for s in doc.statements]
        assert len(sids) == len(set(sids)), f"{doc.kind}: Sids repeat"


def test_data_keys_only_under_the_roles_own_region(documents: dict[str, PolicyDoc]) -> None:
    for doc in documents.values():
        own = f"arn:aws:kms:{doc.region}:"
        for action in KEY_USE:
            for statement in doc.allowing(action):
                resources = _list(statement.get("Resource"))
                strays = [r for r in resources if not r.startswith(own)]
                assert not strays, (
                    f"{doc.kind} statement {statement.get('Sid')} allows {action} on "
                    f"{strays}: only {doc.region}'s keys may open or make data keys"
                )
                assert "NotResource" not in statement, (doc.kind, statement.get("Sid"))


def test_destructive_actions_are_limited_by_a_resource_tag(
    documents: dict[str, PolicyDoc],
) -> None:
    backup = documents["backup-role"]
    for action in sorted(DESTRUCTIVE):
        for statement in backup.allowing(action):
            assert _resource_tag_conditions(statement), (
                f"backup-role statement {statement.get('Sid')} allows {action} without an "
                "aws:ResourceTag condition on what the provider made"
            )


def _resource_tag_conditions(statement: Mapping[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(operator, tag key, values) of the statement's aws:ResourceTag conditions."""
    out: list[tuple[str, str, list[str]]] = []
    for operator, tests in (statement.get("Condition") or {}).items():
        for key, values in tests.items():
            if key.lower().startswith(("aws:resourcetag/", "ec2:resourcetag/")):
                out.append((operator, key.split("/", 1)[1], _list(values)))
    return out


def _matches(operator: str, value: str | None, wanted: list[str]) -> bool:
    if operator == "Null":
        return all((w == "false") == (value is not None) for w in wanted)
    if value is None:
        return False
    if operator == "StringEquals":
        return value in wanted
    if operator == "StringLike":
        return any(fnmatch.fnmatchcase(value, w) for w in wanted)
    pytest.fail(f"condition operator {operator} not understood by this test")


def _conditions_hold(statement: Mapping[str, Any], target: Target) -> bool:
    """Whether the statement's tag conditions hold for one resource of a call: its tags
    (``aws:ResourceTag``), the request's tags (``aws:RequestTag``, ``aws:TagKeys``) and the
    creating action (``ec2:CreateAction``); other condition keys (region, KMS, S3) are not
    about tags and are left to AWS."""
    for operator, tests in (statement.get("Condition") or {}).items():
        for key, values in tests.items():
            wanted, name = _list(values), key.lower()
            if name.startswith(("aws:resourcetag/", "ec2:resourcetag/")):
                tag = key.split("/", 1)[1]
                value = None if target.tags is None else target.tags.get(tag)
                if not _matches(operator, value, wanted):
                    return False
            elif name.startswith("aws:requesttag/"):
                value = target.request_tags.get(key.split("/", 1)[1])
                if not _matches(operator, value, wanted):
                    return False
            elif name == "aws:tagkeys":
                assert operator == "ForAllValues:StringLike", (statement.get("Sid"), operator)
                if not all(_matches("StringLike", k, wanted) for k in target.request_tags):
                    return False
            elif name == "ec2:createaction":
                return False  # the calls checked here are never a tag-on-create
    return True


def _covers(statement: Mapping[str, Any], kind: str) -> bool:
    """Whether one of the statement's resources is of this EC2 resource type."""
    return any(r == "*" or f":{kind}/" in r for r in _list(statement.get("Resource")))


# --------------------------------------------------------------------------- the recording


@dataclass(frozen=True)
class Target:
    """One EC2 resource a call acts on or creates: its type, its tags just before the call
    (None when the call creates it) and the tags the request puts on it."""

    kind: str
    tags: Mapping[str, str] | None
    request_tags: Mapping[str, str] = field(default_factory=dict)


_KINDS = {"i-": "instance", "ami-": "image", "snap-": "snapshot", "vol-": "volume"}


@dataclass(frozen=True)
class Call:
    phase: str
    region: str
    service: str
    operation: str
    params: Mapping[str, Any]
    #: the EC2 resources whose tags the backup role's conditions look at
    targets: tuple[Target, ...] = ()

    def actions(self) -> list[str]:
        """The IAM actions this call needs."""
        if self.service in ("ec2", "ebs", "kms", "sts", "iam"):
            return [f"{self.service}:{self.operation}"]
        assert self.service == "s3", f"no IAM mapping for service {self.service}"
        p = self.params
        versioned = bool(p.get("VersionId")) or any(
            o.get("VersionId") for o in (p.get("Delete") or {}).get("Objects", [])
        )
        action = S3_VERSION_ACTIONS.get(self.operation) if versioned else None
        action = action or S3_ACTIONS.get(self.operation)
        assert action, f"no IAM action known for s3.{self.operation}: add it to S3_ACTIONS"
        out = [action]
        if p.get("ObjectLockMode") or p.get("ObjectLockRetainUntilDate"):
            out.append("s3:PutObjectRetention")
        if p.get("ObjectLockLegalHoldStatus"):
            out.append("s3:PutObjectLegalHold")
        if p.get("BypassGovernanceRetention"):
            out.append("s3:BypassGovernanceRetention")
        return out

    def __str__(self) -> str:
        return f"{self.service}.{self.operation} in {self.region} ({self.phase})"


@dataclass
class Recorder:
    aws: AwsWorld
    phase: str = "setup"
    calls: list[Call] = field(default_factory=list)
    _snapshot_tags: dict[str, dict[str, str]] = field(default_factory=dict)

    def of(self, *phases: str) -> list[Call]:
        return [c for c in self.calls if c.phase in phases]

    def tags_of(self, region: str, resource_id: str) -> dict[str, str]:
        """A resource's tags now, read with a raw client (outside the recording)."""
        ec2 = self.aws.client("ec2", region)
        kind = next(k for prefix, k in _KINDS.items() if resource_id.startswith(prefix))
        if kind == "instance":
            (reservation,) = ec2.describe_instances(InstanceIds=[resource_id])["Reservations"]
            (found,) = reservation["Instances"]
        elif kind == "image":
            (found,) = ec2.describe_images(ImageIds=[resource_id])["Images"]
        elif kind == "snapshot":
            (found,) = ec2.describe_snapshots(SnapshotIds=[resource_id])["Snapshots"]
        else:
            (found,) = ec2.describe_volumes(VolumeIds=[resource_id])["Volumes"]
        return {t["Key"]: t["Value"] for t in found.get("Tags") or []}

    def targets(self, region: str, operation: str, p: Mapping[str, Any]) -> tuple[Target, ...]:
        """The resources of the calls whose statements carry tag conditions."""

        def spec_tags(kind: str) -> dict[str, str]:
            return {
                t["Key"]: t["Value"]
                for spec in p.get("TagSpecifications") or []
                if spec.get("ResourceType") == kind
                for t in spec.get("Tags") or []
            }

        def kind_of(resource_id: str) -> str:
            return next(k for prefix, k in _KINDS.items() if resource_id.startswith(prefix))

        if operation in ("TerminateInstances", "DeleteSnapshot", "DeregisterImage"):
            ids = p.get("InstanceIds") or [p.get("SnapshotId") or p.get("ImageId")]
            return tuple(Target(kind_of(i), self.tags_of(region, i)) for i in ids)
        if operation in ("DeleteVolume", "DetachVolume"):
            return (Target("volume", self.tags_of(region, p["VolumeId"])),)
        if operation == "RunInstances":
            image = Target("image", self.tags_of(region, p["ImageId"]))
            return (image, Target("instance", None, spec_tags("instance")))
        if operation in ("CreateSnapshot", "CreateSnapshots"):
            return (Target("snapshot", None, spec_tags("snapshot")),)
        if operation in ("CreateTags", "DeleteTags"):
            asked = {t["Key"]: t.get("Value", "") for t in p.get("Tags") or []}
            return tuple(Target(kind_of(r), None, asked) for r in p["Resources"])
        if operation == "StartSnapshot":
            asked = {t["Key"]: t["Value"] for t in p.get("Tags") or []}
            return (Target("snapshot", None, asked),)
        if operation in ("PutSnapshotBlock", "CompleteSnapshot"):
            snapshot = p["SnapshotId"]
            if snapshot not in self._snapshot_tags:
                self._snapshot_tags[snapshot] = self.tags_of(region, snapshot)
            return (Target("snapshot", self._snapshot_tags[snapshot]),)
        return ()


@pytest.fixture
def recorder(aws: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """Every API call of every client the provider makes (the clients its metrics count),
    with its parameters, labelled with the phase the test is in."""
    recorder = Recorder(aws)
    attach = AwsMetrics.attach

    def attach_and_record(self: AwsMetrics, client: Any, region: str) -> None:
        attach(self, client, region)
        service = str(client.meta.service_model.service_name)

        def on_call(params: Any = None, model: Any = None, **_: Any) -> None:
            operation = str(model.name)
            targets = ()
            if service in ("ec2", "ebs") and recorder.phase == "pipeline":
                targets = recorder.targets(region, operation, params or {})
            recorder.calls.append(
                Call(recorder.phase, region, service, operation, dict(params or {}), targets)
            )

        client.meta.events.register("before-parameter-build", on_call)

    monkeypatch.setattr(AwsMetrics, "attach", attach_and_record)
    yield recorder


def _site(aws: AwsWorld, tmp_path: Path, *, create: bool) -> Path:
    east, west = aws.settings(EAST, create=create), aws.settings(WEST, create=create)
    west["inbox_bucket"] = f"rv-test-{aws.tag}-{WEST}-inbox"
    doc = {
        "site": {"name": "iam", "state_dir": str(tmp_path / "state")},
        "regions": {A: east, B: west},
        "replication": [{"from": A, "to": B}],
    }
    path = tmp_path / ("admin.toml" if create else "site.toml")
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def _load(path: Path) -> Site:
    pm = make_plugin_manager()
    return Site.load(path, registry=registry_from(pm), plugin_manager=pm)


# --------------------------------------------------------------------------- the run


def test_every_operation_the_provider_sends_is_in_the_right_policy(
    aws: AwsWorld, tmp_path: Path, recorder: Recorder, documents: dict[str, PolicyDoc]
) -> None:
    backup_role, admin = documents["backup-role"], documents["admin-role"]
    assert (backup_role.region, admin.region) == (EAST, EAST)

    # the administrator's first run: create = true makes the buckets, the key and its alias
    recorder.phase = "setup"
    with _load(_site(aws, tmp_path, create=True)) as site:
        for name in (A, B):
            region = site.region(name)
            list(region.vault.list(""))
            assert region.keys.key_id
        list(site.transit(A, B).inbox())
        list(site.transit(B, A).inbox())
    assert any(c.operation == "CreateKey" for c in recorder.of("setup"))

    # outside the provider (not recorded): an instance whose root disk is a seeded snapshot
    disk = mixed_disk_blocks(2 * 1024 * 1024, seed=22)
    seeded = seed_snapshot(aws.client("ebs", EAST), disk, volume_size_gib=1)
    instance_id = aws.run_instance(
        EAST, {"Name": "vcu-1", CAPTURE_SNAPSHOT_TAG: seeded}, instance_type="m5.large"
    )

    # the backup role's run: create = false, everything the pipeline and the commands do
    recorder.phase = "pipeline"
    now = slot_of(datetime.now(UTC), timedelta(days=1)) + timedelta(hours=1)
    with _load(_site(aws, tmp_path, create=False)) as site:
        engine = Engine(site, clock=lambda: now)
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        backup = next(o for o in report.jobs if o.kind == BACKUP)
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        assert site.region(A).compute.get_instance(instance_id).tags["backup"] == "1-7"
        assert Service(engine).tick().ok  # nothing due: the listing and checks alone
        copy = engine.find_point(copy_job.result["copy"], B)
        result = engine.restore(copy.id, region=B, launch=True)
        assert result.instance is not None
        engine.status()
        assert engine.verify(A, read_data=True).ok
        assert engine.verify(B, read_data=True).ok
        engine.hold_point(copy.id, region=B)
        engine.release_point(copy.id, region=B)
        site.region(B).compute.terminate(result.instance.id)
        assert engine.forget(A, [backup.result["point"]]) == [backup.result["point"]]
        engine.prune(A)
        engine.retain(A)

    # the administrator rotates us-east-1's key
    recorder.phase = "rotate"
    with _load(_site(aws, tmp_path, create=False)) as site:
        Engine(site).rotate_keys(A)
    # the keys create = true and the rotation made carry the tag the admin's statements ask
    kms = aws.client("kms", EAST)
    keys = [k["KeyArn"] for k in kms.list_keys()["Keys"]]
    assert len(keys) == 2  # the first key and the rotation's
    for key in keys:
        tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key)["Tags"]}
        statements = admin.allowing("kms:GetKeyPolicy")
        assert any(_conditions_hold(s, Target("key", tags)) for s in statements), (key, tags)
    # and the backup role reads what was wrapped before and after the rotation
    recorder.phase = "pipeline"
    with _load(_site(aws, tmp_path, create=False)) as site:
        assert Engine(site, clock=lambda: now).verify(A, read_data=True).ok

    # ---- every call of the pipeline is allowed to the backup role
    pipeline = [c for c in recorder.of("pipeline") if (c.service, c.operation) not in FREE]
    assert {c.service for c in pipeline} >= {"ec2", "ebs", "kms", "s3"}
    missing = sorted(
        {
            f"{action} (for {call})"
            for call in pipeline
            for action in call.actions()
            if not backup_role.allowing(action) or backup_role.denies(action)
        }
    )
    assert not missing, "docs/aws.md's backup role lacks:\n" + "\n".join(missing)

    # ---- the administrator's calls are in the admin policy, and not in the backup role
    admin_calls = [
        c for c in recorder.of("setup", "rotate") if (c.service, c.operation) not in FREE
    ]
    assert any(c.operation == "UpdateAlias" for c in recorder.of("rotate"))
    missing = sorted(
        {f"{a} (for {c})" for c in admin_calls for a in c.actions() if not admin.allowing(a)}
    )
    assert not missing, "docs/aws.md's admin policy lacks:\n" + "\n".join(missing)
    needed = {a for c in pipeline for a in c.actions()}
    changes = {a for c in admin_calls for a in c.actions() if a not in needed | BACKUP_READS}
    admin_only = sorted(changes | set(ADMIN_ONLY))
    granted = [a for a in admin_only if backup_role.allowing(a)]
    assert not granted, f"the backup role allows what only the administrator does: {granted}"

    # ---- the tag conditions hold for every resource the run made, tagged or destroyed
    checked = [c for c in pipeline if c.targets]
    assert {c.operation for c in checked} >= {
        "TerminateInstances",
        "DeregisterImage",
        "DeleteSnapshot",
        "RunInstances",
        "CreateTags",
        "StartSnapshot",
        "PutSnapshotBlock",
    }
    for call in checked:
        (action,) = call.actions()
        for target in call.targets:
            statements = [s for s in backup_role.allowing(action) if _covers(s, target.kind)]
            assert any(_conditions_hold(s, target) for s in statements), (
                f"{call} on {target.kind} tagged {target.tags}, asking tags "
                f"{dict(target.request_tags)}: no tag condition of the backup role's "
                f"statements {[s.get('Sid') for s in statements]} allows it"
            )
