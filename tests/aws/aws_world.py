"""What an AWS test sees: a fresh provider, region configs with names unique to the test,
and raw boto3 clients for checking what landed where (imported by tests/aws)."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

from regionvault.core.config import SERVICES
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.aws.provider import AwsProvider
from regionvault.providers.aws.testing import region_settings

EAST = "us-east-1"
WEST = "eu-west-1"


class AwsWorld:
    """One test's view of AWS: a fresh provider (fresh metrics), region configs with names
    unique to the test, and raw boto3 clients for checking what landed where."""

    def __init__(self, endpoint: str | None, base_dir: Path) -> None:
        self.endpoint = endpoint
        self.base_dir = base_dir
        self.provider = AwsProvider()
        self.tag = uuid.uuid4().hex[:10]
        self._services: list[Any] = []
        self._images: dict[str, str] = {}
        self.instances: list[tuple[str, str]] = []

    @property
    def live(self) -> bool:
        return self.endpoint is None

    def settings(self, aws_region: str, **extra: Any) -> dict[str, Any]:
        settings = region_settings(aws_region, endpoint_url=self.endpoint, tag=self.tag)
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, aws_region: str, **extra: Any) -> RegionConfig:
        """``aws:<aws_region>`` with test settings (``extra`` overrides, None removes)."""
        settings = self.settings(aws_region, **extra)
        return RegionConfig(
            id=RegionId("aws", aws_region),
            settings=settings,
            services={svc: ServiceConfig("aws", settings) for svc in SERVICES},
            base_dir=self.base_dir,
            source="test-site.toml",
        )

    def track(self, service: Any) -> Any:
        self._services.append(service)
        return service

    def client(self, service: str, aws_region: str) -> Any:
        """A raw boto3 client, outside the provider's metrics."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            service,
            region_name=aws_region,
            endpoint_url=self.endpoint,
            config=Config(s3={"addressing_style": "path"}) if self.endpoint else None,
        )

    def base_image(self, aws_region: str) -> str:
        """An image to run test instances from: a registered one in moto (listing moto's
        ~1,300 built-in images takes a second), Amazon Linux's latest in live mode."""
        if self.live:
            ssm = self.client("ssm", aws_region)
            name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
            return str(ssm.get_parameter(Name=name)["Parameter"]["Value"])
        ec2 = self.client("ec2", aws_region)
        return str(
            ec2.register_image(
                Name=f"rv-test-base-{self.tag}",
                RootDeviceName="/dev/xvda",
                BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 1}}],
                VirtualizationType="hvm",
                Architecture="x86_64",
            )["ImageId"]
        )

    def run_instance(
        self, aws_region: str, tags: dict[str, str], *, instance_type: str = "t3.micro"
    ) -> str:
        """One instance (its own reservation, as separate launches are) with ``tags``."""
        if aws_region not in self._images:
            self._images[aws_region] = self.base_image(aws_region)
        kwargs: dict[str, Any] = {
            "ImageId": self._images[aws_region],
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
        }
        if tags:
            kwargs["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ]
        instance_id = str(
            self.client("ec2", aws_region).run_instances(**kwargs)["Instances"][0]["InstanceId"]
        )
        self.instances.append((aws_region, instance_id))
        return instance_id

    def close(self) -> None:
        for service in self._services:
            with contextlib.suppress(Exception):
                service.close()
        if self.live:  # moto is reset before the next test; real AWS is cleaned up here
            for aws_region, instance_id in self.instances:
                with contextlib.suppress(Exception):
                    self.client("ec2", aws_region).terminate_instances(InstanceIds=[instance_id])
