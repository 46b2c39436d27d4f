"""Compute on EC2: tag-filtered paged listings, tags, block captures of an instance's EBS
volumes read through the EBS direct APIs, and launches from restored snapshots.

Capture: every EBS volume of the instance, root first, then by device name, is one disk of
one block image. The volumes are snapshotted together (CreateSnapshots), or a disk is read
from an existing snapshot (``ex_snapshot_id`` / ``ex_snapshot_ids``, or the instance's
``regionvault:capture-snapshot[:<device>]`` tags); blocks are read with ListSnapshotBlocks /
GetSnapshotBlock, each one checked against its SHA-256 checksum. ``keep`` keeps the
snapshots and names them in ``ref``; ``since=ref`` gives the changed ranges through
ListChangedBlocks per volume. Restore: one new snapshot per disk is written in the
destination region with StartSnapshot / PutSnapshotBlock / CompleteSnapshot; launch
registers an image with the first as root and the others as block device mappings, and
runs an instance of the original's type with the original's tags.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from regionvault.core.errors import ComputeError, InstanceNotFound, IntegrityError, RegionVaultError
from regionvault.core.interfaces import (
    BlockCapture,
    BlockSink,
    Capture,
    CloudHealth,
    Compute,
    RestoreSink,
)
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    Disk,
    Instance,
    InstancePage,
    LaunchSpec,
    Tags,
    split_by_disk,
)
from regionvault.providers.aws.errors import aws_error, error_code, error_message
from regionvault.providers.aws.launching import (
    LaunchMapping,
    _profile_name,
    billing_not_carried,
    billing_products,
    capture_facts,
    checked_facts,
    instance_extra,
    instance_health,
    launch_subnet,
    map_launch,
    offered_type,
)

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.settings import AwsSettings

__all__ = [
    "CAPTURE_SNAPSHOT_TAG",
    "EBS_BLOCK_SIZE",
    "INTERNAL_PREFIX",
    "KEPT_TAG",
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
#: on snapshots a capture keeps after it closes, as the parent of the next incremental
#: backup (deleted by ``release_capture`` once the next capture replaces it)
KEPT_TAG = "regionvault:kept"
#: on images and snapshots the provider made for a launch (cleaned up on terminate)
RESTORE_TAG = "regionvault:restore"
#: on such an image: the restored snapshot it was registered from
RESTORE_SNAPSHOT_TAG = "regionvault:restore-snapshot"
_ZERO_BLOCK = bytes(EBS_BLOCK_SIZE)
_LIVE_STATES = ["pending", "running", "stopping", "stopped"]
_GONE_STATES = frozenset({"shutting-down", "terminated"})
#: RunInstances refused for want of a permission (with a profile: iam:PassRole)
_REFUSED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
_NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
_MAX_PAGES = 10_000_000
#: a role that may not call an EC2 action
_DENIED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
#: an EC2 instance type: family, generation and options, a dot, a size (m5.large,
#: c7gn.16xlarge, u-6tb1.metal, mac2-m2pro.metal)
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _escape_filter(value: str) -> str:
    """EC2 filter values treat '*' and '?' as wildcards; a backslash makes them literal."""
    return re.sub(r"([*?\\])", r"\\\1", value)


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
        #: what snapshot waits read the time with and sleep by (tests give fakes)
        self._clock: Callable[[], float] = time.monotonic
        self._sleep: Callable[[float], None] = time.sleep
        #: GetEbsEncryptionByDefault's answer, once asked (restore_encryption)
        self._encrypted_by_default: bool | None = None
        self._encryption_lock = threading.Lock()

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
        given = {
            key[len(CAPTURE_SNAPSHOT_TAG) + 1 :]: value
            for key, value in internal.items()
            if key.startswith(CAPTURE_SNAPSHOT_TAG + ":")
        }
        if CAPTURE_SNAPSHOT_TAG in internal:
            extra["capture_snapshot_id"] = internal[CAPTURE_SNAPSHOT_TAG]
            given[root_name or "/dev/xvda"] = internal[CAPTURE_SNAPSHOT_TAG]
        if given:
            extra["capture_snapshot_ids"] = given
        if raw.get("BootMode"):
            extra["boot_mode"] = raw["BootMode"]
        # key pair, instance profile, security groups, billing: what a launch carries over
        extra.update(instance_extra(raw))
        kinds = frozenset({CaptureKind.BLOCKS}) if volumes or given else frozenset()
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
                    zone = (raw.get("Placement") or {}).get("AvailabilityZone")
                    if (raw.get("State") or {}).get("Name") in _GONE_STATES or (
                        self.settings.availability_zone not in (None, zone)
                    ):  # another zone's instance is another region's
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
        if self.settings.availability_zone:  # a zone region lists its zone's instances alone
            filters.append(
                {"Name": "availability-zone", "Values": [self.settings.availability_zone]}
            )
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
            next_token: str | None = InstancePage.token(ec2_token, skip + page_size)
        else:
            following = answer.get("NextToken") or None
            next_token = InstancePage.token(following, 0) if following else None
        return InstancePage(instances=tuple(page), next_token=next_token)

    def _parse_page_token(self, token: str | None) -> tuple[str | None, int]:
        try:
            return InstancePage.parse_token(token)
        except ValueError as exc:
            raise ComputeError(str(exc), provider="aws", region=self.region) from None

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
        ex_snapshot_ids: Mapping[str, str] | None = None,
    ) -> Capture:
        """A block capture of every EBS volume of the instance: the root volume first, then
        the others by device name, one :class:`Disk` each, one after another in the image.

        The volumes are snapshotted together (CreateSnapshots: crash-consistent across
        them) before any block is read. A device can be read from an existing snapshot
        instead: ``ex_snapshot_ids`` maps device names to snapshot ids, ``ex_snapshot_id``
        names the root's; the instance tags ``regionvault:capture-snapshot`` (the root) and
        ``regionvault:capture-snapshot:<device>`` do the same. Snapshots the capture took
        are deleted on close unless ``keep``, which names them in ``ref``; ``since`` (an
        earlier capture's ``ref``) makes :meth:`AwsBlockCapture.changed_ranges` answer.
        """
        if kind not in (None, CaptureKind.BLOCKS):
            raise self.unsupported(f"capture(kind={kind})")
        raw = self._describe(instance_id)
        instance = self._instance(raw)
        devices = self._capture_devices(instance, ex_snapshot_id, ex_snapshot_ids)
        wanted = {d: volume for d, volume, given in devices if given is None and volume}
        created = self._snapshot_volumes(instance, wanted, keep=keep) if wanted else {}
        try:
            # the snapshots it took are described, not waited for: the capture (and its
            # ref) is returned at once, so that the engine records the ref before the
            # possibly hours-long wait, which the first read does (AwsBlockCapture._complete)
            taken = self._described(list(created.values())) if created else {}
            parts: list[_DiskSnapshot] = []
            offset = 0
            started: list[Any] = []
            for device, volume, given in devices:
                snapshot_id = given or created[device]
                facts = taken[snapshot_id] if given is None else self.wait_for_snapshot(given)
                started.append(facts.get("StartTime"))
                size = int(facts.get("VolumeSize", 1)) * GiB
                encrypted = bool(facts.get("Encrypted"))
                parts.append(
                    _DiskSnapshot(
                        device, volume, snapshot_id, offset, size, given is None, encrypted
                    )
                )
                offset += size
            return AwsBlockCapture(
                instance, _utc(started[0]), compute=self, parts=parts, since=since, keep=keep
            )
        except BaseException:
            for snapshot_id in created.values():
                with contextlib.suppress(RegionVaultError):
                    self._delete_snapshot(snapshot_id)
            raise

    def _capture_devices(
        self,
        instance: Instance,
        ex_snapshot_id: str | None,
        ex_snapshot_ids: Mapping[str, str] | None,
    ) -> list[tuple[str, str | None, str | None]]:
        """``(device, volume id, snapshot to read instead of taking one)`` of each disk to
        capture: the instance's attached volumes and the devices a snapshot is named for,
        root first, then by device name."""
        extra = instance.extra
        root = str(extra.get("root_device_name") or "/dev/xvda")
        volumes: dict[str, str] = dict(extra.get("volumes") or {})
        given: dict[str, str] = dict(extra.get("capture_snapshot_ids") or {})
        given.update(ex_snapshot_ids or {})
        if ex_snapshot_id:
            given[root] = ex_snapshot_id
        names = set(volumes) | set(given)
        if not names:
            raise ComputeError(
                f"instance {instance.id} has no EBS volume to capture",
                provider="aws",
                region=self.region,
            )
        return [
            (device, volumes.get(device), given.get(device))
            for device in sorted(names, key=lambda d: _device_order(d, root))
        ]

    def _snapshot_volumes(
        self, instance: Instance, wanted: Mapping[str, str], *, keep: bool = False
    ) -> dict[str, str]:
        """Snapshot the volumes ``wanted`` (device -> volume id) of the instance; returns
        device -> snapshot id. Several volumes are snapshotted by one CreateSnapshots call,
        so that the snapshots are crash-consistent with one another. Those of a capture
        that keeps them (the parent of the next incremental backup) are tagged so."""
        names = {"regionvault:instance": instance.id, "Name": instance.name}
        if keep:
            names[KEPT_TAG] = "incremental-parent"
        tags = _tag_list(names)
        spec = [{"ResourceType": "snapshot", "Tags": tags}]
        description = f"regionvault capture of {instance.id}"
        if len(wanted) == 1:
            ((device, volume),) = wanted.items()
            try:
                answer = self.ec2.create_snapshot(
                    VolumeId=volume, Description=description, TagSpecifications=spec
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(
                    exc, f"cannot snapshot volume {volume} of {instance.id}"
                ) from None
            return {device: str(answer["SnapshotId"])}
        every: dict[str, str] = dict(instance.extra.get("volumes") or {})
        root = instance.extra.get("root_device_name")
        skipped = [v for d, v in every.items() if d not in wanted and d != root]
        specification: dict[str, Any] = {
            "InstanceId": instance.id,
            "ExcludeBootVolume": root not in wanted,
        }
        if skipped:
            specification["ExcludeDataVolumeIds"] = skipped
        try:
            answer = self.ec2.create_snapshots(
                InstanceSpecification=specification,
                Description=description,
                TagSpecifications=spec,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot snapshot the volumes of {instance.id}") from None
        by_volume = {
            str(s.get("VolumeId")): str(s["SnapshotId"]) for s in answer.get("Snapshots", [])
        }
        device_of = {volume: device for device, volume in wanted.items()}
        taken = {device_of[v]: s for v, s in by_volume.items() if v in device_of}
        try:
            for volume, snapshot_id in by_volume.items():
                if volume not in device_of:  # asked to be left out: a snapshot is named for it
                    self._delete_snapshot(snapshot_id)
            missing = sorted(set(wanted) - set(taken))
            if missing:
                raise ComputeError(
                    f"CreateSnapshots of {instance.id} returned no snapshot of "
                    + ", ".join(f"{wanted[d]} ({d})" for d in missing),
                    provider="aws",
                    region=self.region,
                )
        except BaseException:
            for snapshot_id in taken.values():
                with contextlib.suppress(RegionVaultError):
                    self._delete_snapshot(snapshot_id)
            raise
        return taken

    def release_capture(self, ref: str) -> None:
        """Delete the snapshots a capture taken with ``keep=True`` kept (those it took itself;
        a snapshot it was told to read is not its to delete). Gone already is fine."""
        for part in _parse_ref(ref, self.region):
            if part.owned:
                self._delete_snapshot(part.snapshot_id)

    def wait_for_snapshot(self, snapshot_id: str) -> Mapping[str, Any]:
        """Wait until the snapshot is completed and return what DescribeSnapshots says of
        it. However long a large snapshot takes is waited for while its ``Progress`` moves;
        the wait fails when it has not moved for ``snapshot_stall_timeout`` seconds (a
        snapshot still queued at 0%: ``snapshot_queue_timeout``), or the
        snapshot is in state error."""

        def describe() -> Mapping[str, Any]:
            try:
                answer = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, f"cannot describe snapshot {snapshot_id}") from None
            found = answer.get("Snapshots") or []
            if not found:
                raise ComputeError(
                    f"snapshot {snapshot_id} not found", provider="aws", region=self.region
                )
            return dict(found[0])

        return follow_snapshot(
            describe,
            snapshot_id,
            stall_timeout=self.settings.snapshot_stall_timeout,
            queue_timeout=self.settings.snapshot_queue_timeout,
            region=self.region,
            clock=self._clock,
            sleep=self._sleep,
        )

    def _described(self, snapshot_ids: Sequence[str]) -> dict[str, Mapping[str, Any]]:
        """What DescribeSnapshots says now of each of the snapshots (completed or not)."""
        try:
            answer = self.ec2.describe_snapshots(SnapshotIds=list(snapshot_ids))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot describe snapshots {', '.join(snapshot_ids)}") from None
        found: dict[str, Mapping[str, Any]] = {
            str(f.get("SnapshotId")): dict(f) for f in answer.get("Snapshots") or []
        }
        missing = [s for s in snapshot_ids if s not in found]
        if missing:
            raise ComputeError(
                f"snapshot {', '.join(missing)} not found", provider="aws", region=self.region
            )
        return found

    def _snapshots_exist(self, snapshot_ids: Sequence[str]) -> bool:
        try:
            found = self.ec2.describe_snapshots(SnapshotIds=list(snapshot_ids)).get("Snapshots")
        except ClientError as exc:
            if error_code(exc) in ("InvalidSnapshot.NotFound", "InvalidSnapshotID.Malformed"):
                return False
            raise self._error(exc, f"cannot describe snapshots {', '.join(snapshot_ids)}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"cannot describe snapshots {', '.join(snapshot_ids)}") from None
        return {str(f.get("SnapshotId")) for f in found or []} >= set(snapshot_ids)

    def _delete_snapshot(self, snapshot_id: str) -> None:
        try:
            self.ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc) != "InvalidSnapshot.NotFound":
                raise self._error(exc, f"cannot delete snapshot {snapshot_id}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"cannot delete snapshot {snapshot_id}") from None

    def restore_encryption(self) -> dict[str, Any]:
        """StartSnapshot's encryption parameters for the snapshots a restore writes: the
        region's ``ebs_kms_key`` when set; else, when the account encrypts new EBS volumes
        and snapshots by default (GetEbsEncryptionByDefault, asked once), ``Encrypted``
        without a key, so EBS uses the account's default key (GetEbsDefaultKmsKeyId, or
        aws/ebs); else none (an unencrypted snapshot, as the account makes them). A role
        that may not ask is answered as "not by default": EBS still encrypts if it is.
        Volumes launched from these snapshots are encrypted with the same key."""
        if self.settings.ebs_kms_key:
            return {"Encrypted": True, "KmsKeyArn": self.settings.ebs_kms_key}
        with self._encryption_lock:
            if self._encrypted_by_default is None:
                try:
                    answer = self.ec2.get_ebs_encryption_by_default()
                    self._encrypted_by_default = bool(answer.get("EbsEncryptionByDefault"))
                except ClientError as exc:
                    if error_code(exc) not in _DENIED:
                        raise self._error(exc, "cannot ask for EBS encryption by default") from None
                    self._encrypted_by_default = False
                except BotoCoreError as exc:
                    raise self._error(exc, "cannot ask for EBS encryption by default") from None
            by_default = self._encrypted_by_default
        return {"Encrypted": True} if by_default else {}

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
        if not isinstance(size, int) or size <= 0:
            raise ComputeError(
                f"a block restore needs the disk size in bytes, got {size!r}",
                provider="aws",
                region=self.region,
            )
        try:
            return AwsBlockSink(self, spec, size, disks)
        except ValueError as exc:  # a layout that does not fit EBS's 512 KiB blocks
            raise ComputeError(
                f"cannot restore {spec.name!r} into EBS snapshots: {exc}",
                provider="aws",
                region=self.region,
            ) from None

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        """Register an image from the sink's snapshots (the first disk as root, every other
        at its own device name) and run one instance of it, carrying over what the
        destination has of the source: instance type (checked against the offerings,
        ``fallback_instance_types``), key pair, instance profile, security groups (mapped
        by tag or name), user data and tags. The instance returned lists in
        ``not_carried`` what could not be carried over (docs/aws.md, "Whole instances")."""
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
        # what the capture recorded (the point's manifest), else what the source instance
        # (given to a direct launch) tells
        facts, fact_lines = checked_facts({**source_extra, **spec.launch_facts})
        # a recovery point made by this provider records the instance type as its function
        # (Instance.function), so a restore from the point alone launches the same type
        function_type = (
            spec.function
            if spec.function is not None and _INSTANCE_TYPE.match(spec.function)
            else None
        )
        instance_type = (
            spec.extra.get("instance_type")
            or facts.get("instance_type")
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
        subnet, vpc_id, zone, subnet_line = launch_subnet(self, spec, facts)
        zone = getattr(self.settings, "availability_zone", None) or zone
        instance_type, type_line = offered_type(
            self,
            str(instance_type),
            zone,
            spec.name,
            spec.extra.get("architecture") or facts.get("architecture"),
        )
        root_device = _root_device(spec, facts, sink.disks[0].name)
        architecture = (
            spec.extra.get("architecture")
            or facts.get("architecture")
            or self._architecture_of(str(instance_type))
        )
        base = dict(spec.tags) if spec.tags else (dict(source.tags) if source is not None else {})
        tags = {
            k: v
            for k, v in base.items()
            if not k.lower().startswith("aws:") and not k.startswith(INTERNAL_PREFIX)
        }
        reserved = sorted(k for k in base if k.lower().startswith("aws:"))
        self._check_tags(tags, self.region)
        mapping = map_launch(self, spec, facts, subnet=subnet, vpc_id=vpc_id)
        if type_line:
            mapping.not_carried.insert(0, type_line)
        if subnet_line:
            mapping.not_carried.insert(0, subnet_line)
        mapping.not_carried[:0] = fact_lines
        if reserved:
            mapping.not_carried.append(
                f"tags {', '.join(reserved)}: the aws: prefix is AWS's to set"
            )
        # the launched instance's tags are exactly these; its name rides on a provider tag
        internal = {NAME_TAG: spec.name}
        devices = _data_devices([d.name for d in sink.disks[1:]], str(root_device))
        if self.settings.capture_launched_from_snapshot:
            internal[CAPTURE_SNAPSHOT_TAG] = sink.snapshot_id
            for device, snapshot_id in zip(devices, sink.snapshot_ids[1:], strict=True):
                internal[f"{CAPTURE_SNAPSHOT_TAG}:{device}"] = snapshot_id
        label = re.sub(r"[^A-Za-z0-9()\[\] ./'@_-]", "-", spec.name)[:80]
        image_kwargs: dict[str, Any] = {
            "Name": f"regionvault-{label}-{uuid.uuid4().hex[:12]}",
            "Description": f"regionvault restore of {spec.name}",
            "Architecture": architecture,
            "RootDeviceName": root_device,
            "BlockDeviceMappings": [
                {
                    "DeviceName": device,
                    "Ebs": {
                        "SnapshotId": snapshot_id,
                        "DeleteOnTermination": True,
                        "VolumeType": "gp3",
                    },
                }
                for device, snapshot_id in zip(
                    [root_device, *devices], sink.snapshot_ids, strict=True
                )
            ],
            "VirtualizationType": "hvm",
            "EnaSupport": True,
        }
        boot_mode = spec.extra.get("boot_mode") or facts.get("boot_mode")
        if boot_mode:
            image_kwargs["BootMode"] = boot_mode
        products = billing_products(self, facts)
        if products:
            image_kwargs["BillingProducts"] = products
        try:
            image_id = str(self.ec2.register_image(**image_kwargs)["ImageId"])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot register an image from {sink.snapshot_id}") from None
        sink.image_id = image_id  # a failed launch's discard deregisters it
        try:
            # tagged apart from RegisterImage: moto ignores RegisterImage's TagSpecifications
            image_tags = {RESTORE_TAG: spec.name, RESTORE_SNAPSHOT_TAG: sink.snapshot_id}
            for number, snapshot_id in enumerate(sink.snapshot_ids[1:], start=1):
                image_tags[f"{RESTORE_SNAPSHOT_TAG}:{number}"] = snapshot_id
            self.ec2.create_tags(Resources=[image_id], Tags=_tag_list(image_tags))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot tag image {image_id}") from None
        mapping.not_carried.extend(billing_not_carried(self, image_id, facts, products))
        return self._run(spec, sink, image_id, str(instance_type), {**tags, **internal}, mapping)

    def _run(
        self,
        spec: LaunchSpec,
        sink: AwsBlockSink,
        image_id: str,
        instance_type: str,
        tags: Mapping[str, str],
        mapping: LaunchMapping,
    ) -> Instance:
        run_kwargs: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": uuid.uuid4().hex,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": _tag_list(tags)}],
            **mapping.run,
        }
        if self.settings.availability_zone:  # the subnet, if any, must lie in it: EC2 checks
            run_kwargs["Placement"] = {"AvailabilityZone": self.settings.availability_zone}
        profile = run_kwargs.get("IamInstanceProfile")
        try:
            answer = self.ec2.run_instances(**run_kwargs)
        except ClientError as exc:
            if profile is None or error_code(exc) not in _REFUSED:
                # the message never holds the user data: EC2 names parameters, not values
                raise self._error(exc, f"cannot run an instance from image {image_id}") from None
            # most likely iam:PassRole on the profile's role: an instance without its
            # profile is a finding for the operator, not a reason to have no instance
            name = _profile_name(str(profile.get("Arn") or profile.get("Name") or ""))
            del run_kwargs["IamInstanceProfile"]
            run_kwargs["ClientToken"] = uuid.uuid4().hex
            try:
                answer = self.ec2.run_instances(**run_kwargs)
            except (ClientError, BotoCoreError) as again:
                raise self._error(
                    again,
                    f"cannot run an instance from image {image_id} (refused with instance "
                    f"profile {name}, then without it)",
                ) from None
            mapping.not_carried.append(
                f"instance profile {name}: not passed (RunInstances refused it, "
                f"{error_code(exc)}: the launch role may lack iam:PassRole on its role)"
            )
        except BotoCoreError as exc:
            raise self._error(exc, f"cannot run an instance from image {image_id}") from None
        raw = dict(answer["Instances"][0])
        # from here the image and snapshot belong to the instance: terminate removes them
        sink.launched_instance_id = str(raw.get("InstanceId") or "") or None
        if not raw.get("Tags"):
            raw["Tags"] = _tag_list(tags)
        return dataclasses.replace(self._instance(raw), not_carried=tuple(mapping.not_carried))

    def cloud_health(self, instance: Instance) -> CloudHealth | None:
        """EC2's status checks (DescribeInstanceStatus): running, instance and system
        status ``ok``."""
        return instance_health(self, instance.id)

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
            for key, snapshot in sorted(tags.items()):
                if key == RESTORE_SNAPSHOT_TAG or key.startswith(RESTORE_SNAPSHOT_TAG + ":"):
                    self._delete_snapshot(snapshot)


#: the longest pause between two looks at a snapshot being waited for
_WAIT_MAX_DELAY = 15.0


#: ``launch_facts`` key: the devices whose captured snapshot was encrypted
ENCRYPTED_DEVICES = "encrypted_devices"


def _progress(facts: Mapping[str, Any]) -> float | None:
    """DescribeSnapshots' ``Progress`` ("42%") as a number, or None when it says none."""
    text = str(facts.get("Progress") or "").strip().rstrip("%")
    try:
        return float(text)
    except ValueError:
        return None


