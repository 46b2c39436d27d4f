"""Compute on EC2: tag-filtered paged listings, tags, block captures of an instance's root
EBS volume read through the EBS direct APIs, and launches from restored snapshots.

Capture: the root volume is snapshotted (or an existing snapshot is used: the
``ex_snapshot_id`` option, or the instance's ``regionvault:capture-snapshot`` tag), then its
blocks are read with ListSnapshotBlocks / GetSnapshotBlock, each one checked against its
SHA-256 checksum. Restore: a new snapshot is written in the destination region with
StartSnapshot / PutSnapshotBlock / CompleteSnapshot; launch registers an image from it and
runs an instance of the original's type with the original's tags.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from regionvault.core.errors import ComputeError, InstanceNotFound, IntegrityError, RegionVaultError
from regionvault.core.interfaces import BlockCapture, BlockSink, Capture, Compute, RestoreSink
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    Disk,
    Instance,
    InstancePage,
    LaunchSpec,
    Tags,
)
from regionvault.providers.aws.errors import aws_error, error_code, error_message

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.settings import AwsSettings

__all__ = [
    "CAPTURE_SNAPSHOT_TAG",
    "EBS_BLOCK_SIZE",
    "INTERNAL_PREFIX",
    "NAME_TAG",
    "AwsBlockCapture",
    "AwsBlockSink",
    "AwsCompute",
]

#: the EBS direct APIs always read and write 512 KiB blocks (moto reports BlockSize 512,
#: which is the size in KiB; the block data it returns is 512 KiB)
EBS_BLOCK_SIZE = 512 * 1024
GiB = 1024**3
#: instance tags under this prefix belong to the provider: kept out of Instance.tags (so
#: tags read back equal tags set), refused by set_tags, never copied to a launched instance
INTERNAL_PREFIX = "regionvault:"
#: an instance tag naming an existing snapshot of its root volume to capture from
CAPTURE_SNAPSHOT_TAG = "regionvault:capture-snapshot"
#: the name an instance was launched or made under, when no Name tag should carry it
NAME_TAG = "regionvault:name"
#: on images and snapshots the provider made for a launch (cleaned up on terminate)
RESTORE_TAG = "regionvault:restore"
#: on such an image: the restored snapshot it was registered from
RESTORE_SNAPSHOT_TAG = "regionvault:restore-snapshot"
_LIVE_STATES = ["pending", "running", "stopping", "stopped"]
_GONE_STATES = frozenset({"shutting-down", "terminated"})
_NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
_MAX_PAGES = 10_000_000
#: an EC2 instance type: family, generation and options, a dot, a size (m5.large,
#: c7gn.16xlarge, u-6tb1.metal, mac2-m2pro.metal)
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _escape_filter(value: str) -> str:
    """EC2 filter values treat '*' and '?' as wildcards; a backslash makes them literal."""
    return re.sub(r"([*?\\])", r"\\\1", value)


_TOKEN_PREFIX = "rv1."


def _page_token(ec2_token: str | None, skip: int) -> str:
    doc = json.dumps({"t": ec2_token, "s": skip}, separators=(",", ":"))
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(doc.encode()).decode("ascii")


def _checksum(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


class AwsCompute(Compute):
    """One region's EC2 instances."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: AwsSettings,
        clients: ClientFactory,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(provider="aws", region=region.name, capabilities=capabilities)
        self.settings = settings
        self._clients = clients

    # ------------------------------------------------------------------ helpers

    @property
    def ec2(self) -> Any:
        return self._clients.client(self.settings, "ec2")

    @property
    def ebs(self) -> Any:
        return self._clients.client(self.settings, "ebs")

    def _error(
        self, exc: BaseException, what: str, instance_id: str | None = None
    ) -> RegionVaultError:
        if instance_id is not None and error_code(exc) in _NOT_FOUND:
            return InstanceNotFound(instance_id, provider="aws", region=self.region)
        return aws_error(exc, f"{what}: {error_message(exc)}", ComputeError, region=self.region)

    def _instance(self, raw: Mapping[str, Any]) -> Instance:
        every = {t["Key"]: t["Value"] for t in raw.get("Tags", []) or []}
        internal = {k: v for k, v in every.items() if k.startswith(INTERNAL_PREFIX)}
        tags = Tags({k: v for k, v in every.items() if not k.startswith(INTERNAL_PREFIX)})
        root_name = raw.get("RootDeviceName")
        volumes: dict[str, str] = {}
        for mapping in raw.get("BlockDeviceMappings", []) or []:
            volume = (mapping.get("Ebs") or {}).get("VolumeId")
            if volume:
                volumes[mapping.get("DeviceName", "")] = volume
        root_volume = volumes.get(root_name or "")
        extra: dict[str, Any] = {
            "instance_type": raw.get("InstanceType"),
            "image_id": raw.get("ImageId"),
            "architecture": raw.get("Architecture"),
            "root_device_name": root_name,
            "root_device_type": raw.get("RootDeviceType"),
            "root_volume_id": root_volume,
            "volumes": volumes,
            "availability_zone": (raw.get("Placement") or {}).get("AvailabilityZone"),
            "subnet_id": raw.get("SubnetId"),
            "vpc_id": raw.get("VpcId"),
            "launch_time": _utc(raw.get("LaunchTime")).isoformat(),
            "aws_region": self.settings.aws_region,
            "internal_tags": internal,
        }
        if CAPTURE_SNAPSHOT_TAG in internal:
            extra["capture_snapshot_id"] = internal[CAPTURE_SNAPSHOT_TAG]
        if raw.get("BootMode"):
            extra["boot_mode"] = raw["BootMode"]
        kinds = (
            frozenset({CaptureKind.BLOCKS})
            if root_volume or CAPTURE_SNAPSHOT_TAG in internal
            else frozenset()
        )
        return Instance(
            id=str(raw["InstanceId"]),
            name=internal.get(NAME_TAG) or tags.get("Name") or str(raw["InstanceId"]),
            region=self.region,
            tags=tags,
            state=str((raw.get("State") or {}).get("Name", "unknown")),
            function=raw.get("InstanceType"),
            capture_kinds=kinds,
            extra=extra,
        )

    def _describe(self, instance_id: str) -> Mapping[str, Any]:
        if not isinstance(instance_id, str) or not instance_id:
            raise InstanceNotFound(repr(instance_id), provider="aws", region=self.region)
        try:
            answer = self.ec2.describe_instances(InstanceIds=[instance_id])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot describe {instance_id}", instance_id) from None
        for reservation in answer.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                if raw.get("InstanceId") == instance_id:
                    if (raw.get("State") or {}).get("Name") in _GONE_STATES:
                        break
                    return dict(raw)
        raise InstanceNotFound(instance_id, provider="aws", region=self.region)

    @staticmethod
    def _check_tags(tags: Mapping[str, str], region: str) -> None:
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ComputeError(
                    f"tag {key!r}={value!r}: keys and values must be strings",
                    provider="aws",
                    region=region,
                )
            if not key or len(key) > 128 or len(value) > 256:
                raise ComputeError(
                    f"tag {key!r}: keys are 1-128 characters, values at most 256",
                    provider="aws",
                    region=region,
                )
            if key.lower().startswith("aws:") or key.startswith(INTERNAL_PREFIX):
                raise ComputeError(
                    f"tag {key!r}: the 'aws:' prefix is reserved by AWS",
                    provider="aws",
                    region=region,
                )

    # ------------------------------------------------------------------ listing and tags

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        """One DescribeInstances call per page, at most ``page_size`` instances a page.

        EC2 pages hold 5 to 1000 results (and moto counts reservations, not instances), so
        a page is cut to ``page_size`` and the token says where to go on: EC2's token for
        the same EC2 page plus how many of its instances were already returned.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ComputeError(
                f"page_size must be a positive integer, got {page_size!r}",
                provider="aws",
                region=self.region,
            )
        wanted = dict(tag_filters or {})
        filters: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": _LIVE_STATES}]
        for key, value in wanted.items():
            if (
                not isinstance(key, str)
                or not key
                or (value is not None and not isinstance(value, str))
            ):
                raise ComputeError(
                    f"bad tag filter {key!r}={value!r}", provider="aws", region=self.region
                )
            if value is None:
                filters.append({"Name": "tag-key", "Values": [_escape_filter(key)]})
            else:
                filters.append({"Name": f"tag:{key}", "Values": [_escape_filter(value)]})
        ec2_token, skip = self._parse_page_token(page_token)
        kwargs: dict[str, Any] = {"Filters": filters, "MaxResults": max(5, min(page_size, 1000))}
        if ec2_token:
            kwargs["NextToken"] = ec2_token
        try:
            answer = self.ec2.describe_instances(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot list instances") from None
        found: list[Instance] = []
        for reservation in answer.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                instance = self._instance(raw)
                # EC2 filters are already exact; this guards wildcard-escaping differences
                if instance.state not in _GONE_STATES and instance.tags.matches(wanted):
                    found.append(instance)
        page = found[skip : skip + page_size]
        if skip + page_size < len(found):
            next_token: str | None = _page_token(ec2_token, skip + page_size)
        else:
            following = answer.get("NextToken") or None
            next_token = _page_token(following, 0) if following else None
        return InstancePage(instances=tuple(page), next_token=next_token)

    def _parse_page_token(self, token: str | None) -> tuple[str | None, int]:
        if not token:
            return None, 0
        try:
            if not token.startswith(_TOKEN_PREFIX):
                raise ValueError("no prefix")
            doc = json.loads(base64.urlsafe_b64decode(token[len(_TOKEN_PREFIX) :].encode()))
            ec2_token, skip = doc["t"], int(doc["s"])
            if (ec2_token is not None and not isinstance(ec2_token, str)) or skip < 0:
                raise ValueError("bad fields")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ComputeError(
                f"bad page token {token[:40]!r}", provider="aws", region=self.region
            ) from None
        return ec2_token, skip

    def get_instance(self, instance_id: str) -> Instance:
        return self._instance(self._describe(instance_id))

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        self._check_tags(tags, self.region)
        if tags:
            try:
                self.ec2.create_tags(Resources=[instance_id], Tags=_tag_list(tags))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, f"cannot tag {instance_id}", instance_id) from None
        return self.get_instance(instance_id).tags

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        if not all(isinstance(k, str) and k for k in keys):
            raise ComputeError(f"bad tag keys {keys!r}", provider="aws", region=self.region)
        # provider tags are not the caller's to remove (nor visible to it: "absent")
        keys = [k for k in keys if not k.startswith(INTERNAL_PREFIX)]
        # DeleteTags with no keys would remove every tag: only call it with some
        if keys:
            try:
                self.ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": k} for k in keys])
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, f"cannot untag {instance_id}", instance_id) from None
        return self.get_instance(instance_id).tags

    # ------------------------------------------------------------------ capture

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
        ex_snapshot_id: str | None = None,
        ex_parent_snapshot_id: str | None = None,
        ex_keep_snapshot: bool = False,
    ) -> Capture:
        """A block capture of the instance's root EBS volume.

        ``ex_snapshot_id`` (or the instance tag ``regionvault:capture-snapshot``) reads an
        existing snapshot instead of taking one. ``ex_parent_snapshot_id`` names an earlier
        snapshot of the same volume, for :meth:`AwsBlockCapture.changed_blocks`. A snapshot
        the capture took itself is deleted on close unless ``ex_keep_snapshot``.
        """
        if kind not in (None, CaptureKind.BLOCKS):
            raise self.unsupported(f"capture(kind={kind})")
        raw = self._describe(instance_id)
        instance = self._instance(raw)
        snapshot_id = ex_snapshot_id or instance.extra.get("capture_snapshot_id")
        created = False
        if not snapshot_id:
            volume = instance.extra.get("root_volume_id")
            if not volume:
                raise ComputeError(
                    f"instance {instance_id} has no EBS root volume to capture",
                    provider="aws",
                    region=self.region,
                )
            try:
                snapshot_id = str(
                    self.ec2.create_snapshot(
                        VolumeId=volume,
                        Description=f"regionvault capture of {instance_id}",
                        TagSpecifications=[
                            {
                                "ResourceType": "snapshot",
                                "Tags": _tag_list(
                                    {"regionvault:instance": instance_id, "Name": instance.name}
                                ),
                            }
                        ],
                    )["SnapshotId"]
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(
                    exc, f"cannot snapshot volume {volume} of {instance_id}"
                ) from None
            created = True
        try:
            facts = self.wait_for_snapshot(snapshot_id)
        except BaseException:
            if created:
                self._delete_snapshot(snapshot_id)
            raise
        return AwsBlockCapture(
            instance,
            _utc(facts.get("StartTime")),
            size=int(facts.get("VolumeSize", 1)) * GiB,
            compute=self,
            snapshot_id=snapshot_id,
            parent_snapshot_id=ex_parent_snapshot_id,
            delete_on_close=created and not ex_keep_snapshot,
        )

    def wait_for_snapshot(self, snapshot_id: str) -> Mapping[str, Any]:
        """Wait (at most ``snapshot_timeout`` seconds) until the snapshot is completed."""
        deadline = time.monotonic() + self.settings.snapshot_timeout
        delay = 0.5
        while True:
            try:
                found = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id]).get("Snapshots", [])
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, f"cannot describe snapshot {snapshot_id}") from None
            if not found:
                raise ComputeError(
                    f"snapshot {snapshot_id} not found", provider="aws", region=self.region
                )
            state = found[0].get("State")
            if state == "completed":
                return dict(found[0])
            if state in ("error", "recoverable"):
                why = found[0].get("StateMessage", "")
                raise ComputeError(
                    f"snapshot {snapshot_id} is in state {state}: {why}",
                    provider="aws",
                    region=self.region,
                )
            if time.monotonic() + delay > deadline:
                raise ComputeError(
                    f"snapshot {snapshot_id} not completed after {self.settings.snapshot_timeout}s "
                    f"(state {state})",
                    provider="aws",
                    region=self.region,
                )
            time.sleep(delay)
            delay = min(delay * 2, 15.0)

    def _delete_snapshot(self, snapshot_id: str) -> None:
        try:
            self.ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc) != "InvalidSnapshot.NotFound":
                raise self._error(exc, f"cannot delete snapshot {snapshot_id}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"cannot delete snapshot {snapshot_id}") from None

    # ------------------------------------------------------------------ restore and launch

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        if kind is not CaptureKind.BLOCKS:
            raise self.unsupported(f"open_restore_sink(kind={kind})")
        if disks is not None and len(disks) > 1:
            raise self.unsupported(f"a restore of {len(disks)} disks")
        if not isinstance(size, int) or size <= 0:
            raise ComputeError(
                f"a block restore needs the disk size in bytes, got {size!r}",
                provider="aws",
                region=self.region,
            )
        return AwsBlockSink(self, spec, size)

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        if not isinstance(sink, AwsBlockSink) or sink.compute is not self:
            raise ComputeError(
                "launch needs a sink made by this region's open_restore_sink",
                provider="aws",
                region=self.region,
            )
        if sink.discarded:
            raise ComputeError(
                f"snapshot {sink.snapshot_id} was discarded: restore again to launch",
                provider="aws",
                region=self.region,
            )
        if not sink.committed:
            raise ComputeError(
                f"snapshot {sink.snapshot_id} is not committed yet",
                provider="aws",
                region=self.region,
            )
        source = spec.source
        source_extra: Mapping[str, Any] = source.extra if source is not None else {}
        # a recovery point made by this provider records the instance type as its function
        # (Instance.function), so a restore from the point alone launches the same type
        function_type = (
            spec.function
            if spec.function is not None and _INSTANCE_TYPE.match(spec.function)
            else None
        )
        instance_type = (
            spec.extra.get("instance_type")
            or source_extra.get("instance_type")
            or function_type
            or self.settings.instance_type
        )
        if not instance_type:
            raise ComputeError(
                f"launch {spec.name!r}: no instance type (give spec.extra['instance_type'], a "
                "source instance, a function naming an EC2 instance type, or the region's "
                "instance_type setting)",
                provider="aws",
                region=self.region,
            )
        root_device = (
            spec.extra.get("root_device_name")
            or source_extra.get("root_device_name")
            or "/dev/xvda"
        )
        architecture = (
            spec.extra.get("architecture")
            or source_extra.get("architecture")
            or self._architecture_of(str(instance_type))
        )
        base = dict(spec.tags) if spec.tags else (dict(source.tags) if source is not None else {})
        tags = {
            k: v
            for k, v in base.items()
            if not k.lower().startswith("aws:") and not k.startswith(INTERNAL_PREFIX)
        }
        self._check_tags(tags, self.region)
        # the launched instance's tags are exactly these; its name rides on a provider tag
        internal = {NAME_TAG: spec.name}
        if self.settings.capture_launched_from_snapshot:
            internal[CAPTURE_SNAPSHOT_TAG] = sink.snapshot_id
        label = re.sub(r"[^A-Za-z0-9()\[\] ./'@_-]", "-", spec.name)[:80]
        image_kwargs: dict[str, Any] = {
            "Name": f"regionvault-{label}-{uuid.uuid4().hex[:12]}",
            "Description": f"regionvault restore of {spec.name}",
            "Architecture": architecture,
            "RootDeviceName": root_device,
            "BlockDeviceMappings": [
                {
                    "DeviceName": root_device,
                    "Ebs": {
                        "SnapshotId": sink.snapshot_id,
                        "DeleteOnTermination": True,
                        "VolumeType": "gp3",
                    },
                }
            ],
            "VirtualizationType": "hvm",
            "EnaSupport": True,
        }
        boot_mode = spec.extra.get("boot_mode") or source_extra.get("boot_mode")
        if boot_mode:
            image_kwargs["BootMode"] = boot_mode
        try:
            image_id = str(self.ec2.register_image(**image_kwargs)["ImageId"])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot register an image from {sink.snapshot_id}") from None
        sink.image_id = image_id  # a failed launch's discard deregisters it
        try:
            # tagged apart from RegisterImage: moto ignores RegisterImage's TagSpecifications
            self.ec2.create_tags(
                Resources=[image_id],
                Tags=_tag_list({RESTORE_TAG: spec.name, RESTORE_SNAPSHOT_TAG: sink.snapshot_id}),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot tag image {image_id}") from None
        run_kwargs: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": uuid.uuid4().hex,
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": _tag_list({**tags, **internal})}
            ],
        }
        subnet = spec.extra.get("subnet_id") or self.settings.subnet_id
        if subnet:
            run_kwargs["SubnetId"] = subnet
        groups = spec.extra.get("security_group_ids") or list(self.settings.security_group_ids)
        if groups:
            run_kwargs["SecurityGroupIds"] = list(groups)
        try:
            answer = self.ec2.run_instances(**run_kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot run an instance from image {image_id}") from None
        raw = dict(answer["Instances"][0])
        # from here the image and snapshot belong to the instance: terminate removes them
        sink.launched_instance_id = str(raw.get("InstanceId") or "") or None
        if not raw.get("Tags"):
            raw["Tags"] = _tag_list({**tags, **internal})
        return self._instance(raw)

    def _architecture_of(self, instance_type: str) -> str:
        """The image architecture an instance type runs (DescribeInstanceTypes): arm64 for
        Graviton types, else x86_64, which is also the answer when EC2 cannot say."""
        try:
            answer = self.ec2.describe_instance_types(InstanceTypes=[instance_type])
            found = answer.get("InstanceTypes") or [{}]
            supported = (found[0].get("ProcessorInfo") or {}).get("SupportedArchitectures") or []
        except (ClientError, BotoCoreError):
            return "x86_64"
        if "x86_64" not in supported and "arm64" in supported:
            return "arm64"
        return "x86_64"

    def terminate(self, instance_id: str) -> None:
        """Terminate the instance; an image (and its snapshot) that :meth:`launch` made for
        it is deregistered and deleted too, so drills leave nothing behind."""
        raw = self._describe(instance_id)
        try:
            self.ec2.terminate_instances(InstanceIds=[instance_id])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot terminate {instance_id}", instance_id) from None
        image_id = raw.get("ImageId")
        if not image_id:
            return
        try:
            images = self.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
        except ClientError as exc:
            if error_code(exc).startswith("InvalidAMIID"):
                return
            raise self._error(exc, f"cannot describe image {image_id}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"cannot describe image {image_id}") from None
        for image in images:
            tags = {t["Key"]: t["Value"] for t in image.get("Tags", []) or []}
            if RESTORE_TAG not in tags:
                continue
            try:
                self.ec2.deregister_image(ImageId=image_id)
            except ClientError as exc:
                if not error_code(exc).startswith("InvalidAMIID"):
                    raise self._error(exc, f"cannot deregister image {image_id}") from None
            except BotoCoreError as exc:
                raise self._error(exc, f"cannot deregister image {image_id}") from None
            snapshot = tags.get(RESTORE_SNAPSHOT_TAG)
            if snapshot:
                self._delete_snapshot(snapshot)


class AwsBlockCapture(BlockCapture):
    """The blocks of one EBS snapshot, read through the EBS direct APIs."""

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        size: int,
        compute: AwsCompute,
        snapshot_id: str,
        parent_snapshot_id: str | None,
        delete_on_close: bool,
    ) -> None:
        super().__init__(instance, taken_at, size=size, block_size=EBS_BLOCK_SIZE)
        self.compute = compute
        self.snapshot_id = snapshot_id
        self.parent_snapshot_id = parent_snapshot_id
        self._delete_on_close = delete_on_close
        self._pool = ThreadPoolExecutor(
            max_workers=compute.settings.ebs_concurrency, thread_name_prefix="rv-ebs-read"
        )
        self._closed = False

    def _error(self, exc: BaseException, what: str) -> RegionVaultError:
        return aws_error(
            exc,
            f"{what} of snapshot {self.snapshot_id} through the EBS direct APIs: "
            f"{error_message(exc)}",
            ComputeError,
            region=self.compute.region,
        )

    def _pages(self, operation: str, kwargs: dict[str, Any], key: str) -> Iterator[dict[str, Any]]:
        call = getattr(self.compute.ebs, operation)
        token: str | None = None
        for _page in range(_MAX_PAGES):
            args = dict(kwargs, MaxResults=10000)
            if token:
                args["NextToken"] = token
            try:
                answer = call(**args)
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, f"cannot list the blocks ({operation})") from None
            # pages come in block order; inside one, sort (moto keeps insertion order)
            yield from sorted(answer.get(key, []), key=lambda b: int(b["BlockIndex"]))
            token = answer.get("NextToken")
            if not token:
                return

    def _read(self, index: int, token: str) -> bytes:
        try:
            answer = self.compute.ebs.get_snapshot_block(
                SnapshotId=self.snapshot_id, BlockIndex=index, BlockToken=token
            )
            with answer["BlockData"] as body:
                data = bytes(body.read())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot read block {index}") from None
        where = f"snapshot {self.snapshot_id} block {index}"
        if answer.get("DataLength") is not None and int(answer["DataLength"]) != len(data):
            raise IntegrityError(where, f"{len(data)} bytes read, {answer['DataLength']} announced")
        algorithm, checksum = answer.get("ChecksumAlgorithm"), answer.get("Checksum")
        if algorithm != "SHA256" or not checksum:
            raise IntegrityError(where, f"no SHA-256 checksum (got {algorithm!r})")
        if _checksum(data) != checksum:
            raise IntegrityError(where, "SHA-256 checksum mismatch")
        return data

    def _ordered(self, entries: Iterator[tuple[int, str | None]]) -> Iterator[tuple[int, bytes]]:
        """Read blocks with a bounded number in flight, yielding in the entries' order."""
        window = max(1, self.compute.settings.ebs_concurrency * 2)
        pending: deque[tuple[int, Future[bytes] | None]] = deque()
        zeros = bytes(EBS_BLOCK_SIZE)
        try:
            for index, token in entries:
                future = self._pool.submit(self._read, index, token) if token else None
                pending.append((index, future))
                if len(pending) >= window:
                    done_index, done = pending.popleft()
                    yield done_index * EBS_BLOCK_SIZE, done.result() if done else zeros
            while pending:
                done_index, done = pending.popleft()
                yield done_index * EBS_BLOCK_SIZE, done.result() if done else zeros
        finally:
            for _index, future in pending:
                if future is not None:
                    future.cancel()

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """Every block the snapshot holds (never-written blocks are left out: zeros)."""
        entries = (
            (int(b["BlockIndex"]), str(b["BlockToken"]))
            for b in self._pages("list_snapshot_blocks", {"SnapshotId": self.snapshot_id}, "Blocks")
        )
        return self._ordered(entries)

    def changed_blocks(self) -> Iterator[tuple[int, bytes]]:
        """Only the blocks that differ from ``parent_snapshot_id`` (ListChangedBlocks); a block
        the parent has and this snapshot lacks comes back as zeros. Unlike :meth:`blocks`, a
        range left out here is *unchanged from the parent*, not zeros: only a caller that
        holds the parent's blocks can use it."""
        if not self.parent_snapshot_id:
            raise ComputeError(
                "changed_blocks needs a parent snapshot (capture(..., ex_parent_snapshot_id=...))",
                provider="aws",
                region=self.compute.region,
            )
        kwargs = {"FirstSnapshotId": self.parent_snapshot_id, "SecondSnapshotId": self.snapshot_id}
        entries = (
            (int(b["BlockIndex"]), b.get("SecondBlockToken"))
            for b in self._pages("list_changed_blocks", kwargs, "ChangedBlocks")
        )
        return self._ordered(entries)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._delete_on_close:
            self.compute._delete_snapshot(self.snapshot_id)


