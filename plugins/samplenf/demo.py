"""``regionvault demo``: the patent's system end to end on one machine, in a minute or less.

Two local regions in a temporary directory; a sample network function (subscriber state on
disk, a health check on loopback) launched in east; the tagger tags it; east backs it up
under east's keys; the copy crosses to west under west's keys; east's keys fail on west's
copy; west restores and launches the function, which serves the same state; then RPO, RTO and
the bytes moved over transit, and everything is cleaned up.

The command registers like any plugin's, through the ``regionvault.cli`` entry-point group
(``demo = "regionvault.plugins.samplenf.demo:demo"``): the core never names it.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from regionvault.core.cli import ExpectedError

__all__ = ["run_demo"]

SITE = """\
[site]
name = "demo"
default_policy = "1-7"
state_dir = "state"

[regions."local:east"]
root = "east"

[regions."local:west"]
root = "west"

[[replication]]
from = "local:east"
to = ["local:west"]
"""

SUBSCRIBERS = 40


def _get(url: str) -> dict[str, Any]:
    import urllib.request  # here, not at the top: `regionvault --help` imports this module

    with urllib.request.urlopen(url, timeout=2.0) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _post(url: str) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=2.0) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def run_demo(workdir: Path, say: Any = print) -> dict[str, Any]:
    """Run the demo in ``workdir`` (which must be empty or absent); return its figures."""
    from regionvault.core.errors import KeyAccessDenied, RegionVaultError
    from regionvault.core.interfaces import FileSink
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import Repository
    from regionvault.core.site import Site
    from regionvault.core.types import CaptureKind, LaunchSpec
    from regionvault.plugins.samplenf.plugin import endpoint

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.toml").write_text(SITE, encoding="utf-8")
    site = Site.load(workdir / "site.toml")
    engine = Engine(site, health_timeout=20.0)
    east, west = site.region("east"), site.region("west")
    launched: list[tuple[Any, str]] = []
    try:
        say(f"1. two regions in {workdir}: {east.name} and {west.name}, each with its own keys")
        function = f"{shlex.quote(sys.executable)} -m regionvault.plugins.samplenf"
        spec = LaunchSpec(name="vcore-1", function=function)
        sink = east.compute.open_restore_sink(spec, CaptureKind.FILES)
        assert isinstance(sink, FileSink)
        started = time.monotonic()
        nf = east.compute.launch(spec, sink)
        launched.append((east, nf.id))
        base = None
        while base is None and time.monotonic() - started < 20:
            base = endpoint(east.compute.get_instance(nf.id))
            time.sleep(0.05)
        if base is None:
            raise RegionVaultError("the sample network function did not start in east")
        for i in range(SUBSCRIBERS):
            _post(f"{base}/attach?imsi=00101{i:010d}")
        east_state = _get(f"{base}/state")
        say(
            f"2. launched network function {nf.name} ({nf.id}) in east: "
            f"{len(east_state['subscribers'])} subscribers, state {east_state['digest'][:12]}"
        )

        report = engine.tag(east.name)
        tagged = ", ".join(f"{t.name}={t.value}" for t in report.tagged) or "nothing"
        say(f"3. tagger: tagged {tagged} ({site.config.tag_key}=<every>-<keep>)")

        point = engine.backup(nf.id)
        say(
            f"4. backed up in east under east's keys: point {point.id[:12]}, "
            f"{point.size:,} bytes, expires {point.expires_at:%Y-%m-%d}"
        )

        result = engine.copy(point.id, to=west.name)
        copy = result.point
        say(
            f"5. copied to west, re-encrypted under west's keys: point {copy.id[:12]}, "
            f"{result.chunks_sent} chunks, {result.bytes_moved:,} bytes over transit"
        )

        try:
            Repository.open(west.vault, east.keys, region=west.name).points()
            raise RegionVaultError("east's keys read west's vault: key isolation is broken")
        except KeyAccessDenied as exc:
            refused_on = exc.message.split(":")[0]
            say(f"6. east's keys on west's copy: refused ({type(exc).__name__} on {refused_on})")

        restored = engine.restore(copy.id, region=west.name, launch=True, name="vcore-1-west")
        if restored.instance is not None:
            launched.append((west, restored.instance.id))  # terminated below, healthy or not
        if restored.instance is None or not restored.healthy:
            raise RegionVaultError("the restored network function did not become healthy in west")
        west_base = endpoint(restored.instance)
        if west_base is None:
            raise RegionVaultError("the restored network function has no endpoint")
        west_state = _get(f"{west_base}/state")
        same = west_state["digest"] == east_state["digest"]
        say(
            f"7. launched {restored.instance.name} ({restored.instance.id}) in west from the "
            f"copy: healthy, {len(west_state['subscribers'])} subscribers, state "
            f"{west_state['digest'][:12]} ({'same' if same else 'DIFFERENT'} as east)"
        )
        if not same:
            raise RegionVaultError("the function in west serves different state than east")

        rows = {(r.instance_id, r.region): r for r in engine.status()}
        rpo = rows[(nf.id, west.name)].rpo_seconds
        rto = restored.seconds_to_healthy
        say(
            f"8. RPO in west: {rpo:.1f}s (age of the data in the newest copy); "
            f"RTO in west: {rto:.2f}s (restore request to healthy); "
            f"transit: {result.bytes_moved:,} bytes"
        )
        return {
            "point": point.id,
            "copy": copy.id,
            "bytes_moved": result.bytes_moved,
            "rpo_seconds": rpo,
            "rto_seconds": rto,
            "same_state": same,
        }
    finally:
        for region, instance_id in launched:
            with contextlib.suppress(RegionVaultError):
                region.compute.terminate(instance_id)
        site.close()


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's directory instead of deleting it.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Run in this directory.")
def demo(keep: bool, directory: Path | None) -> None:
    """Run the two-region demo on the local provider, then clean up."""
    workdir = directory or Path(tempfile.mkdtemp(prefix="regionvault-demo-"))
    if directory is not None and directory.exists() and any(directory.iterdir()):
        raise ExpectedError(f"{directory} is not empty")
    started = time.monotonic()
    try:
        run_demo(workdir, say=click.echo)
    finally:
        if keep:
            click.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"demo finished in {time.monotonic() - started:.1f}s")
