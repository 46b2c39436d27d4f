"""The AWS provider's support for the conformance suite: a throwaway two-region site
(us-east-1 replicating to eu-west-1) on a moto server it starts, or on real AWS with
``REGIONVAULT_AWS_LIVE=1``; and test instances whose root disk is a seeded EBS snapshot.

    pytest --pyargs regionvault.core.conformance --regionvault-provider=aws

Environment: ``REGIONVAULT_AWS_ENDPOINT`` uses a moto server already running (for instance
one from ``scripts/moto-server``) instead of starting one.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.conformance.support import ConformanceSupport
from regionvault.core.errors import UnsupportedOperation
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG, NAME_TAG, AwsCompute
from regionvault.providers.aws.testing import (
    MotoServer,
    disk_blocks,
    dummy_credentials,
    live_mode,
    region_settings,
    seed_snapshot,
)

if TYPE_CHECKING:
    from regionvault.core.site import Region
    from regionvault.core.types import Instance

__all__ = ["ENDPOINT_ENV", "AwsConformanceSupport"]

ENDPOINT_ENV = "REGIONVAULT_AWS_ENDPOINT"
REGIONS = ("us-east-1", "eu-west-1")
GiB = 1024**3
_AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: the suite's checks that capture an instance launched from restored snapshots: moto
#: cannot show that path (its volumes hold nothing of the snapshots they come from, and its
#: EBS direct APIs cannot read a snapshot EC2 took), so they are skipped offline with this
#: reason and run live (REGIONVAULT_AWS_LIVE=1). Reading the restored snapshot instead
#: (the provider's capture_launched_from_snapshot) would check the restore, not the instance.
LAUNCHED_DATA_TESTS = (
    "test_launch_from_restored_data",
    "test_backup_copy_restore_launch_and_retain",
)
MOTO_LAUNCHED_DATA = (
    "moto cannot read what an instance launched from restored snapshots holds (its volumes "
    "are not tied to snapshots); the live suite checks it"
)


class AwsConformanceSupport(ConformanceSupport):
    def __init__(self) -> None:
        self._images: dict[str, str] = {}
        self.known_limits: Mapping[str, str] = (
            {} if live_mode() else dict.fromkeys(LAUNCHED_DATA_TESTS, MOTO_LAUNCHED_DATA)
        )

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        with contextlib.ExitStack() as stack:
            endpoint: str | None = None
            if not live_mode():
                stack.enter_context(dummy_credentials())
                endpoint = os.environ.get(ENDPOINT_ENV) or None
                if endpoint is None:
                    server = MotoServer(log=workdir / "moto-server.log")
                    endpoint = stack.enter_context(server).endpoint
            tag = uuid.uuid4().hex[:10]
            lines = ['[site]\nname = "conformance-aws"\n']
            for aws_region in REGIONS:
                settings = region_settings(aws_region, endpoint_url=endpoint, tag=tag)
                settings["instance_type"] = "t3.micro"
                lines.append(f'[regions."aws:{aws_region}"]')
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in settings.items())
                lines.append("")
            lines.append(f'[[replication]]\nfrom = "aws:{REGIONS[0]}"\nto = "aws:{REGIONS[1]}"\n')
            path = workdir / "site.toml"
            path.write_text("\n".join(lines), encoding="utf-8")
            yield path

    def _compute(self, region: Region) -> AwsCompute:
        compute = region.compute
        if not isinstance(compute, AwsCompute):
            raise UnsupportedOperation(
                "test instances outside the aws provider's Compute",
                provider=compute.provider,
                region=compute.region,
            )
        return compute

    def _image(self, compute: AwsCompute) -> str:
        where = compute.settings.aws_region
        if where not in self._images:
            if compute.settings.endpoint_url is None:
                ssm = compute._clients.client(compute.settings, "ssm")
                self._images[where] = str(ssm.get_parameter(Name=_AL2023)["Parameter"]["Value"])
            else:
                self._images[where] = str(
                    compute.ec2.register_image(
                        Name=f"rv-conformance-base-{uuid.uuid4().hex[:10]}",
                        RootDeviceName="/dev/xvda",
                        VirtualizationType="hvm",
                        Architecture="x86_64",
                    )["ImageId"]
                )
        return self._images[where]

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        """An instance whose root disk is ``data`` as a tar archive, seeded as an EBS
        snapshot through the EBS direct APIs and captured from it."""
        compute = self._compute(region)
        blocks, length = disk_blocks(data)
        snapshot = seed_snapshot(
            compute.ebs,
            blocks,
            volume_size_gib=max(1, math.ceil(length / GiB)),
            tags={"rv-conformance-seed": name},
        )
        every = {**tags, NAME_TAG: name, CAPTURE_SNAPSHOT_TAG: snapshot}
        answer = compute.ec2.run_instances(
            ImageId=self._image(compute),
            InstanceType=compute.settings.instance_type or "t3.micro",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in every.items()],
                }
            ],
        )
        return compute.get_instance(str(answer["Instances"][0]["InstanceId"]))

    def remove_instance(self, region: Region, instance: Instance) -> None:
        compute = self._compute(region)
        compute.terminate(instance.id)
        snapshot = instance.extra.get("capture_snapshot_id")
        if snapshot:
            compute._delete_snapshot(str(snapshot))