class AwsBlockSink(BlockSink):
    """A new EBS snapshot in this region, written through the EBS direct APIs.

    :meth:`discard` (a failed restore or launch) stops the writes, deregisters the image a
    failed launch registered from the snapshot, and deletes the snapshot, completed or not.
    """

    def __init__(self, compute: AwsCompute, spec: LaunchSpec, size: int) -> None:
        super().__init__(size=size, block_size=EBS_BLOCK_SIZE)
        self.compute = compute
        self.spec = spec
        self.committed = False
        self.discarded = False
        self.blocks_written = 0
        #: the image a launch registered from this snapshot, and the instance it ran
        self.image_id: str | None = None
        self.launched_instance_id: str | None = None
        self._lock = threading.Lock()
        self._in_flight: deque[Future[None]] = deque()
        self._window = max(1, compute.settings.ebs_concurrency * 2)
        self._pool = ThreadPoolExecutor(
            max_workers=compute.settings.ebs_concurrency, thread_name_prefix="rv-ebs-write"
        )
        volume_gib = max(1, math.ceil(size / GiB))
        try:
            answer = compute.ebs.start_snapshot(
                VolumeSize=volume_gib,
                Description=f"regionvault restore of {spec.name}"[:255],
                Tags=_tag_list({RESTORE_TAG: spec.name, "Name": spec.name}),
                ClientToken=uuid.uuid4().hex,
                Timeout=1440,
            )
        except (ClientError, BotoCoreError) as exc:
            self._pool.shutdown(wait=False)
            raise aws_error(
                exc,
                f"cannot start a snapshot for restoring {spec.name!r}: {error_message(exc)}",
                ComputeError,
                region=compute.region,
            ) from None
        self.snapshot_id = str(answer["SnapshotId"])

    def _put(self, index: int, data: bytes) -> None:
        try:
            self.compute.ebs.put_snapshot_block(
                SnapshotId=self.snapshot_id,
                BlockIndex=index,
                BlockData=data,
                DataLength=len(data),
                Checksum=_checksum(data),
                ChecksumAlgorithm="SHA256",
            )
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(
                exc,
                f"cannot write block {index} of snapshot {self.snapshot_id}: {error_message(exc)}",
                ComputeError,
                region=self.compute.region,
            ) from None

    def write(self, offset: int, data: bytes) -> None:
        """Queue ``data`` (split into 512 KiB blocks, the last one zero-padded) for writing;
        a failed earlier write is raised here or by :meth:`commit`."""
        self._check_live()
        if self.committed:
            raise ComputeError(
                f"snapshot {self.snapshot_id} is already committed",
                provider="aws",
                region=self.compute.region,
            )
        if offset < 0 or offset % EBS_BLOCK_SIZE:
            raise ComputeError(
                f"write offset {offset} is not a multiple of {EBS_BLOCK_SIZE}",
                provider="aws",
                region=self.compute.region,
            )
        view = memoryview(data).cast("B")
        if offset + len(view) > max(self.size, math.ceil(self.size / GiB) * GiB):
            raise ComputeError(
                f"write of {len(view)} bytes at {offset} runs past the {self.size}-byte disk",
                provider="aws",
                region=self.compute.region,
            )
        for start in range(0, len(view), EBS_BLOCK_SIZE):
            block = bytes(view[start : start + EBS_BLOCK_SIZE]).ljust(EBS_BLOCK_SIZE, b"\0")
            index = (offset + start) // EBS_BLOCK_SIZE
            with self._lock:
                while len(self._in_flight) >= self._window:
                    self._in_flight.popleft().result()
                self._in_flight.append(self._pool.submit(self._put, index, block))
                self.blocks_written += 1

    def commit(self) -> None:
        """Wait for every block, complete the snapshot and wait until EC2 calls it
        completed (ready to register an image from)."""
        self._check_live()
        if self.committed:
            return
        with self._lock:
            while self._in_flight:
                self._in_flight.popleft().result()
        self._pool.shutdown(wait=True)
        try:
            self.compute.ebs.complete_snapshot(
                SnapshotId=self.snapshot_id, ChangedBlocksCount=self.blocks_written
            )
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(
                exc,
                f"cannot complete snapshot {self.snapshot_id}: {error_message(exc)}",
                ComputeError,
                region=self.compute.region,
            ) from None
        self.compute.wait_for_snapshot(self.snapshot_id)
        self.committed = True

    def _check_live(self) -> None:
        if self.discarded:
            raise ComputeError(
                f"snapshot {self.snapshot_id} was discarded",
                provider="aws",
                region=self.compute.region,
            )

    def discard(self) -> None:
        """Give up on this restore: stop writing, deregister the image a failed launch
        registered, delete the snapshot (an unfinished one too). Nothing is removed once
        :meth:`AwsCompute.launch` ran an instance from it: terminating that instance does."""
        if self.launched_instance_id is not None:
            return
        self.discarded = True
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._in_flight.clear()
        if self.image_id is not None:
            try:
                self.compute.ec2.deregister_image(ImageId=self.image_id)
            except ClientError as exc:
                if not error_code(exc).startswith("InvalidAMIID"):
                    raise self.compute._error(
                        exc, f"cannot deregister image {self.image_id}"
                    ) from None
            except BotoCoreError as exc:
                raise self.compute._error(exc, f"cannot deregister image {self.image_id}") from None
            self.image_id = None
        self.compute._delete_snapshot(self.snapshot_id)

    def abort(self) -> None:
        """Give up on this restore: :meth:`discard`."""
        self.discard()
