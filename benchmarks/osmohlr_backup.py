"""osmo-hlr with N subscribers, backed up while a writer adds more, copied, and launched in the
other region: how long each step takes, and what the restored HLR serves.

    .venv/bin/python benchmarks/osmohlr_backup.py --subscribers 10000

Two local regions in a temporary directory (removed afterwards); osmo-hlr launched in east
through the plugin's launcher, provisioned over its VTY (IMSI, MSISDN, Milenage K/OPc: three
commits each), backed up with ``backup-hook=sqlite`` while a second VTY session keeps
creating subscribers, copied to west, restored and launched there on another loopback
address. Prints one JSON object; docs/osmohlr.md quotes the figures. Needs osmo-hlr
(``python -m regionvault.plugins.osmohlr.package install``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine
from regionvault.core.site import Site
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.plugins.osmohlr.demo import demo_subscriber
from regionvault.plugins.osmohlr.package import missing
from regionvault.plugins.osmohlr.plugin import Endpoint, endpoint, healthy
from regionvault.plugins.osmohlr.vty import Vty
from regionvault.plugins.samplenf.demo import SITE  # the demo's two regions


def serving(site: Site, region: str, instance_id: str, timeout: float = 30.0) -> Endpoint:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        where = endpoint(site.region(region).compute.get_instance(instance_id))
        if where is not None and healthy(where):
            return where
        time.sleep(0.05)
    raise RegionVaultError(f"osmo-hlr {instance_id} did not serve in {region}")


def run(workdir: Path, subscribers: int) -> dict[str, Any]:
    (workdir / "site.toml").write_text(SITE)
    site = Site.load(workdir / "site.toml")
    engine = Engine(site, health_timeout=60.0)
    east, west = site.region("east"), site.region("west")
    launched: list[tuple[Any, str]] = []
    figures: dict[str, Any] = {"subscribers": subscribers}
    try:
        function = f"exec {shlex.quote(sys.executable)} -m regionvault.plugins.osmohlr"
        spec = LaunchSpec(name="hlr-1", function=function, tags=Tags({"backup-hook": "sqlite"}))
        hlr = east.compute.launch(spec, east.compute.open_restore_sink(spec, CaptureKind.FILES))
        launched.append((east, hlr.id))
        where = serving(site, "east", hlr.id)

        started = time.monotonic()
        with Vty(where.address, where.vty_port, timeout=30.0) as vty:
            vty.enable()
            for i in range(subscribers):
                imsi, msisdn, k, opc = demo_subscriber(i)
                vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)
        seconds = time.monotonic() - started
        figures["provision_per_second"] = round(subscribers / seconds)
        db = Path(hlr.extra["data_dir"]) / "hlr.db"
        figures["db_bytes"] = db.stat().st_size + Path(f"{db}-wal").stat().st_size

        stop, written = threading.Event(), [0]

        def writer() -> None:
            with Vty(where.address, where.vty_port, timeout=30.0) as vty:
                vty.enable()
                i = subscribers
                while not stop.is_set() and i < subscribers + 1_000_000:
                    imsi, msisdn, k, opc = demo_subscriber(i)
                    vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)
                    i += 1
                    written[0] += 1

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.2)
        before = written[0]
        started = time.monotonic()
        point = engine.backup(hlr.id)
        figures["backup_seconds"] = round(time.monotonic() - started, 2)
        figures["written_during_backup"] = written[0] - before
        stop.set()
        thread.join(timeout=60)
        figures["point_bytes"] = point.size
        figures["point_issues"] = point.issues

        started = time.monotonic()
        result = engine.copy(point.id, to=west.name)
        figures["copy_seconds"] = round(time.monotonic() - started, 2)
        figures["bytes_moved"] = result.bytes_moved

        restored = engine.restore(result.point.id, region=west.name, launch=True)
        assert restored.instance is not None
        launched.append((west, restored.instance.id))
        figures["rto_seconds"] = restored.seconds_to_healthy and round(
            restored.seconds_to_healthy, 2
        )
        west_at = endpoint(west.compute.get_instance(restored.instance.id))
        assert west_at is not None
        figures["east_address"], figures["west_address"] = where.address, west_at.address
        with Vty(west_at.address, west_at.vty_port, timeout=60.0) as vty:
            vty.enable()
            figures["served_in_west"] = len(vty.subscribers())
        return figures
    finally:
        for region, instance_id in launched:
            with contextlib.suppress(RegionVaultError):
                region.compute.terminate(instance_id)
        site.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="regionvault-hlr-bench-"))
    try:
        print(json.dumps(run(workdir, args.subscribers), indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
