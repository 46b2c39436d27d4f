"""A two-region local site run by real ``regionvault worker`` processes (Celery workers on a
private redis-server), for tests/celery: each region's workers get a site file holding that
region's keys alone (the other region's: only its public sealing key, as
tests/test_distributed_tick.py builds them), and the coordinator's site names the regions
with no keys at all. Every worker is started in a session of its own and stopped by its PID
(SIGTERM, then SIGKILL), never left running."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from regionvault.core.pipeline import Engine, Service
from regionvault.core.site import Region, Site
from regionvault.plugins.celery import plugin as celery_plugin
from regionvault.plugins.celery.kind import CELERY
from regionvault.plugins.celery.testing import WorkerProcess
from site_support import open_site, site_toml, worker_site

EAST, WEST = "local:east", "local:west"


def executor_table(broker: str, namespace: str, **settings: str) -> str:
    values = {
        "visibility_timeout": "4s",
        "lock_ttl": "2s",
        "queue_timeout": "30s",
        **settings,
    }
    lines = ["[executor]", 'kind = "celery"', f'broker = "{broker}"', f'namespace = "{namespace}"']
    lines += [f'{k} = "{v}"' for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Cluster:
    """The site files of a deployment, and its workers."""

    def __init__(self, tmp_path: Path, east: Region, west: Region, broker: str, **settings: str):
        self.tmp_path = tmp_path
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        table = executor_table(broker, self.namespace, **settings)
        self.files = {
            EAST: worker_site(tmp_path / "worker-east", east, west, replicate=True),
            WEST: worker_site(tmp_path / "worker-west", west, east, replicate=True),
        }
        for path in self.files.values():
            path.write_text(path.read_text() + "\n" + table)
        self.nowhere = tmp_path / "nowhere"
        self.coordinator_file = tmp_path / "coordinator" / "site.toml"
        self.coordinator_file.parent.mkdir()
        self.coordinator_file.write_text(
            site_toml(
                {EAST: self.nowhere / "east", WEST: self.nowhere / "west"},
                settings={"state_dir": tmp_path / "coordinator" / "state"},
                extra=table,
            )
        )
        self.workers: list[WorkerProcess] = []

    def start(self, *names: str) -> list[WorkerProcess]:
        """Start workers named ``east-1``, ``west-2``, ...: their region is the name's first
        part; all at once, then each waited for."""
        started = []
        for name in names:
            region = f"local:{name.split('-')[0]}"
            log = self.tmp_path / f"{name}.log"
            started.append(WorkerProcess(name, region, self.files[region], log))
        self.workers.extend(started)
        for worker in started:
            worker.wait_ready()
        return started

    def pids(self, region: str) -> dict[int, str]:
        return {w.pid: w.name for w in self.workers if w.region == region}

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            assert worker.proc.poll() is not None, worker.name

    def open_coordinator(self) -> Site:
        site = open_site(self.coordinator_file, celery_plugin)
        for region in site.regions:
            # the coordinator builds no region's compute, keys or vault
            region._build = _refuse  # type: ignore[method-assign]
        return site

    @contextlib.contextmanager
    def coordinator(self, **options: Any) -> Iterator[tuple[Service, Any]]:
        with self.open_coordinator() as site:
            engine = Engine(site)
            with CELERY.executor(engine, stop=options.get("stop")) as executor:
                yield Service(engine, executor=executor), executor
        assert not self.nowhere.exists()


def _refuse(service: str) -> Any:
    raise AssertionError(f"the coordinator built a region's {service}")


def runner_pid(runner: str | None) -> int:
    assert runner is not None
    return int(runner.rpartition(":")[2])
