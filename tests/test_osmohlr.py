"""osmo-hlr (Osmocom's HLR) as a network function (plugins/osmohlr, docs/osmohlr.md): launched
as a local instance on a loopback address of its own, provisioned and queried over its VTY,
backed up under writes with the ``sqlite`` hook, copied, and launched in west on another
address, serving every subscriber committed before the capture began.

Skipped with the reason when osmo-hlr is not installed (``python -m
regionvault.plugins.osmohlr.package install``; scripts/test runs it)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import hookimpl
from regionvault.core.site import Region, Site
from regionvault.core.types import CaptureKind, Instance, LaunchSpec, Tags
from regionvault.plugins.osmohlr import ENDPOINT_FILE, hostname_for
from regionvault.plugins.osmohlr import plugin as osmohlr_plugin
from regionvault.plugins.osmohlr.demo import demo_subscriber
from regionvault.plugins.osmohlr.gsup import Gsup, GsupError
from regionvault.plugins.osmohlr.launcher import OWNER_ENV, owner_value
from regionvault.plugins.osmohlr.package import missing
from regionvault.plugins.osmohlr.plugin import Endpoint, endpoint, healthy
from regionvault.plugins.osmohlr.vty import Vty, VtyError
from site_support import open_site, site_toml

#: the tests that run osmo-hlr (the package's refusals and the demo's fallback run anyway)
needs_hlr = pytest.mark.skipif(missing() is not None, reason=missing() or "")

#: the tests own their instances: a killed test run leaves no osmo-hlr running (docs/osmohlr.md)
HLR = (
    f"exec env {OWNER_ENV}={owner_value()} "
    f"{shlex.quote(sys.executable)} -m regionvault.plugins.osmohlr"
)
#: subscribers provisioned before the writer starts
SEEDED = 30
#: subscribers the writer commits between the start of the capture and the database's copy
DURING = 20
#: the most the writer creates (it stops when told, well before)
WRITER_LIMIT = 20_000


def milenage_res_ck_ik(k: bytes, opc: bytes, rand: bytes) -> tuple[bytes, bytes, bytes]:
    """3GPP TS 35.206's f2 (RES), f3 (CK) and f4 (IK): what an authentication vector of a
    subscriber with these K and OPc must hold for ``rand``, whatever its SQN."""
    encrypt = Cipher(algorithms.AES(k), modes.ECB()).encryptor().update

    def xor(a: bytes, b: bytes) -> bytes:
        return bytes(x ^ y for x, y in zip(a, b, strict=True))

    temp = encrypt(xor(rand, opc))

    def out(rotate: int, constant: int) -> bytes:
        rotated = xor(temp, opc)
        rotated = rotated[rotate:] + rotated[:rotate]
        return xor(encrypt(xor(rotated, constant.to_bytes(16, "big"))), opc)

    return out(0, 1)[8:16], out(4, 2), out(8, 4)


def test_milenage_of_the_test_matches_3gpp_ts_35_207_test_set_1() -> None:
    res, ck, ik = milenage_res_ck_ik(
        bytes.fromhex("465b5ce8b199b49faa5f0a2ee238a6bc"),
        bytes.fromhex("cd63cb71954a9f4e48a5994e37a02baf"),
        bytes.fromhex("23553cbe9637a89d218ae64dae47bf35"),
    )
    assert res.hex() == "a54211d5e3ba50bf"
    assert ck.hex() == "b40ba9a3c58b2a05bbf0d987b21bf8cb"
    assert ik.hex() == "f769bcd751044604127672711c6d3441"


class CaptureWatch:
    """A plugin that notes which subscribers were acknowledged when the capture began, then
    holds the capture until the writer has committed ``DURING`` more (so writes run while the
    backup captures, whatever the speed of the machine)."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.before: list[str] | None = None
        #: acknowledged when the hold ended: every one committed before the sqlite hook's
        #: copy (the site's hooks run after the plugins' before_capture)
        self.held: list[str] | None = None
        self.began = threading.Event()

    @hookimpl
    def regionvault_before_capture(self, region: str, instance: Instance) -> None:
        writer = self.writer
        assert writer is not None
        self.before = writer.acked()
        self.began.set()
        deadline = time.monotonic() + 30
        while len(writer.acked()) < len(self.before) + DURING and time.monotonic() < deadline:
            if not writer.is_alive():
                break
            time.sleep(0.005)
        self.held = writer.acked()