def follow_snapshot(
    describe: Callable[[], Mapping[str, Any]],
    snapshot_id: str,
    *,
    stall_timeout: float,
    region: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    queue_timeout: float = 0.0,
) -> dict[str, Any]:
    """Look at a snapshot (``describe``: what DescribeSnapshots says of it) until it is
    completed, and return that. Any change of its ``Progress`` (up or down: AWS reports it
    coarsely and not always forwards) or of its state restarts the ``stall_timeout``
    window: the wait fails only when the snapshot stops moving for that long, never because
    a large one is slow. A snapshot that has not moved at all since the wait began and
    shows no progress (pending at 0%, or no ``Progress``: queued behind another snapshot of
    its volume) has the longer ``queue_timeout`` window instead. States error and
    recoverable fail at once. Pauses grow from 0.5 s to 15 s (and never past the window's
    end)."""
    delay = 0.5
    seen: tuple[str | None, float | None] | None = None
    moved = False  # it has moved since the first look
    moved_at = clock()
    for _look in range(_MAX_PAGES):
        facts = dict(describe())
        state = facts.get("State")
        if state == "completed":
            return facts
        if state in ("error", "recoverable"):
            why = facts.get("StateMessage", "")
            raise ComputeError(
                f"snapshot {snapshot_id} is in state {state}: {why}",
                provider="aws",
                region=region,
            )
        progress = _progress(facts)
        now = clock()
        queued = not moved and not progress
        window = max(stall_timeout, queue_timeout) if queued else stall_timeout
        if seen is None or (state, progress) != seen:
            if seen is not None:
                delay = 0.5  # it moves: look again soon
                moved = True
            seen, moved_at = (state, progress), now
        elif now - moved_at >= window:
            where = "no progress reported" if progress is None else f"at {progress:g}%"
            setting = (
                "snapshot_queue_timeout"
                if queued and window > stall_timeout
                else ("snapshot_stall_timeout")
            )
            raise ComputeError(
                f"snapshot {snapshot_id} made no progress for {now - moved_at:.0f} s "
                f"(state {state}, {where}; {setting} is {window:g} s)",
                provider="aws",
                region=region,
            )
        sleep(max(0.0, min(delay, moved_at + window - now)))
        delay = min(delay * 2, _WAIT_MAX_DELAY)
    raise ComputeError(  # pragma: no cover - ten million looks
        f"snapshot {snapshot_id} not completed", provider="aws", region=region
    )


