"""What osmohlr's installer and the demo leave behind when they are killed (review rev1, M1-M3):
nothing machine-wide, and nothing running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import psutil
import pytest
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.hooks import HOOK_WORK_DIR
from regionvault.plugins.osmohlr import ENDPOINT_FILE, package
from regionvault.plugins.osmohlr import plugin as osmohlr_plugin
from regionvault.plugins.osmohlr.launcher import OWNER_ENV, owner_value
from site_support import open_site, site_toml

_HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from regionvault.plugins.osmohlr import package\n"
    "with package._no_service_starts(Path(sys.argv[1])):\n"
    "    print('in', flush=True)\n"
    "    time.sleep(60)\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_install_removes_its_policy_rc_d(tmp_path: Path, sig: signal.Signals) -> None:
    policy = tmp_path / "policy-rc.d"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "in\n"
        assert policy.read_text().splitlines()[-1] == "exit 101"
        proc.send_signal(sig)
        proc.communicate(timeout=20)
        assert proc.returncode == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)
    assert not policy.exists()


def test_a_leftover_policy_rc_d_of_ours_is_removed_by_the_next_install(tmp_path: Path) -> None:
    # what a SIGKILLed install leaves: recognised by its content, reused, then removed
    policy = tmp_path / "policy-rc.d"
    policy.write_text(package._REFUSE_STARTS)
    with package._no_service_starts(policy):
        assert policy.read_text() == package._REFUSE_STARTS
    assert not policy.exists()
    # one line more is the machine's own: left as it is
    own = package._REFUSE_STARTS + "# kept\n"
    policy.write_text(own)
    with package._no_service_starts(policy):
        pass
    assert policy.read_text() == own


def test_opening_an_engine_removes_the_hook_copies_a_killed_backup_left(tmp_path: Path) -> None:
    # a backup killed mid-hook leaves its sqlite copy (K and OPc in plain text for osmo-hlr)
    # in the state directory: the next command that opens the site removes it, hooks or not
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml({"local:east": "east"}, name="stale"))
    site = open_site(path)
    try:
        root = site.config.state_dir / HOOK_WORK_DIR
        (root / "999-dead" / "sqlite").mkdir(parents=True)
        (root / "999-dead" / "sqlite" / "0.db").write_bytes(b"K" * 100)
        (root / "999-dead.lock").touch()
        Engine(site)
        assert list(root.iterdir()) == []
    finally:
        site.close()


CLI = "from regionvault.core.cli import main; main()"
needs_hlr = pytest.mark.skipif(package.missing() is not None, reason=package.missing() or "")


def osmo_hlr_under(under: Path) -> list[psutil.Process]:
    """osmo-hlr processes and their launchers whose working directory lies under ``under``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "osmo-hlr" not in (proc.info["name"] or "") and osmohlr_plugin.MARKER not in cmdline:
                continue
            if proc.cwd().startswith(str(under)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def gone_within(under: Path, seconds: float) -> list[int]:
    """The pids of osmo-hlr processes under ``under`` still there after ``seconds`` (killed)."""
    _, alive = psutil.wait_procs(osmo_hlr_under(under), timeout=seconds)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return [proc.pid for proc in alive]


@needs_hlr
def test_a_launcher_stops_osmo_hlr_when_its_owner_is_gone(tmp_path: Path) -> None:
    """The owner watch (the demo's instances): SIGKILL of the owner ends osmo-hlr and the
    launcher, which also removes its endpoint file on the way out."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    data = tmp_path / "data"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "regionvault.plugins.osmohlr", "--data", str(data)],
        env={**os.environ, OWNER_ENV: owner_value(owner.pid)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (data / ENDPOINT_FILE).exists() and time.monotonic() < deadline:
            assert launcher.poll() is None, "the launcher exited before osmo-hlr served"
            time.sleep(0.05)
        assert (data / ENDPOINT_FILE).exists()
        owner.kill()
        owner.wait(timeout=20)
        out, _ = launcher.communicate(timeout=30)
        assert launcher.returncode == 0
        assert f"osmohlr: owner {owner.pid} is gone: stopping osmo-hlr" in out
        assert not (data / ENDPOINT_FILE).exists()
    finally:
        for proc in (owner, launcher):
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=20)
        assert gone_within(tmp_path, 10) == []


@needs_hlr
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_killed_demo_leaves_no_osmo_hlr_running(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM and SIGHUP run the demo's cleanup (instances terminated, directory removed);
    after SIGKILL the launchers see their owner gone and stop osmo-hlr."""
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-c", CLI, "demo", "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines = []
        for _ in range(20):  # bounded: the demo prints about ten lines
            line = demo.stdout.readline()
            lines.append(line)
            if not line or line.startswith("2. "):
                break
        assert lines[-1].startswith("2. "), lines
        assert osmo_hlr_under(workdir) != []
        demo.send_signal(sig)
        demo.communicate(timeout=60)
        assert demo.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
        # the owner watch polls once a second; osmo-hlr is then stopped with SIGTERM
        assert gone_within(workdir, 20) == []
        assert workdir.exists() == (sig == signal.SIGKILL)
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.communicate(timeout=20)
        gone_within(tmp_path, 10)


def test_the_demo_falls_back_when_osmo_hlr_has_no_free_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from regionvault.plugins.osmohlr import demo as osmohlr_demo
    from regionvault.plugins.samplenf.demo import SampleFunction, pick_function

    monkeypatch.setattr(package, "missing", lambda: None)
    taken = {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    free: list[str] = []
    monkeypatch.setattr(
        osmohlr_demo,
        "ports_free",
        lambda address: address not in taken and not free.append(address),
    )
    # one address free is not enough: the demo runs two instances at once
    monkeypatch.setattr(
        osmohlr_demo, "loopback_addresses", lambda: iter(["127.0.0.1", "127.0.0.2", "127.0.0.4"])
    )
    function, line = pick_function()
    assert isinstance(function, SampleFunction)
    assert line == (
        f"network function: {SampleFunction.label}, since osmo-hlr is installed but ports "
        "4222/4258/4259 are taken on every loopback address but at most one"
    )
    taken.clear()
    function, line = pick_function()
    assert line == f"network function: {osmohlr_demo.OsmoHlrFunction.label}"


class _Exits:
    """A network function whose process says why and exits at once (as the launcher does
    when it finds no free address)."""

    label = "a function that exits"
    function = "echo 'first line'; echo 'osmohlr: no loopback address free (0 started)'; exit 1"
    tags: ClassVar[dict[str, str]] = {}

    def ready(self, instance: object) -> None:
        return None


def test_the_demo_stops_waiting_when_the_function_exits_and_says_why(tmp_path: Path) -> None:
    from regionvault.core.errors import RegionVaultError
    from regionvault.plugins.samplenf.demo import run_demo

    with pytest.raises(RegionVaultError) as caught:
        run_demo(tmp_path / "demo", say=lambda line: None, function=_Exits())
    assert str(caught.value) == (
        "a function that exits did not start in east (its process exited): "
        "osmohlr: no loopback address free (0 started)"
    )


@needs_hlr
def test_osmo_hlr_without_its_ctrl_port_is_stopped_and_not_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """osmo-hlr keeps running when another process holds CTRL (bound after ports_free
    looked): the launcher stops it rather than announce a CTRL port that is not its own."""
    import socket

    from regionvault.plugins.osmohlr import launcher

    address = next(a for a in launcher.loopback_addresses() if launcher.ports_free(a))
    binary = package.find_binary()
    assert binary is not None
    data = tmp_path / "data"
    data.mkdir()
    spawned: list[subprocess.Popen[bytes]] = []
    with socket.socket() as holder:
        holder.bind((address, launcher.CTRL_PORT))
        holder.listen()
        try:
            child = launcher._start(binary, data, address, "hlr-ctrl", 20.0, spawned.append)
        finally:
            for proc in spawned:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=20)
    assert child is None
    assert f"osmohlr: CTRL {address}:4259 is not osmo-hlr's (taken): stopping it" in (
        capsys.readouterr().out
    )
    assert spawned[0].returncode is not None