class Writer(threading.Thread):
    """Creates subscribers one after another over the VTY (IMSI, then MSISDN, then Milenage
    K/OPc: three commits in osmo-hlr), noting each once osmo-hlr acknowledged all three."""

    def __init__(self, where: Endpoint, first: int) -> None:
        super().__init__(daemon=True)
        self.where, self.first = where, first
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._acked: list[str] = []
        self._lock = threading.Lock()

    def acked(self) -> list[str]:
        with self._lock:
            return list(self._acked)

    def run(self) -> None:
        try:
            with Vty(self.where.address, self.where.vty_port, timeout=10.0) as vty:
                vty.enable()
                for i in range(self.first, self.first + WRITER_LIMIT):
                    if self.stop.is_set():
                        return
                    imsi, msisdn, k, opc = demo_subscriber(i)
                    vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)
                    with self._lock:
                        self._acked.append(imsi)
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def hlr_site(tmp_path: Path) -> Iterator[tuple[Site, CaptureWatch, list[tuple[Region, str]]]]:
    """The two-region local site with the osmohlr plugin and a :class:`CaptureWatch`, and a
    list of what the test launched: each is terminated, and every osmo-hlr under this test's
    directory is checked gone (killed, and reported, if one is not)."""
    path = tmp_path / "site.toml"
    path.write_text(site_toml(name="hlr"))
    watch = CaptureWatch()
    launched: list[tuple[Region, str]] = []
    site = open_site(path, osmohlr_plugin, watch)
    try:
        yield site, watch, launched
    finally:
        for region, instance_id in launched:
            with contextlib.suppress(RegionVaultError):
                region.compute.terminate(instance_id)
        site.close()
        assert stop_leftovers(tmp_path) == []


def hlr_processes(under: Path) -> list[psutil.Process]:
    """osmo-hlr processes (and their launchers) whose working directory lies under ``under``."""
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


def stop_leftovers(under: Path) -> list[int]:
    leftovers = hlr_processes(under)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=10)
    return [proc.pid for proc in leftovers]


def launch_hlr(region: Region, name: str, launched: list[tuple[Region, str]]) -> Instance:
    spec = LaunchSpec(name=name, function=HLR, tags=Tags({"backup-hook": "sqlite"}))
    sink = region.compute.open_restore_sink(spec, CaptureKind.FILES)
    instance = region.compute.launch(spec, sink)
    launched.append((region, instance.id))
    return instance