@dataclass(frozen=True)
class _DiskSnapshot:
    """One disk of a capture: the snapshot it is read from, where it sits in the image."""

    device: str
    volume_id: str | None
    snapshot_id: str
    offset: int
    size: int
    #: taken by the capture, so it is the capture's to delete (not one a caller or tag named)
    owned: bool
    #: the snapshot is encrypted (DescribeSnapshots' Encrypted): a restore of it must be too
    encrypted: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.size

    def as_ref(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "volume": self.volume_id,
            "snapshot": self.snapshot_id,
            "size": self.size,
            "owned": self.owned,
        }


_REF_VERSION = 1


class _SnapshotGone(Exception):
    """ListChangedBlocks cannot compare the two snapshots: the earlier one no longer
    exists, or they are not of one volume's lineage."""


def _cannot_compare(exc: BaseException) -> bool:
    """Whether an EBS error says two snapshots cannot be compared (rather than a failure):
    ``ResourceNotFoundException`` (a snapshot is gone) or ``ValidationException`` with the
    reason ``UNRELATED_SNAPSHOTS``."""
    code = error_code(exc)
    if code == "ResourceNotFoundException":
        return True
    response = getattr(exc, "response", None)
    if code != "ValidationException" or not isinstance(response, dict):
        return False
    reason = response.get("Reason") or response.get("Error", {}).get("Reason")
    return bool(reason == "UNRELATED_SNAPSHOTS")


