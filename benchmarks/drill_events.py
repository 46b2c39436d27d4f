"""What reading a region's event log costs the drill planner (docs/operations.md, "Where it
is kept"): a local site whose destination holds one copy and N other events spread over two
days; times reading the whole log, the events since the day slot's start (what a daily
drill's planner decrypts) and one ``plan_drills`` of the region. Not a test: times vary.

    .venv/bin/python benchmarks/drill_events.py [N] (default 2000)
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.drills import plan_drills
from regionvault.core.pipeline.jobs import slot_of
from site_support import open_site, site_toml


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site" / "site.toml"
        path.parent.mkdir()
        path.write_text(site_toml(settings={"default_policy": "1-7", "state_dir": "state"}))
        final = datetime.now(UTC)
        start = final - timedelta(days=2)
        now = [start - timedelta(seconds=1)]
        with open_site(path) as site:
            engine = Engine(site, clock=lambda: now[0])
            data = Path(tmp) / "data"
            data.mkdir()
            (data / "f").write_bytes(random.randbytes(4096))
            tags = {"backup": "1-7", "backup-drill": "1d"}
            east = site.region("east")
            instance = east.compute.register_instance("vcu", data, function="sleep 300", tags=tags)
            engine.copy(engine.backup(instance.id).id, to="west")
            for i in range(n):
                now[0] = start + timedelta(seconds=i * 172800 / n)
                engine.record_event("local:west", "verify", None)
            now[0] = final
            repo = engine.repository("local:west", create=False)
            t = time.perf_counter()
            every = repo.events()
            whole = time.perf_counter() - t
            t = time.perf_counter()
            recent = repo.events(slot_of(final, timedelta(days=1)))
            part = time.perf_counter() - t
            t = time.perf_counter()
            plan = plan_drills(engine, "local:west", final)
            planned = time.perf_counter() - t
            print(f"whole log: {len(every)} events, {whole * 1000:.0f} ms")
            print(f"since the day slot's start: {len(recent)} events, {part * 1000:.0f} ms")
            print(f"plan_drills: {planned * 1000:.0f} ms, {len(plan.jobs)} job(s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
