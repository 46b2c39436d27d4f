"""The AWS provider registers and checks its settings without boto3, and declares what it
can do. None of these tests talks to AWS or needs boto3 installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.config import parse_site
from regionvault.core.errors import ConfigError
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.types import CaptureKind
from regionvault.providers.aws import plugin as aws_plugin
from regionvault.providers.aws.provider import AwsProvider

BLOCK_SDKS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("boto3", "botocore", "s3transfer", "moto"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def test_registers_and_validates_without_boto3(tmp_path: Path) -> None:
    code = BLOCK_SDKS + textwrap.dedent(
        """
        import json
        from regionvault.core.config import parse_site
        from regionvault.core.plugins import get_plugin_manager
        import regionvault.providers.aws.plugin
        import regionvault.providers.aws.testing

        pm, registry = get_plugin_manager()
        provider = registry.get("aws")
        site = parse_site(
            {"regions": {"aws:us-east-1": {"bucket": "rv-east", "kms_key": "alias/rv"}}},
            registry=registry,
        )
        provider.validate(site.region("us-east-1"))
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("boto3", "botocore"))
        print(json.dumps({"names": registry.names(), "loaded": loaded}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert "aws" in found["names"] and found["loaded"] == []


def _site(settings: dict[str, Any], region: str = "aws:us-east-1") -> None:
    registry = registry_from(make_plugin_manager(load_entry_points=False, plugins=[aws_plugin]))
    parse_site({"regions": {region: settings}}, source="site.toml", registry=registry)


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"bucket": "Bad_Bucket"}, "bucket", "not a valid S3 bucket"),
        ({"inbox_bucket": "x"}, "inbox_bucket", "not a valid S3 bucket"),
        ({"kms_key": "arn:aws:kms:eu-west-1:123456789012:key/k"}, "kms_key", "eu-west-1"),
        ({"kms_key": "my-key"}, "kms_key", "alias/<name>"),
        ({"aws_region": "Mars"}, "aws_region", "not an AWS region"),
        ({"create": "yes"}, "create", "true or false"),
        ({"multipart_part_size": 1024}, "multipart_part_size", "between"),
        ({"endpoint_url": "localhost:5000"}, "endpoint_url", "http"),
        ({"security_group_ids": "sg-1"}, "security_group_ids", "array"),
        ({"prefix": "/abs"}, "prefix", "leading '/'"),
        ({"buckets": "x"}, "buckets", "unknown setting"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as bad:
        _site(settings)
    assert bad.value.key == f'regions."aws:us-east-1".{key}'
    assert message in str(bad.value)
    assert str(bad.value).startswith("site.toml: ")


def test_region_name_is_the_aws_region_unless_given() -> None:
    _site({"bucket": "rv-east", "kms_key": "alias/rv"})
    with pytest.raises(ConfigError, match="aws_region"):
        _site({"bucket": "rv-east"}, region="aws:east")
    _site({"bucket": "rv-east", "aws_region": "us-east-1"}, region="aws:east")


def test_capabilities_are_declared() -> None:
    caps = AwsProvider.capabilities
    assert caps.worm_lock and caps.legal_hold and caps.conditional_put and caps.ranged_get
    assert caps.capture_kinds == frozenset({CaptureKind.BLOCKS}) and caps.launch
    assert not caps.register_instance and not caps.server_side_copy
    assert AwsProvider.required_settings == frozenset()
    assert {"bucket", "kms_key", "endpoint_url", "object_lock"} <= AwsProvider.optional_settings