def _parse_ref(ref: str, region: str) -> list[_DiskSnapshot]:
    """The disks a ``BlockCapture.ref`` of this provider names; ComputeError when it is none."""
    try:
        doc = json.loads(ref)
        if not isinstance(doc, dict) or doc.get("aws-ebs") != _REF_VERSION:
            raise ValueError("not an EBS capture ref")
        parts, offset = [], 0
        for disk in doc["disks"]:
            volume = disk["volume"]
            part = _DiskSnapshot(
                device=str(disk["device"]),
                volume_id=None if volume is None else str(volume),
                snapshot_id=str(disk["snapshot"]),
                offset=offset,
                size=int(disk["size"]),
                owned=bool(disk["owned"]),
            )
            if not part.snapshot_id.startswith("snap-") or part.size <= 0:
                raise ValueError("bad disk")
            parts.append(part)
            offset += part.size
        if not parts:
            raise ValueError("no disks")
    except (ValueError, KeyError, TypeError) as exc:
        raise ComputeError(
            f"bad capture ref {ref[:60]!r}: {exc}", provider="aws", region=region
        ) from None
    return parts


def _device_order(device: str, root: str) -> tuple[bool, int, str]:
    """The root device first, then by name, shorter names first (/dev/sdz before /dev/sdba)."""
    return device != root, len(device), device


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted, with touching and overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            start, old = merged[-1]
            merged[-1] = (start, max(old, offset + length - start))
        else:
            merged.append((offset, length))
    return merged


