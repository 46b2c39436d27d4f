"""The health wait of a launch (core/pipeline/launch.py ``await_healthy``) and how long it
may last: ``[launch] health_timeout`` in site.toml, per region, ``restore
--health-timeout``, and the default a provider declares (AWS: EC2's status checks take
minutes). Review rev5 findings 1, 2 and 12."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_support import run
from regionvault.core.config import parse_site
from regionvault.core.errors import ComputeError, ConfigError, InstanceNotFound, TransientError
from regionvault.core.interfaces import CloudHealth
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline import launch as launching
from regionvault.core.pipeline.engine import DEFAULT_HEALTH_TIMEOUT
from regionvault.core.plugins import make_plugin_manager
from regionvault.core.site import Site
from regionvault.core.types import Capabilities, Instance
from site_support import open_site, site_toml

EAST, WEST = "local:east", "local:west"


def _site(tmp_path: Path, extra: str) -> Iterator[Site]:
    path = tmp_path / "site.toml"
    path.write_text(site_toml({EAST: tmp_path / "east", WEST: tmp_path / "west"}, extra=extra))
    with open_site(path) as site:
        yield site


def test_health_timeout_from_site_region_and_engine(tmp_path: Path) -> None:
    extra = '[launch]\nhealth_timeout = "20m"\n[launch.regions.west]\nhealth_timeout = "90s"\n'
    site = next(_site(tmp_path, extra))
    engine = Engine(site)
    assert engine.health_timeout_of(EAST) == 1200.0
    assert engine.health_timeout_of("west") == 90.0
    assert Engine(site, health_timeout=5.0).health_timeout_of(WEST) == 5.0  # --health-timeout


def test_health_timeout_default_and_provider_declared(tmp_path: Path) -> None:
    site = next(_site(tmp_path, ""))
    engine = Engine(site)
    assert engine.health_timeout_of(EAST) == DEFAULT_HEALTH_TIMEOUT
    slow = SimpleNamespace(
        name="aws:eu-west-1",
        compute=SimpleNamespace(capabilities=Capabilities(launch_health_timeout=900.0)),
    )
    assert engine.health_timeout_of(slow) == 900.0  # type: ignore[arg-type]


def test_aws_declares_minutes_for_its_status_checks() -> None:
    aws = pytest.importorskip("regionvault.providers.aws.provider")
    declared = aws.AwsProvider.capabilities.launch_health_timeout
    assert declared is not None and declared >= 600


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        ("[launch]\nhealth_timeout = 60\n", "launch.health_timeout", "must be a string"),
        ('[launch]\nhealth_timeout = "0s"\n', "launch.health_timeout", "greater than zero"),
        ('[launch]\nhealth_timeout = "soon"\n', "launch.health_timeout", ""),
        ('[launch]\ntimeout = "1m"\n', "launch.timeout", "unknown key"),
        ('[launch.regions.north]\nhealth_timeout = "1m"\n', 'launch.regions."north"', "north"),
        ('[launch.regions.east]\nwait = "1m"\n', 'launch.regions."east".wait', "unknown key"),
    ],
)
def test_bad_launch_table_is_named(tmp_path: Path, extra: str, key: str, says: str) -> None:
    text = site_toml({EAST: tmp_path / "east", WEST: tmp_path / "west"}, extra=extra)
    import tomllib

    with pytest.raises(ConfigError) as caught:
        parse_site(tomllib.loads(text), source="site.toml", base_dir=tmp_path)
    assert caught.value.key == key or key in str(caught.value)
    assert says in str(caught.value)


def test_restore_health_timeout_option_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(site_toml({EAST: tmp_path / "east", WEST: tmp_path / "west"}))
    bad = run("--site", path, "restore", "abc", "-r", "east", "--launch", "--health-timeout", "x")
    assert bad.exit_code == 2 and "--health-timeout" in bad.stderr
    zero = run("--site", path, "restore", "abc", "-r", "east", "--launch", "--health-timeout", "0")
    assert zero.exit_code == 2 and "greater than zero" in zero.stderr
    both = run(
        "--site", path, "restore", "abc", "-r", "east", "--target", tmp_path / "t",
        "--health-timeout", "5m",
    )  # fmt: skip
    assert both.exit_code == 2 and "cannot be used together" in both.stderr


# ---------------------------------------------------------------------- the wait


class _Compute:
    """A compute whose cloud checks answer from ``answers`` in turn (the last one stays)."""

    def __init__(self, answers: list[Callable[[], CloudHealth | None]]) -> None:
        self.answers = answers
        self.calls = 0
        self.instance = Instance(id="i-1", name="nf", region=WEST, state="running")

    def get_instance(self, instance_id: str) -> Instance:
        return self.instance

    def cloud_health(self, instance: Instance) -> CloudHealth | None:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]()


def _wait(compute: _Compute, timeout: float) -> tuple[float | None, str | None]:
    region: Any = SimpleNamespace(name=WEST, compute=compute)
    pm = make_plugin_manager(load_entry_points=False)
    started = launching.time.monotonic()
    return launching.await_healthy(
        region, compute.instance, started, timeout=timeout, plugin_manager=pm
    )


def _raise(exc: Exception) -> Callable[[], CloudHealth | None]:
    def answer() -> CloudHealth | None:
        raise exc

    return answer


def test_not_found_and_throttling_right_after_launch_are_not_yet() -> None:
    compute = _Compute(
        [
            _raise(InstanceNotFound("i-1", provider="aws", region=WEST)),
            _raise(TransientError("Throttling: rate exceeded", provider="aws", region=WEST)),
            lambda: CloudHealth(False, "instance status initializing"),
            lambda: CloudHealth(True),
        ]
    )
    rto, why = _wait(compute, timeout=30)
    assert why is None and rto is not None
    assert compute.calls == 4


def test_not_found_after_the_grace_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launching, "_NOT_FOUND_GRACE", 0.0)
    compute = _Compute([_raise(InstanceNotFound("i-1", provider="aws", region=WEST))])
    rto, why = _wait(compute, timeout=30)
    assert rto is None and why is not None and "InstanceNotFound" in why


def test_throttled_until_the_deadline_is_not_healthy() -> None:
    compute = _Compute([_raise(TransientError("Throttling", provider="aws", region=WEST))])
    rto, why = _wait(compute, timeout=0.3)
    assert rto is None and why is not None
    assert "not healthy after 0.3s" in why and "Throttling" in why


def test_other_errors_end_the_wait_at_once() -> None:
    compute = _Compute([_raise(ComputeError("access denied", provider="aws", region=WEST))])
    rto, why = _wait(compute, timeout=30)
    assert rto is None and why is not None and "access denied" in why
    assert compute.calls == 1


def test_a_status_call_slower_than_the_deadline_is_not_healthy() -> None:
    release = launching.threading.Event()

    def slow() -> CloudHealth | None:
        release.wait(10)  # bounded: the test releases it
        return CloudHealth(True)

    compute = _Compute([slow])
    try:
        rto, why = _wait(compute, timeout=0.2)
    finally:
        release.set()
    assert rto is None and why is not None and "did not answer" in why


def test_timedelta_config_is_seconds() -> None:
    from regionvault.core.config import LaunchConfig

    config = LaunchConfig(timedelta(minutes=15), {WEST: timedelta(seconds=30)})
    assert config.health_timeout_of(WEST) == timedelta(seconds=30)
    assert config.health_timeout_of(EAST) == timedelta(minutes=15)


# ---------------------------------------------------------------------- ignored facts


def _facts_region(provider: str, applies: str | None) -> Any:
    caps = Capabilities(launch_facts_of=applies)
    return SimpleNamespace(
        name=f"{provider}:x", compute=SimpleNamespace(provider=provider, capabilities=caps)
    )


def test_launch_facts_ignored_by_the_compute_are_named() -> None:
    from regionvault.core.pipeline.launch import ignored_facts

    facts = {"aws": 1, "key_name": "ops", "user_data": "c2VjcmV0"}
    (line,) = ignored_facts(_facts_region("azure", None), facts)
    assert (
        line
        == "launch facts recorded by aws at capture (key_name, user_data): not applied by azure"
    )
    assert "ops" not in line and "c2VjcmV0" not in line
    assert ignored_facts(_facts_region("aws", "aws"), facts) == ()
    # another version's key: the AWS compute does not claim facts it cannot read
    assert ignored_facts(_facts_region("gcp", "gcp"), facts) != ()


def test_a_point_of_the_compute_s_own_provider_recording_no_facts_says_so() -> None:
    from regionvault.core.pipeline.launch import ignored_facts

    old: Any = SimpleNamespace(region="aws:eu-west-1", lineage=None)
    (line,) = ignored_facts(_facts_region("aws", "aws"), {}, old)
    assert line.startswith("launch facts: the point records none")
    copied: Any = SimpleNamespace(
        region="local:west", lineage=SimpleNamespace(source_region="aws:us-east-1")
    )
    assert ignored_facts(_facts_region("aws", "aws"), {}, copied) != ()
    assert ignored_facts(_facts_region("local", None), {}, old) == ()
    local_point: Any = SimpleNamespace(region="local:east", lineage=None)
    assert ignored_facts(_facts_region("aws", "aws"), {}, local_point) == ()
