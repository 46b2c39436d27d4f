"""``regionvault demo``: the patent's system end to end on one machine, in a minute or less.

Two local regions in a temporary directory; a network function launched in east (Osmocom's
HLR, plugins/osmohlr, when osmo-hlr is installed, else the sample network function:
subscriber state on disk, a health check on loopback; a line says which); the tagger tags
it; east backs it up under east's keys; the copy crosses to west under west's keys; east's
keys fail on west's copy; west restores and launches the function, which serves the same
state; then RPO, RTO and the bytes moved over transit, and everything is cleaned up.

The command registers like any plugin's, through the ``regionvault.cli`` entry-point group
(``demo = "regionvault.plugins.samplenf.demo:demo"``): the core never names it.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from regionvault.core.cli import ExpectedError

__all__ = ["SampleFunction", "pick_function", "run_demo"]

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


class SampleFunction:
    """The demo's network function when osmo-hlr is not installed: the sample function.

    Any object with these members will do (``regionvault.plugins.osmohlr.demo`` gives
    osmo-hlr's): ``label``, ``function`` (the command line), ``tags`` (the instance's own),
    ``ready(instance)`` (None until it serves, then a handle), ``where(handle)`` (where it
    serves, in words), ``provision(handle, count)`` and ``state(handle)`` (the number of
    subscribers and a digest of what it serves)."""

    label = "the sample network function (regionvault.plugins.samplenf)"
    tags: dict[str, str] = {}  # noqa: RUF012 (read only)

    def __init__(self) -> None:
        self.function = f"{shlex.quote(sys.executable)} -m regionvault.plugins.samplenf"

    def ready(self, instance: Any) -> str | None:
        from regionvault.plugins.samplenf.plugin import endpoint

        return endpoint(instance)

    def where(self, base: str) -> str:
        return base

    def provision(self, base: str, count: int) -> None:
        for i in range(count):
            _post(f"{base}/attach?imsi=00101{i:010d}")

    def state(self, base: str) -> tuple[int, str]:
        state = _get(f"{base}/state")
        return len(state["subscribers"]), str(state["digest"])


def pick_function() -> tuple[Any, str]:
    """osmo-hlr's demo function when osmo-hlr is installed, else the sample function; and
    one line saying which, and why."""
    from regionvault.plugins.osmohlr.demo import OsmoHlrFunction, ports_taken
    from regionvault.plugins.osmohlr.package import missing

    reason = missing() or ports_taken()
    if reason is None:
        function: Any = OsmoHlrFunction()
        return function, f"network function: {function.label}"
    sample = SampleFunction()
    return sample, f"network function: {sample.label}, since {reason}"


def _last_line(log: Path) -> str:
    """The last non-empty line of an instance's output log ("" when there is none)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_demo(workdir: Path, say: Any = print, function: Any = None) -> dict[str, Any]:
    """Run the demo in ``workdir`` (which must be empty or absent); return its figures.
    ``function``: the network function (:class:`SampleFunction`'s members); by default
    osmo-hlr when it is installed, else the sample function (:func:`pick_function`)."""
    from regionvault.core.errors import KeyAccessDenied, RegionVaultError
    from regionvault.core.interfaces import FileSink
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import Repository
    from regionvault.core.site import Site
    from regionvault.core.types import CaptureKind, LaunchSpec, Tags

    if function is None:
        function, which = pick_function()
        say(which)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.toml").write_text(SITE, encoding="utf-8")
    site = Site.load(workdir / "site.toml")
    engine = Engine(site, health_timeout=20.0)
    east, west = site.region("east"), site.region("west")
    launched: list[tuple[Any, str]] = []
    try:
        say(f"1. two regions in {workdir}: {east.name} and {west.name}, each with its own keys")
        spec = LaunchSpec(name="vcore-1", function=function.function, tags=Tags(function.tags))
        sink = east.compute.open_restore_sink(spec, CaptureKind.FILES)
        assert isinstance(sink, FileSink)
        started = time.monotonic()
        nf = east.compute.launch(spec, sink)
        launched.append((east, nf.id))
        base = None
        exited = False
        while base is None and not exited and time.monotonic() - started < 20:
            current = east.compute.get_instance(nf.id)
            exited = current.state != "running"  # its process is gone: it will not answer
            base = function.ready(current)
            time.sleep(0.05)
        if base is None:
            why = _last_line(Path(str(current.extra.get("log", ""))))
            raise RegionVaultError(
                f"{function.label} did not start in east"
                + (" (its process exited)" if exited else "")
                + (f": {why}" if why else "")
            )
        function.provision(base, SUBSCRIBERS)
        east_count, east_digest = function.state(base)
        say(
            f"2. launched network function {nf.name} ({nf.id}) in east on "
            f"{function.where(base)}: "
            f"{east_count} subscribers, state {east_digest[:12]}"
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
        west_base = function.ready(restored.instance)
        if west_base is None:
            raise RegionVaultError("the restored network function has no endpoint")
        west_count, west_digest = function.state(west_base)
        same = west_digest == east_digest
        say(
            f"7. launched {restored.instance.name} ({restored.instance.id}) in west on "
            f"{function.where(west_base)} from the copy: healthy, {west_count} subscribers, state "
            f"{west_digest[:12]} ({'same' if same else 'DIFFERENT'} as east)"
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

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # so that the cleanup below runs

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        run_demo(workdir, say=click.echo)
    finally:
        if keep:
            click.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"demo finished in {time.monotonic() - started:.1f}s")