#: EC2's HVM data device names: /dev/sd[b-z], /dev/xvd[b-z], /dev/xvd[b-c][a-z]
_DEVICE_NAME = re.compile(r"^/dev/(sd[b-z]|xvd[b-z]|xvd[b-c][a-z])$")
_ROOT_DEVICE_NAME = re.compile(r"^/dev/(sd|xvd)a1?$")


def _root_device(spec: LaunchSpec, facts: Mapping[str, Any], first_disk: str) -> str:
    """The root device of the image: the one recorded (the launch's extra, the capture's
    facts), else the first disk's captured name when it is an EC2 root device name, else
    /dev/xvda."""
    recorded = spec.extra.get("root_device_name") or facts.get("root_device_name")
    if recorded:
        return str(recorded)
    return first_disk if _ROOT_DEVICE_NAME.match(first_disk) else "/dev/xvda"


def _data_devices(names: Sequence[str], root: str) -> list[str]:
    """Device names for a launch's data disks, in the image's disk order: each keeps its
    captured name when that is an EC2 data device name, not the root's slot and its slot not
    already taken (``/dev/sdf`` and ``/dev/xvdf`` are one slot: Xen renames one to the
    other); any other (a disk from another cloud: "lun0") gets the first free of
    /dev/sdf ... /dev/sdz, then /dev/xvdba ... /dev/xvdcz (EC2's HVM names), so a volume is
    attached where the instance had it, whatever the order. More disks than names: a
    ComputeError."""
    root_slot = _slot(root)
    kept = {_slot(n) for n in names if _DEVICE_NAME.match(n)} - {root_slot}
    singles = [chr(c) for c in range(ord("f"), ord("z") + 1)]
    doubles = [a + b for a in "bc" for b in "abcdefghijklmnopqrstuvwxyz"]
    free = iter(
        [f"/dev/sd{x}" for x in singles if x not in kept and x != root_slot]
        + [f"/dev/xvd{x}" for x in doubles if x not in kept]
    )
    out: list[str] = []
    used: set[str] = set()
    for name in names:
        slot = _slot(name) if _DEVICE_NAME.match(name) else None
        if slot is not None and slot in kept and slot not in used:
            out.append(name)
            used.add(slot)
            continue
        device = next(free, None)
        if device is None:
            raise ComputeError(
                f"{len(names)} data disks: more than EC2 has device names for", provider="aws"
            )
        out.append(device)
    return out


def _slot(device: str) -> str:
    """``/dev/sdf`` and ``/dev/xvdf`` -> ``f``, ``/dev/sda1`` -> ``a``: the letters that
    name one attachment point whichever prefix the kernel gives it."""
    match = re.match(r"^/dev/(?:sd|xvd)([a-z]{1,2})\d*$", device)
    return match.group(1) if match else device