def serving(region: Region, instance: Instance, timeout: float = 20.0) -> Endpoint:
    """The endpoint of ``instance`` once its health check passes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        where = endpoint(region.compute.get_instance(instance.id))
        if where is not None and healthy(where):
            return where
        time.sleep(0.05)
    log = Path(instance.extra["data_dir"]).parent / "output.log"
    raise AssertionError(f"osmo-hlr did not serve within {timeout}s:\n{log.read_text()[-2000:]}")


@needs_hlr
def test_an_hlr_backed_up_under_writes_serves_in_west_every_subscriber_committed_before(
    hlr_site: tuple[Site, CaptureWatch, list[tuple[Region, str]]],
) -> None:
    site, watch, launched = hlr_site
    east, west = site.region("east"), site.region("west")
    engine = Engine(site, health_timeout=20.0)
    hlr = launch_hlr(east, "hlr-1", launched)
    east_at = serving(east, hlr)
    with Vty(east_at.address, east_at.vty_port) as vty:
        vty.enable()
        for i in range(SEEDED):
            imsi, msisdn, k, opc = demo_subscriber(i)
            vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)

    writer = Writer(east_at, SEEDED)
    watch.writer = writer
    writer.start()
    try:
        # the capture begins with some of the writer's acknowledged (bounded wait)
        deadline = time.monotonic() + 30
        while not writer.acked() and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert writer.acked(), f"the writer acknowledged nothing: {writer.error}"
        point = engine.backup(hlr.id)
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    assert not writer.is_alive() and writer.error is None, writer.error
    assert watch.before is not None and watch.held is not None
    before, held, after = watch.before, watch.held, writer.acked()
    # the backup ran under writes: subscribers were committed after the capture began, and
    # DURING of them before the database's copy
    assert before and len(held) >= len(before) + DURING
    assert held == after[: len(held)]
    assert point.issues == 0

    copy = engine.copy(point.id, to=west.name).point
    restored = engine.restore(copy.id, region=west.name, launch=True, name="hlr-1-west")
    assert restored.instance is not None
    launched.append((west, restored.instance.id))
    assert restored.healthy, restored.health_error
    west_at = endpoint(west.compute.get_instance(restored.instance.id))
    assert west_at is not None
    # another loopback address, the same ports, while east's still serves
    assert west_at.address != east_at.address
    assert west_at.address.startswith("127.0.0.")
    assert (west_at.gsup_port, west_at.vty_port) == (east_at.gsup_port, east_at.vty_port)
    assert healthy(east_at) and healthy(west_at)
    assert west_at.probe_imsi == demo_subscriber(0)[0]

    seeded = [demo_subscriber(i)[0] for i in range(SEEDED)]
    with Vty(west_at.address, west_at.vty_port, timeout=10.0) as vty:
        vty.enable()
        for imsi in seeded + held:  # every one committed before the copy, during the hold too
            shown = vty.show_subscriber(imsi)
            assert shown is not None, f"{imsi} was committed before the copy, not in west"
            assert shown["MSISDN"] == demo_subscriber(int(imsi[5:]))[1]
            assert shown.get("3G auth") == "MILENAGE"
        in_west = [imsi for imsi, _ in vty.subscribers()]
    # and over GSUP, as west's MSC would ask: vectors computed from the restored K and OPc
    with Gsup(west_at.address, west_at.gsup_port, name="MSC-west", timeout=10.0) as gsup:
        for imsi in seeded + held:
            _, _, k, opc = demo_subscriber(int(imsi[5:]))
            vectors = gsup.send_auth_info(imsi)
            assert len(vectors) == 5
            for v in vectors:
                assert (v.res, v.ck, v.ik) == milenage_res_ck_ik(
                    bytes.fromhex(k), bytes.fromhex(opc), v.rand
                )
    # a consistent copy: the seeded ones and a prefix of the writer's, in order, no gaps, no
    # subscriber the writer never made
    written = [demo_subscriber(SEEDED + i)[0] for i in range(len(after) + 1)]
    assert in_west[:SEEDED] == seeded
    assert in_west[SEEDED:] == written[: len(in_west) - SEEDED]
    assert len(in_west) - SEEDED >= len(held)


@needs_hlr
def test_the_health_check_asks_the_instances_own_hlr(
    hlr_site: tuple[Site, CaptureWatch, list[tuple[Region, str]]], tmp_path: Path
) -> None:
    site, _, launched = hlr_site
    east = site.region("east")
    hlr = launch_hlr(east, "hlr-1", launched)
    where = serving(east, hlr)
    with Vty(where.address, where.vty_port) as vty:
        vty.enable()
        assert vty.hostname() == hostname_for(hlr.id)
    check = site.plugin_manager.hook.regionvault_health_check
    assert check(region=east.name, instance=east.compute.get_instance(hlr.id)) is True
    data = Path(hlr.extra["data_dir"])

    # a data directory restored from this one (another instance): the endpoint file names
    # this instance's hostname, so it is not the other's, and the other is not healthy
    other = Instance(
        "i-00000000000000aa", "copy", east.name, function=HLR, extra={"data_dir": str(data)}
    )
    assert endpoint(other) is None
    assert check(region=east.name, instance=other) is False
    # an endpoint file made to name the other, still pointing at this instance's osmo-hlr:
    # the VTY's running configuration names this one, so the other is still not healthy
    forged = tmp_path / "forged"
    (forged / ENDPOINT_FILE).parent.mkdir(parents=True)
    info = json.loads((data / ENDPOINT_FILE).read_text())
    info["hostname"] = hostname_for(other.id)
    (forged / ENDPOINT_FILE).write_text(json.dumps(info))
    forged_instance = Instance(
        other.id, "forged", east.name, function=HLR, extra={"data_dir": str(forged)}
    )
    assert endpoint(forged_instance) is not None
    assert check(region=east.name, instance=forged_instance) is False
    # a probe subscriber osmo-hlr does not hold: not healthy
    info["hostname"] = hostname_for(hlr.id)
    info["probe_imsi"] = "001019999999999"
    assert healthy(Endpoint(info["address"], 4222, info["vty_port"], info["hostname"], None))
    assert not healthy(
        Endpoint(info["address"], 4222, info["vty_port"], info["hostname"], "001019999999999")
    )
    # another plugin's function: not this plugin's to judge
    sample = Instance("i-00000000000000bb", "s", east.name, function="python3 -m something")
    assert osmohlr_plugin.regionvault_health_check(region=east.name, instance=sample) is None

    # terminate stops the launcher and its osmo-hlr, and the address is free again
    pids = json.loads((data / ENDPOINT_FILE).read_text())
    east.compute.terminate(hlr.id)
    for pid in (pids["pid"], pids["hlr_pid"]):
        assert gone(pid), f"process {pid} still runs after terminate"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@needs_hlr
def test_the_vty_client_names_what_osmo_hlr_refused(
    hlr_site: tuple[Site, CaptureWatch, list[tuple[Region, str]]],
) -> None:
    site, _, launched = hlr_site
    east = site.region("east")
    where = serving(east, launch_hlr(east, "hlr-1", launched))
    imsi, msisdn, k, opc = demo_subscriber(7)
    with Vty(where.address, where.vty_port) as vty:
        vty.enable()
        assert vty.show_subscriber(imsi) is None
        assert vty.subscribers() == []
        vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)
        with pytest.raises(VtyError, match=r"create: % Subscriber already exists") as err:
            vty.create_subscriber(imsi)
        assert "\n" not in str(err.value)
        with pytest.raises(VtyError, match=r"IMSI '0010x' must be 6 to 15 digits"):
            vty.create_subscriber("0010x")
        with pytest.raises(VtyError, match=r"K and OPc must be 32 hex digits") as err:
            vty.create_subscriber(demo_subscriber(8)[0], k="00" * 15, opc=opc)
        assert opc not in str(err.value)  # key material is never quoted
        assert vty.show_subscriber(demo_subscriber(8)[0]) is None  # refused before sending
        assert vty.subscribers() == [(imsi, msisdn)]
    with Gsup(where.address, where.gsup_port) as gsup:
        (first, *_) = gsup.send_auth_info(imsi)
        assert (first.res, first.ck, first.ik) == milenage_res_ck_ik(
            bytes.fromhex(k), bytes.fromhex(opc), first.rand
        )
        assert k not in repr(first) and first.res is not None and first.res.hex() not in repr(first)
        unknown = demo_subscriber(9)[0]
        with pytest.raises(GsupError, match=rf"SendAuthInfo for {unknown}: IMSI unknown in HLR$"):
            gsup.send_auth_info(unknown)
        # the connection still serves after an error
        assert len(gsup.send_auth_info(imsi)) == 5
    with pytest.raises(OSError):
        Vty("127.0.0.1", 1, timeout=1.0)


def test_an_error_osmo_hlr_quotes_keys_in_is_told_without_them() -> None:
    vty = Vty.__new__(Vty)
    vty.address, vty.port = "127.0.0.1", 4258
    k, opc = "000102030405060708090a0b0c0d0e0f", "101112131415161718191A1B1C1D1E1F"
    output = f"subscriber imsi 001010000000001 update aud3g milenage k {k} opc {opc}\n% bad {k}"
    error = vty._fail("update aud3g", output, (k, opc.lower()))
    assert str(error) == "osmo-hlr VTY at 127.0.0.1:4258: update aud3g: % bad <hidden>"
    error = vty._fail("update aud3g", output.split("\n")[0], (k, opc.lower()))
    assert k not in str(error) and opc not in str(error) and "<hidden>" in str(error)


@needs_hlr
def test_the_launcher_says_in_one_line_when_its_address_is_taken(
    hlr_site: tuple[Site, CaptureWatch, list[tuple[Region, str]]], tmp_path: Path
) -> None:
    import subprocess

    site, _, launched = hlr_site
    east = site.region("east")
    where = serving(east, launch_hlr(east, "hlr-1", launched))
    data = tmp_path / "second"
    done = subprocess.run(
        [sys.executable, "-m", "regionvault.plugins.osmohlr", "--address", where.address],
        env={**os.environ, "REGIONVAULT_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"osmohlr: no address {where.address} with ports 4222, 4258 and 4259 free for "
        "osmo-hlr (0 started, none answered)"
    ]
    assert not (data / ENDPOINT_FILE).exists()


@needs_hlr
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_osmo_hlr_ends_with_its_launcher_signalled_alone(tmp_path: Path, sig: int) -> None:
    """SIGTERM to the launcher alone is passed to osmo-hlr (exit 0); SIGKILL takes osmo-hlr
    along through its parent-death signal."""
    import subprocess

    data = tmp_path / "data"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "regionvault.plugins.osmohlr", "--data", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (data / ENDPOINT_FILE).exists() and time.monotonic() < deadline:
            assert launcher.poll() is None, "the launcher exited before osmo-hlr served"
            time.sleep(0.05)
        hlr_pid = json.loads((data / ENDPOINT_FILE).read_text())["hlr_pid"]
        assert not gone(hlr_pid)
        launcher.send_signal(sig)
        code = launcher.wait(timeout=20)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not gone(hlr_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(hlr_pid), f"osmo-hlr {hlr_pid} outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=20)
        assert stop_leftovers(tmp_path) == []


def test_package_install_refuses_in_one_line_without_root_or_apt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from regionvault.core import debian
    from regionvault.plugins.osmohlr import package

    monkeypatch.setattr(package, "find_binary", lambda: None)
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    assert package.install() == (
        "osmo-hlr is missing and there is no apt-get here: install osmo-hlr by hand"
    )
    monkeypatch.setattr(debian.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    assert package.install() == (
        "osmo-hlr is missing and installing it needs root: apt-get install osmo-hlr"
    )

    # no service starts while apt-get runs: a policy-rc.d refusing them, removed afterwards;
    # a machine's own is left alone
    policy = tmp_path / "policy-rc.d"
    with package._no_service_starts(policy):
        assert policy.read_text().splitlines()[-1] == "exit 101"
        assert os.access(policy, os.X_OK)
    assert not policy.exists()
    policy.write_text("#!/bin/sh\nexit 0\n")
    with package._no_service_starts(policy):
        assert policy.read_text() == "#!/bin/sh\nexit 0\n"
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_the_demo_falls_back_to_the_sample_function_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.plugins.osmohlr import package
    from regionvault.plugins.samplenf.demo import SampleFunction, run_demo

    monkeypatch.setattr(package, "missing", lambda: "osmo-hlr is not installed: (reason)")
    lines: list[str] = []
    try:
        figures = run_demo(tmp_path / "demo", say=lines.append)
    finally:
        leftovers = stop_sample_functions(tmp_path)
    assert leftovers == []
    assert lines[0] == (
        f"network function: {SampleFunction.label}, since osmo-hlr is not installed: (reason)"
    )
    assert figures["same_state"] is True
    (step2,) = [ln for ln in lines if ln.startswith("2. ")]
    assert " in east on http://127.0.0.1:" in step2 and ": 40 subscribers" in step2


def stop_sample_functions(under: Path) -> list[int]:
    """Sample functions still running from ``under`` 10 s after the demo ended (its
    terminate signals their process group, and waits for the shell that runs them only)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "regionvault.plugins.samplenf" in " ".join(proc.info["cmdline"] or []) and (
                proc.cwd().startswith(str(under))
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    _, alive = psutil.wait_procs(found, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return [proc.pid for proc in alive]


@needs_hlr
def test_the_demo_uses_osmo_hlr_when_installed(tmp_path: Path) -> None:
    from regionvault.plugins.samplenf.demo import run_demo

    lines: list[str] = []
    try:
        figures = run_demo(tmp_path / "demo", say=lines.append)
    finally:
        leftovers = stop_leftovers(tmp_path)
    assert leftovers == []
    assert lines[0] == "network function: osmo-hlr, Osmocom's HLR (regionvault.plugins.osmohlr)"
    assert figures["same_state"] is True
    (step2,) = [ln for ln in lines if ln.startswith("2. ")]
    (step7,) = [ln for ln in lines if ln.startswith("7. ")]
    assert " on 127.0.0." in step2 and "(GSUP 4222, VTY 4258): 40 subscribers" in step2
    assert "(same as east)" in step7
    east_address = step2.split(" on ", 1)[1].split(" ", 1)[0]
    west_address = step7.split(" on ", 1)[1].split(" ", 1)[0]
    assert east_address != west_address
