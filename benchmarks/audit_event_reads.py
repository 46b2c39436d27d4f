"""What an audit reads of a long event log: event objects fetched (GETs under ``events/``)
against the events the log holds, on the local provider (docs/audit.md, "What an audit
costs"). Not a test: counts, not times.

    .venv/bin/python benchmarks/audit_event_reads.py [--old 3000] [--recent 50]

The log: ``--old`` events written 60 days ago (an old, busy log), then one backup, a verify
and ``--recent`` more events now, in east (policy 1-7, no copy). Then ``audit`` (the
window its controls need: the longest retention plus a frequency and a tick, the longest
drill interval plus a tick, or the verify age limit, whichever is longest) and ``audit
--events --since 1d`` are measured: each reads from the first sequence number at or after
its time, found by a bisection of the listing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.audit import audit, region_events
from regionvault.core.repository import RepositorySettings
from site_support import open_site, site_toml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=int, default=3000)
    parser.add_argument("--recent", type=int, default=50)
    args = parser.parse_args()
    settings = RepositorySettings(pack_size=1 << 20, workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "site.toml"
        path.write_text(site_toml(settings={"state_dir": "state"}, replicate=None))
        with open_site(path) as site:
            east = site.region("east")
            data = root / "data"
            data.mkdir()
            (data / "a.bin").write_bytes(random.Random(1).randbytes(100_000))
            inst = east.compute.register_instance("nf", data, tags={"backup": "1-7"})
            now = datetime.now(UTC)
            engine = Engine(site, clock=lambda: now, settings=settings)
            engine.repository("east")
            past = Engine(site, clock=lambda: now - timedelta(days=60), settings=settings)
            for _ in range(args.old):
                past.record_event("east", "prune", None, packs_deleted=0)
            engine.backup(inst.id)
            engine.verify("east")
            for _ in range(args.recent):
                engine.record_event("east", "prune", None, packs_deleted=0)

            gets = 0
            vault_type: Any = type(east.vault)
            real_get = vault_type.get

            def counting_get(self: Any, name: str, *a: Any, **k: Any) -> bytes:
                nonlocal gets
                if name.startswith("events/"):
                    gets += 1
                return bytes(real_get(self, name, *a, **k))

            vault_type.get = counting_get
            try:
                report = audit(Engine(site, clock=lambda: now, settings=settings))
                reads = report.event_reads["local:east"]
                print(
                    f"audit: {reads['events_fetched']} of {reads['events_in_log']} events "
                    f"fetched (from seq {reads['from_seq']}, window from {reads['since']}); "
                    f"GETs under events/: {gets}; ok={report.ok}"
                )
                gets = 0
                log = region_events(engine, "east", now - timedelta(days=1))
                print(
                    f"audit --events --since 1d: {log.fetched} of {log.listed} events fetched "
                    f"(from seq {log.first_seq}), {len(log.events)} listed; GETs: {gets}"
                )
            finally:
                vault_type.get = real_get


if __name__ == "__main__":
    main()