class AwsBlockCapture(BlockCapture):
    """The blocks of an instance's EBS snapshots (one per disk), read through the EBS
    direct APIs, each disk at its offset in the image."""

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        compute: AwsCompute,
        parts: Sequence[_DiskSnapshot],
        since: str | None = None,
        keep: bool = False,
    ) -> None:
        size = parts[-1].offset + parts[-1].size
        super().__init__(
            instance,
            taken_at,
            size=size,
            block_size=EBS_BLOCK_SIZE,
            disks=[Disk(p.device, p.offset, p.size) for p in parts],
        )
        self.compute = compute
        self.parts = tuple(parts)
        #: the root disk's snapshot (the only one of a one-disk capture)
        self.snapshot_id = parts[0].snapshot_id
        self.since = since
        self._keep = keep
        if keep:
            doc: dict[str, Any] = {
                "aws-ebs": _REF_VERSION,
                "instance": instance.id,
                "disks": [p.as_ref() for p in self.parts],
            }
            self.ref = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        self._changed: list[tuple[int, int]] | None = None
        self._changed_known = False
        #: the snapshots the capture took, still to be waited for before the first read
        self._incomplete = [p.snapshot_id for p in self.parts if p.owned]
        self._wait_lock = threading.Lock()
        #: per disk (by number), the changed blocks' tokens ListChangedBlocks gave
        self._tokens: dict[int, dict[int, str | None]] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=compute.settings.ebs_concurrency, thread_name_prefix="rv-ebs-read"
        )
        self._closed = False

    def _error(self, exc: BaseException, what: str, snapshot_id: str) -> RegionVaultError:
        return aws_error(
            exc,
            f"{what} of snapshot {snapshot_id} through the EBS direct APIs: {error_message(exc)}",
            ComputeError,
            region=self.compute.region,
        )

    def _pages(
        self,
        operation: str,
        kwargs: dict[str, Any],
        key: str,
        snapshot_id: str,
        *,
        gone_ok: bool = False,
    ) -> Iterator[dict[str, Any]]:
        call = getattr(self.compute.ebs, operation)
        token: str | None = None
        for _page in range(_MAX_PAGES):
            args = dict(kwargs, MaxResults=10000)
            if token:
                args["NextToken"] = token
            try:
                answer = call(**args)
            except (ClientError, BotoCoreError) as exc:
                if gone_ok and _cannot_compare(exc):
                    raise _SnapshotGone from None
                raise self._error(
                    exc, f"cannot list the blocks ({operation})", snapshot_id
                ) from None
            # pages come in block order; inside one, sort (moto keeps insertion order)
            yield from sorted(answer.get(key, []), key=lambda b: int(b["BlockIndex"]))
            token = answer.get("NextToken")
            if not token:
                return

    def _read(self, snapshot_id: str, index: int, token: str) -> bytes:
        try:
            answer = self.compute.ebs.get_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
            )
            with answer["BlockData"] as body:
                data = bytes(body.read())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot read block {index}", snapshot_id) from None
        where = f"snapshot {snapshot_id} block {index}"
        if answer.get("DataLength") is not None and int(answer["DataLength"]) != len(data):
            raise IntegrityError(where, f"{len(data)} bytes read, {answer['DataLength']} announced")
        algorithm, checksum = answer.get("ChecksumAlgorithm"), answer.get("Checksum")
        if algorithm != "SHA256" or not checksum:
            raise IntegrityError(where, f"no SHA-256 checksum (got {algorithm!r})")
        if _checksum(data) != checksum:
            raise IntegrityError(where, "SHA-256 checksum mismatch")
        return data

    def _ordered(
        self, entries: Iterator[tuple[_DiskSnapshot, int, str]]
    ) -> Iterator[tuple[int, bytes]]:
        """Read blocks ``(disk, index, token)`` with a bounded number in flight, yielding
        ``(image offset, data)`` in the entries' order; data past the disk's end is cut."""
        window = max(1, self.compute.settings.ebs_concurrency * 2)
        pending: deque[tuple[_DiskSnapshot, int, Future[bytes]]] = deque()

        def done(part: _DiskSnapshot, index: int, future: Future[bytes]) -> tuple[int, bytes]:
            start = index * EBS_BLOCK_SIZE
            return part.offset + start, future.result()[: max(0, part.size - start)]

        try:
            for part, index, token in entries:
                future = self._pool.submit(self._read, part.snapshot_id, index, token)
                pending.append((part, index, future))
                if len(pending) >= window:
                    yield done(*pending.popleft())
            while pending:
                yield done(*pending.popleft())
        finally:
            for _part, _index, future in pending:
                future.cancel()

    def _listed(self, part: _DiskSnapshot, first: int = 0) -> Iterator[tuple[int, str]]:
        """``(block index, token)`` of the blocks a disk's snapshot holds, from ``first``
        on (a listing may start earlier: moto ignores StartingBlockIndex)."""
        kwargs: dict[str, Any] = {"SnapshotId": part.snapshot_id}
        if first:
            kwargs["StartingBlockIndex"] = first
        last = -1
        for block in self._pages("list_snapshot_blocks", kwargs, "Blocks", part.snapshot_id):
            index = int(block["BlockIndex"])
            if index < first:
                continue
            if index * EBS_BLOCK_SIZE >= part.size:
                raise IntegrityError(
                    f"snapshot {part.snapshot_id}",
                    f"block {index} lies past its {part.size}-byte volume",
                )
            if index <= last:
                raise IntegrityError(
                    f"snapshot {part.snapshot_id}", f"block {index} listed out of order"
                )
            last = index
            yield index, str(block["BlockToken"])

    def _complete(self) -> None:
        """Wait for the snapshots the capture took to be completed (once; the EBS direct
        APIs read only completed snapshots): the first read or comparison does."""
        with self._wait_lock:
            while self._incomplete:
                self.compute.wait_for_snapshot(self._incomplete[0])
                self._incomplete.pop(0)

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """Every block the disks' snapshots hold, disk after disk (never-written blocks are
        left out: zeros)."""
        self._complete()
        return self._ordered(
            (part, index, token) for part in self.parts for index, token in self._listed(part)
        )

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """The written data within ``spans``: only the blocks there are read. A block
        ListChangedBlocks named (:meth:`changed_ranges`) is read with the token it gave, or
        is a hole when it gave none (cleared); the other blocks of a span are listed by one
        ListSnapshotBlocks from the span's first such block, stopped at the span's end. A
        disk with no such tokens is listed once, from the first block the spans touch."""
        self._complete()
        wanted = _merge([(o, n) for o, n in spans if n > 0])

        def entries() -> Iterator[tuple[_DiskSnapshot, int, str]]:
            for number, part in enumerate(self.parts):
                mine = [
                    (max(o, part.offset), min(o + n, part.end))
                    for o, n in wanted
                    if o < part.end and o + n > part.offset
                ]
                if not mine:
                    continue
                tokens = self._tokens.get(number)
                if tokens is not None:
                    for lo, hi in mine:
                        yield from self._span_entries(part, tokens, lo, hi)
                    continue
                first = (mine[0][0] - part.offset) // EBS_BLOCK_SIZE
                at = 0
                for index, token in self._listed(part, first):
                    lo = part.offset + index * EBS_BLOCK_SIZE
                    hi = lo + EBS_BLOCK_SIZE
                    while at < len(mine) and mine[at][1] <= lo:
                        at += 1
                    if at == len(mine):
                        break
                    if mine[at][0] < hi:
                        yield part, index, token

        at = 0
        for offset, data in self._ordered(entries()):
            end = offset + len(data)
            while at < len(wanted) and wanted[at][0] + wanted[at][1] <= offset:
                at += 1
            k = at
            while k < len(wanted) and wanted[k][0] < end:
                lo, n = wanted[k]
                a, b = max(lo, offset), min(lo + n, end)
                yield a, data[a - offset : b - offset]
                k += 1

    def _span_entries(
        self, part: _DiskSnapshot, tokens: Mapping[int, str | None], lo: int, hi: int
    ) -> Iterator[tuple[_DiskSnapshot, int, str]]:
        """``(disk, index, token)`` of the written blocks of the disk's image bytes
        ``[lo, hi)``, in block order: the changed ones from ``tokens``, the others from one
        ListSnapshotBlocks starting at the first of them and stopped past ``hi``."""
        first = (lo - part.offset) // EBS_BLOCK_SIZE
        stop = (hi - part.offset + EBS_BLOCK_SIZE - 1) // EBS_BLOCK_SIZE
        found: dict[int, str] = {}
        others = [i for i in range(first, stop) if i not in tokens]
        if others:
            for index, token in self._listed(part, others[0]):
                if index >= stop:
                    break
                found[index] = token
        for index in range(first, stop):
            known = tokens[index] if index in tokens else found.get(index)
            if known is not None:
                yield part, index, known

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """Where the image may differ from the ``since`` capture's: per disk, the blocks
        ListChangedBlocks names between the two snapshots (written or cleared), at the
        disk's offset. None without ``since``, or when it cannot tell: the disks differ
        (added, removed, resized, another volume), an earlier snapshot is gone, or EBS
        calls the two snapshots unrelated."""
        if not self._changed_known:
            if self.since is not None:
                self._complete()
            self._changed = self._compute_changed()
            self._changed_known = True
        return None if self._changed is None else list(self._changed)

    def _compute_changed(self) -> list[tuple[int, int]] | None:
        if self.since is None:
            return None
        before = _parse_ref(self.since, self.compute.region)
        shape = [(p.device, p.volume_id, p.size) for p in self.parts]
        if [(p.device, p.volume_id, p.size) for p in before] != shape:
            return None
        pairs = [(old, new) for old, new in zip(before, self.parts, strict=True)]
        earlier = [old.snapshot_id for old, new in pairs if old.snapshot_id != new.snapshot_id]
        if earlier and not self.compute._snapshots_exist(earlier):
            return None
        ranges: list[tuple[int, int]] = []
        #: per disk read from a new snapshot: block index -> SecondBlockToken (None: cleared)
        found: dict[int, dict[int, str | None]] = {}
        for number, (old, new) in enumerate(pairs):
            if old.snapshot_id == new.snapshot_id:
                found[number] = {}  # the same snapshot: nothing changed, nothing to list
                continue
            kwargs = {"FirstSnapshotId": old.snapshot_id, "SecondSnapshotId": new.snapshot_id}
            listing = self._pages(
                "list_changed_blocks", kwargs, "ChangedBlocks", new.snapshot_id, gone_ok=True
            )
            tokens: dict[int, str | None] = {}
            try:
                for block in listing:
                    index = int(block["BlockIndex"])
                    start = index * EBS_BLOCK_SIZE
                    if start < new.size:
                        ranges.append((new.offset + start, min(EBS_BLOCK_SIZE, new.size - start)))
                        second = block.get("SecondBlockToken")
                        tokens[index] = str(second) if second else None
            except _SnapshotGone:  # deleted since the check, or not of one lineage
                return None
            found[number] = tokens
        self._tokens = found
        return _merge(ranges)

    def launch_facts(self) -> Mapping[str, Any]:
        """Key pair, instance profile, security groups, user data and billing details of
        the captured instance (providers/aws/launching.py), for the sealed manifest, and
        ``encrypted_devices``: the disks whose snapshot was encrypted, which a restore
        encrypts whatever the account's default (:meth:`AwsBlockSink._start`)."""
        facts = dict(capture_facts(self.compute, self.instance))
        facts[ENCRYPTED_DEVICES] = [p.device for p in self.parts if p.encrypted]
        return facts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._keep:
            return
        failed: RegionVaultError | None = None
        for part in self.parts:
            if part.owned:
                try:
                    self.compute._delete_snapshot(part.snapshot_id)
                except RegionVaultError as exc:  # delete the others all the same
                    failed = failed or exc
        if failed is not None:
            raise failed


class AwsBlockSink(BlockSink):
    """New EBS snapshots in this region, one per disk of the image, written through the EBS
    direct APIs.

    :meth:`discard` (a failed restore or launch) stops the writes, deregisters the image a
    failed launch registered from the snapshots, and deletes the snapshots, completed or
    not.
    """

    def __init__(
        self,
        compute: AwsCompute,
        spec: LaunchSpec,
        size: int,
        disks: Sequence[Disk] | None = None,
    ) -> None:
        super().__init__(size=size, block_size=EBS_BLOCK_SIZE, disks=disks)
        self.compute = compute
        self.spec = spec
        self.committed = False
        self.discarded = False
        #: blocks written into each disk's snapshot (CompleteSnapshot's ChangedBlocksCount)
        self.blocks_written = [0] * len(self.disks)
        #: the image a launch registered from these snapshots, and the instance it ran
        self.image_id: str | None = None
        self.launched_instance_id: str | None = None
        self._lock = threading.Lock()
        self._in_flight: deque[Future[None]] = deque()
        self._window = max(1, compute.settings.ebs_concurrency * 2)
        self._pool = ThreadPoolExecutor(
            max_workers=compute.settings.ebs_concurrency, thread_name_prefix="rv-ebs-write"
        )
        #: one snapshot per disk, in the image's disk order
        self.snapshot_ids: list[str] = []
        try:
            #: StartSnapshot's encryption parameters (:meth:`AwsCompute.restore_encryption`)
            self.encryption = compute.restore_encryption()
            for number, disk in enumerate(self.disks):
                self.snapshot_ids.append(self._start(spec, disk, number))
        except BaseException:
            self._pool.shutdown(wait=False)
            with contextlib.suppress(RegionVaultError):  # the first error is the one to see
                self.discard()
            raise

    @property
    def snapshot_id(self) -> str:
        """The first disk's snapshot: the one the instance boots from."""
        return self.snapshot_ids[0]

    def _start(self, spec: LaunchSpec, disk: Disk, number: int) -> str:
        what = spec.name if number == 0 else f"{spec.name} disk {number} ({disk.name})"
        encryption = dict(self.encryption)
        source_encrypted = spec.launch_facts.get(ENCRYPTED_DEVICES) or ()
        if disk.name in source_encrypted and not encryption.get("Encrypted"):
            # the source disk was encrypted: never restore it in plaintext (EBS then uses
            # the account's default key, GetEbsDefaultKmsKeyId, or aws/ebs)
            encryption["Encrypted"] = True
        try:
            answer = self.compute.ebs.start_snapshot(
                VolumeSize=max(1, math.ceil(disk.size / GiB)),
                Description=f"regionvault restore of {what}"[:255],
                Tags=_tag_list({RESTORE_TAG: spec.name, "Name": spec.name}),
                ClientToken=uuid.uuid4().hex,
                Timeout=1440,
                **encryption,
            )
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(
                exc,
                f"cannot start a snapshot for restoring {what!r}: {error_message(exc)}",
                ComputeError,
                region=self.compute.region,
            ) from None
        return str(answer["SnapshotId"])

    def _put(self, number: int, index: int, data: bytes) -> None:
        snapshot_id = self.snapshot_ids[number]
        try:
            self.compute.ebs.put_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=index,
                BlockData=data,
                DataLength=len(data),
                Checksum=_checksum(data),
                ChecksumAlgorithm="SHA256",
            )
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(
                exc,
                f"cannot write block {index} of snapshot {snapshot_id}: {error_message(exc)}",
                ComputeError,
                region=self.compute.region,
            ) from None

    def _fail(self, message: str) -> ComputeError:
        return ComputeError(message, provider="aws", region=self.compute.region)

    def write(self, offset: int, data: bytes) -> None:
        """Queue ``data`` (at an image offset; split at disk boundaries and into 512 KiB
        blocks, the last one of each piece zero-padded) for writing into the disks'
        snapshots; blocks of zeros are not sent (a new snapshot reads zeros where nothing was
        written). A failed earlier write is raised here or by :meth:`commit`. Bytes outside
        every disk (the zeros that pad a disk's last block, a gap between disks) must be
        zeros: they are dropped, and the write is refused whole if they are not."""
        self._check_live()
        if self.committed:
            raise self._fail(f"snapshot {self.snapshot_id} is already committed")
        if offset < 0 or offset % EBS_BLOCK_SIZE:
            raise self._fail(f"write offset {offset} is not a multiple of {EBS_BLOCK_SIZE}")
        view = memoryview(data).cast("B")
        end = offset + len(view)
        last = self.disks[-1]
        if end > max(self.size, last.offset + math.ceil(last.size / GiB) * GiB):
            raise self._fail(
                f"write of {len(view)} bytes at {offset} runs past the {self.size}-byte image"
            )
        # cut into pieces per disk and check what lies outside them (zeros that pad a
        # disk's last block, or the gap before the next) first: nothing is queued for a
        # write that is refused
        try:
            pieces = split_by_disk(self.disks, offset, view)
        except ValueError as exc:
            raise self._fail(f"restore of {self.spec.name!r}: {exc}") from None
        for number, disk_offset, piece in pieces:
            self._queue(number, disk_offset, piece)

    def _queue(self, number: int, disk_offset: int, piece: memoryview) -> None:
        for start in range(0, len(piece), EBS_BLOCK_SIZE):
            block = bytes(piece[start : start + EBS_BLOCK_SIZE]).ljust(EBS_BLOCK_SIZE, b"\0")
            if block == _ZERO_BLOCK:
                continue  # a new snapshot reads zeros wherever nothing was written
            index = (disk_offset + start) // EBS_BLOCK_SIZE
            with self._lock:
                while len(self._in_flight) >= self._window:
                    self._in_flight.popleft().result()
                self._in_flight.append(self._pool.submit(self._put, number, index, block))
                self.blocks_written[number] += 1

    def commit(self) -> None:
        """Wait for every block, complete each disk's snapshot and wait until EC2 calls them
        completed (ready to register an image from)."""
        self._check_live()
        if self.committed:
            return
        with self._lock:
            while self._in_flight:
                self._in_flight.popleft().result()
        self._pool.shutdown(wait=True)
        for number, snapshot_id in enumerate(self.snapshot_ids):
            try:
                self.compute.ebs.complete_snapshot(
                    SnapshotId=snapshot_id, ChangedBlocksCount=self.blocks_written[number]
                )
            except (ClientError, BotoCoreError) as exc:
                raise aws_error(
                    exc,
                    f"cannot complete snapshot {snapshot_id}: {error_message(exc)}",
                    ComputeError,
                    region=self.compute.region,
                ) from None
        for snapshot_id in self.snapshot_ids:
            self.compute.wait_for_snapshot(snapshot_id)
        self.committed = True

    def _check_live(self) -> None:
        if self.discarded:
            raise self._fail(f"snapshot {self.snapshot_id} was discarded")

    def discard(self) -> None:
        """Give up on this restore: stop writing, deregister the image a failed launch
        registered, delete every disk's snapshot (unfinished ones too). Nothing is removed
        once :meth:`AwsCompute.launch` ran an instance from them: terminating it does."""
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
        failed: RegionVaultError | None = None
        for snapshot_id in self.snapshot_ids:
            try:
                self.compute._delete_snapshot(snapshot_id)
            except RegionVaultError as exc:  # delete the others all the same
                failed = failed or exc
        if failed is not None:
            raise failed

    def abort(self) -> None:
        """Give up on this restore: :meth:`discard`."""
        self.discard()
