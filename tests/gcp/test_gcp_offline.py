"""No offline GCP test sends a request beyond 127.0.0.1: the proof.

One backup-like round trip drives a GcpProvider's services with the unmodified Google
clients against the offline stack (gcp-storage-emulator, the Cloud KMS gRPC fake, the
Compute Engine REST fake): region gcp:east wraps and unwraps a data key on its KMS key
(which gcp:west's key ring refuses), stores an object encrypted under it in its bucket and
reads it back (whole and a range), seals a secret for gcp:west with west's public key only,
sends it through west's inbox, where west lists, receives, unseals and discards it; east
lists its labelled instances with a server-side label filter and captures one (snapshot, a
disk made from it attached to the worker, read through the device, then every snapshot and
temporary disk removed: the long-running operations polled through operation clients of
the same endpoint).

It runs twice (and a third test shows the guards catch what they are for):

- in a child process inside a network namespace of its own (``unshare -rn``: a user and
  network namespace whose only interface is the loopback, brought up first): there, any
  request for a real endpoint (a DNS lookup, a connection, the metadata server) fails, so
  the round trip passing shows it needs nothing beyond 127.0.0.1, whatever the transport
  (gRPC's C core included). The child first checks that it really is cut off. Where
  unprivileged namespaces are not permitted the test is skipped with the reason;
- in this process with an audit hook (``sys.addaudithook``) on ``socket.connect``,
  ``socket.getaddrinfo``, ``socket.sendto`` and ``http.client.connect``, recording every
  address the Python-level clients (storage, compute, google-auth) resolve or connect to:
  all must be the loopback. gRPC connects in C, below the hook: the targets of the channels
  the KMS clients make are recorded where they are made, and the namespace run covers it;
- the hazard itself, in the namespace only: the SDK's ``ExtendedOperation.result()``
  against the Compute Engine fake polls compute.googleapis.com; it fails there and the hook
  names the lookup. Without that, a guard that never fails would prove nothing.

Run as a script (``python test_gcp_offline.py WORKDIR --isolated [--sdk-poller]``) the
module performs the round trip (or the hazard) and prints its summary as JSON; that is what
the namespace child runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

EAST, WEST = "gcp:east", "gcp:west"
PROJECT = "rv-offline"
ZONE = "europe-west1-b"
#: the disk of the instance the round trip captures: data, a hole, more data
DISK = b"boot sector " * 1000 + bytes(1 << 20) + b"\x5a" * 4096
#: a name no offline run may resolve, and an address of TEST-NET-1 (RFC 5737): both are
#: unreachable inside the namespace, which the child checks before anything else
PUBLIC_NAME = "storage.googleapis.com"
PUBLIC_ADDRESS = "192.0.2.1"


# --------------------------------------------------------------------------- the round trip


def _site(workdir: Path, storage: str, kms: dict[str, str], compute: str, device_dir: Path) -> Any:
    """A two-region site of the offline stack: anonymous logins, every endpoint loopback."""
    from regionvault.core.config import parse_site
    from regionvault.core.plugins import make_plugin_manager, registry_from
    from regionvault.providers.gcp import plugin as gcp_plugin

    run = uuid.uuid4().hex[:8]
    regions = {}
    for region, location, zone in (
        (EAST, "europe-west1", ZONE),
        (WEST, "us-central1", "us-central1-a"),
    ):
        name = region.partition(":")[2]
        regions[region] = {
            "project": PROJECT,
            "location": location,
            "zone": zone,
            "credentials": "anonymous",
            "storage_endpoint": storage,
            "kms_endpoint": kms[region],
            "kms_plaintext": True,
            "compute_endpoint": compute,
            "create": True,
            "bucket": f"rv-{run}-{name}",
            "inbox_bucket": f"rv-{run}-{name}-inbox",
            "worker_instance": "rv-worker",
            "device_dir": str(device_dir),
            "poll_interval": 0.01,
            "operation_timeout": 60,
        }
    pm = make_plugin_manager(load_entry_points=False, plugins=[gcp_plugin])
    registry = registry_from(pm)
    site = parse_site(
        {"regions": regions, "replication": [{"from": EAST, "to": WEST}]},
        registry=registry,
        base_dir=workdir,
        source=str(workdir / "site.toml"),
    )
    return registry.get("gcp"), site.region("east"), site.region("west")


def round_trip(workdir: Path) -> dict[str, Any]:
    """Start the offline stack, run the round trip, stop everything; a summary of what was
    done and counted (the assertions that matter are here: any failure raises)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from regionvault.core.errors import KeyAccessDenied
    from regionvault.core.interfaces import BlockCapture
    from regionvault.providers.gcp.emulator import GcsEmulator
    from regionvault.providers.gcp.fakes.compute import GceFake
    from regionvault.providers.gcp.fakes.kms import KmsFake

    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        emulator = GcsEmulator()
        emulator.start()
        stack.callback(emulator.stop)
        kms = {}
        for region in (EAST, WEST):
            fake = KmsFake()
            kms[region] = fake.start()
            stack.callback(fake.stop)
        gce = GceFake(
            project=PROJECT, zone=ZONE, state_dir=workdir / "gce", worker_instance="rv-worker"
        )
        compute_endpoint = gce.start()
        stack.callback(gce.stop)
        gce.seed_instance(
            "nf-vcu", disks=[DISK], machine_type="e2-standard-2", labels={"backup": "1-7"}
        )
        gce.seed_instance("nf-other", disks=[b"x"], machine_type="e2-small", labels={})

        provider, east, west = _site(
            workdir, emulator.endpoint, kms, compute_endpoint, gce.device_dir
        )
        summary: dict[str, Any] = {
            "endpoints": [emulator.endpoint, compute_endpoint, *kms.values()]
        }
        keys_a = provider.key_service(east)
        keys_b = provider.key_service(west)
        vault_a = provider.vault(east)
        transit = provider.transit(east, west)
        compute_a = provider.compute(east)
        for service in (keys_a, keys_b, vault_a, transit, compute_a):
            stack.callback(service.close)

        # keys: a data key wrapped by Encrypt on east's key, bound to its context
        context = {"vault": "offline", "kind": "pack", "name": "packs/00/p1"}
        data_key = keys_a.generate_data_key(context)
        assert keys_a.unwrap(data_key.wrapped, context) == data_key.plaintext
        assert data_key.plaintext not in data_key.wrapped
        try:  # west's key ring cannot open what east's wrapped
            keys_b.unwrap(data_key.wrapped, context)
        except KeyAccessDenied:
            pass
        else:
            raise AssertionError("gcp:west unwrapped a data key of gcp:east")

        # vault: an object encrypted under it, if-absent, read whole and by range
        nonce = os.urandom(12)
        body = nonce + AESGCM(data_key.plaintext).encrypt(nonce, DISK, b"packs/00/p1")
        vault_a.put("packs/00/p1", body, if_absent=True)
        assert vault_a.get("packs/00/p1") == body
        assert vault_a.get("packs/00/p1", offset=12, length=100) == body[12:112]
        listed = [info.name for info in vault_a.list("packs/")]
        assert listed == ["packs/00/p1"], listed
        stored = vault_a.get("packs/00/p1")
        assert AESGCM(data_key.plaintext).decrypt(stored[:12], stored[12:], b"packs/00/p1") == DISK

        # transit: sealed with west's public key only, through west's inbox
        secret = os.urandom(32)
        seal_context = {"vault": "offline-west", "kind": "transfer-key", "name": "copy-1"}
        sealed = provider.sealer(west).seal(secret, seal_context)
        transit.send("copy-1", sealed)
        assert transit.has("copy-1")
        inbox = list(transit.inbox())
        assert inbox == ["copy-1"], inbox
        assert keys_b.unseal(transit.receive("copy-1"), seal_context) == secret
        transit.discard("copy-1")
        assert list(transit.inbox()) == []
        summary["bytes_sent"] = transit.bytes_sent

        # compute: a server-side label filter, then a capture through the worker
        found = [i.name for i in compute_a.list_instances(tag_filters={"backup": None})]
        assert found == ["nf-vcu"], found
        instance = next(iter(compute_a.list_instances(tag_filters={"backup": "1-7"})))
        covered, end = 0, 0  # non-zero bytes of DISK the capture yielded (holes may be left out)
        with compute_a.capture(instance.id) as capture:
            assert isinstance(capture, BlockCapture), capture
            for offset, data in capture.blocks():
                assert offset >= end, f"blocks out of order or overlapping at {offset}"
                end = offset + len(data)
                expected = DISK[offset : offset + len(data)]
                assert data[: len(expected)] == expected, f"captured bytes differ at {offset}"
                assert not any(data[len(expected) :]), f"bytes past the disk's data at {offset}"
                covered += len(expected) - expected.count(0)
        summary["captured"] = covered
        # the capture's snapshot and temporary disk are gone, nothing is left on the worker
        assert gce.snapshot_names() == [], gce.snapshot_names()
        assert sorted(gce.disk_names()) == ["nf-other-0", "nf-vcu-0", "rv-worker-0"]
        assert [d["deviceName"] for d in gce.instance("rv-worker")["disks"]] == [
            "persistent-disk-0"
        ]
        summary["usage"] = provider.metrics.snapshot().by_operation()
        return summary


# --------------------------------------------------------------------------- the namespace


def _loopback_up() -> None:
    """``ip link set lo up`` without iproute2: SIOCSIFFLAGS with IFF_UP on ``lo``."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _cut_off() -> dict[str, str]:
    """How this process fails to reach beyond the loopback (raises if it can)."""
    seen: dict[str, str] = {}
    try:
        socket.getaddrinfo(PUBLIC_NAME, 443)
    except OSError as exc:
        seen["resolve"] = type(exc).__name__
    else:
        raise AssertionError(f"{PUBLIC_NAME} resolved: this is not an isolated namespace")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((PUBLIC_ADDRESS, 443))  # routing only: no packet is sent
        except OSError as exc:
            assert exc.errno == errno.ENETUNREACH, exc
            seen["route"] = errno.errorcode[exc.errno]
        else:
            raise AssertionError(f"{PUBLIC_ADDRESS} is routable: not an isolated namespace")
    return seen


def sdk_poller(workdir: Path) -> dict[str, Any]:
    """The hazard the guards exist for, run ONLY inside the namespace: a disk inserted with
    the SDK's own ``DisksClient.insert`` against the Compute Engine fake, and its
    ``ExtendedOperation.result()``, which polls through an operations client built without
    the configured endpoint: the public API. What the call and the audit hook saw."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1
    from regionvault.providers.gcp.fakes.compute import GceFake

    recorder = AddressRecorder()
    gce = GceFake(project=PROJECT, zone=ZONE, state_dir=workdir / "poller", operation_polls=2)
    endpoint = gce.start()
    try:
        with recorder:
            client = compute_v1.DisksClient(
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": endpoint},
            )
            operation = client.insert(
                project=PROJECT, zone=ZONE, disk_resource=compute_v1.Disk(name="d", size_gb=10)
            )
            try:
                operation.result(timeout=30)
                error = None
            except Exception as exc:  # whatever the SDK raises for an unreachable host
                error = type(exc).__name__
    finally:
        gce.stop()
    return {"error": error, "off_loopback": recorder.off_loopback()}


def _child_main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    isolated = "--isolated" in argv
    summary: dict[str, Any] = {}
    if isolated:
        _loopback_up()
        summary["cut_off"] = _cut_off()  # raises unless nothing beyond the loopback answers
    if "--sdk-poller" in argv:
        if not isolated:  # it would send a request to compute.googleapis.com
            raise SystemExit("--sdk-poller runs only with --isolated")
        summary["poller"] = sdk_poller(workdir)
    else:
        recorder = AddressRecorder()
        with recorder:
            summary |= round_trip(workdir)
        summary["addresses"] = sorted(recorder.addresses)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- the audit hook


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, ``localhost``, and 127.x as an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1``, what a dual-stack socket such as gRPC's shows; Python 3.11's
    ``is_loopback`` says False for it)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


_RECORDERS: list[AddressRecorder] = []
_HOOK_INSTALLED = threading.Lock()
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDERS:
        return
    host: Any = None
    if event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address:
            host = address[0]
        else:
            return  # an AF_UNIX path: not the network
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "http.client.connect"):
        host = args[1] if event == "http.client.connect" else args[0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    for recorder in _RECORDERS:
        recorder.addresses.add(f"{event} {host}")


class AddressRecorder:
    """Every host a Python-level client resolved or connected to while active."""

    def __init__(self) -> None:
        self.addresses: set[str] = set()

    def __enter__(self) -> AddressRecorder:
        global _hooked
        with _HOOK_INSTALLED:
            if not _hooked:  # an audit hook cannot be removed: one per process, idle if unused
                sys.addaudithook(_audit)
                _hooked = True
        _RECORDERS.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        _RECORDERS.remove(self)

    def off_loopback(self) -> list[str]:
        return [e for e in sorted(self.addresses) if not _is_loopback(e.partition(" ")[2])]


# --------------------------------------------------------------------------- the tests


def _needs_the_stack() -> None:
    for module in ("emulator", "fakes.compute", "fakes.kms", "kms", "storage", "compute"):
        try:
            __import__(f"regionvault.providers.gcp.{module}")
        except ModuleNotFoundError as exc:
            pytest.fail(f"the offline round trip needs {exc.name}", pytrace=False)


def _environment() -> dict[str, str]:
    """The child's environment: this interpreter's scripts first (the emulator's command),
    no proxy (a proxy variable would send loopback requests elsewhere), no login."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")
        and not k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_"))
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def _namespace_refusal() -> str | None:
    """Why ``unshare -rn`` cannot run here, or None when it can."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        [unshare, "-rn", sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"unprivileged network namespaces are not permitted here: {probe.stderr.strip()}"
    return None


def _in_namespace(workdir: Path, *flags: str) -> dict[str, Any]:
    """Run this module as a child in a user + network namespace of its own; its summary."""
    refusal = _namespace_refusal()
    if refusal is not None:
        pytest.skip(f"{refusal} (the audit-hook test still runs)")
    result = subprocess.run(
        ["unshare", "-rn", sys.executable, __file__, str(workdir), "--isolated", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env=_environment(),
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    # really cut off: no name resolves, no address beyond the loopback is routable
    assert summary["cut_off"] == {"resolve": "gaierror", "route": "ENETUNREACH"}
    return summary


def test_the_round_trip_runs_in_a_network_namespace_with_only_the_loopback(
    tmp_path: Path,
) -> None:
    _needs_the_stack()
    summary = _in_namespace(tmp_path / "ns")
    assert summary["captured"] == len(DISK) - DISK.count(0)
    usage = summary["usage"]
    assert usage.get("kms Encrypt", 0) >= 1 and usage.get("kms Decrypt", 0) >= 1
    assert usage.get("kms GetPublicKey", 0) >= 1 and usage.get("kms AsymmetricDecrypt", 0) == 1
    assert usage.get("storage POST upload", 0) >= 2 and usage.get("storage GET media", 0) >= 2
    assert summary["bytes_sent"] > 0
    assert all("127.0.0.1" in endpoint for endpoint in summary["endpoints"]), summary
    # inside the namespace too, the Python-level clients used the loopback only
    assert summary["addresses"], summary
    assert all(_is_loopback(a.partition(" ")[2]) for a in summary["addresses"]), summary


def test_the_guards_catch_the_sdks_own_operation_poller(tmp_path: Path) -> None:
    """Both guards can fail: the research's hazard (``ExtendedOperation.result()`` polls the
    public Compute Engine API, whatever endpoint the client was given), run where it cannot
    leave the machine, fails in the namespace and is seen by the audit hook."""
    pytest.importorskip("google.cloud.compute_v1")
    summary = _in_namespace(tmp_path / "poller", "--sdk-poller")
    assert summary["poller"]["error"] is not None, summary
    assert summary["poller"]["off_loopback"] == ["socket.getaddrinfo compute.googleapis.com"]


def _host_of(target: str) -> str:
    """The host of a gRPC target (``127.0.0.1:P``, ``[::1]:P``, ``dns:///name:443``)."""
    target = target.rpartition("///")[2] if "///" in target else target
    return target.rpartition(":")[0].strip("[]")


def test_every_address_a_python_client_uses_is_the_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit hook sees the HTTP clients' sockets; gRPC connects in C, so the channels'
    targets are recorded where they are made (``grpc.insecure_channel``/``secure_channel``,
    which the KMS transport calls)."""
    _needs_the_stack()
    import grpc

    channels: list[str] = []
    for name in ("insecure_channel", "secure_channel"):
        real = getattr(grpc, name)

        def recording(target: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            channels.append(target)
            return _real(target, *args, **kwargs)

        monkeypatch.setattr(grpc, name, recording)
    recorder = AddressRecorder()
    with recorder:
        summary = round_trip(tmp_path / "audit")
    assert recorder.addresses, "the hook saw nothing: it is not recording the clients"
    # the storage and compute clients connect from Python: the hook must have seen them
    connects = {a for a in recorder.addresses if a.startswith("socket.connect ")}
    assert connects, sorted(recorder.addresses)
    assert recorder.off_loopback() == [], recorder.off_loopback()
    # both regions' KMS clients, each on its loopback fake
    assert len(set(channels)) >= 2, channels
    assert all(_is_loopback(_host_of(target)) for target in channels), channels
    assert summary["captured"] == len(DISK) - DISK.count(0)


def test_the_hook_sees_an_attempt_beyond_the_loopback() -> None:
    """The recorder is not blind: a lookup and a (routing-only) connect of a public address
    are recorded and reported, whatever the network here answers."""
    recorder = AddressRecorder()
    with recorder:
        with contextlib.suppress(OSError):
            socket.getaddrinfo("regionvault-offline.invalid", 443)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.connect((PUBLIC_ADDRESS, 9))
    assert recorder.off_loopback() == [
        f"socket.connect {PUBLIC_ADDRESS}",
        "socket.getaddrinfo regionvault-offline.invalid",
    ]


def test_the_stack_listens_on_the_loopback_only(tmp_path: Path) -> None:
    """What the fakes and the emulator bind is on 127.0.0.1: nothing else on this machine
    (or beyond) can reach the offline stack."""
    _needs_the_stack()
    import psutil
    from regionvault.providers.gcp.emulator import GcsEmulator
    from regionvault.providers.gcp.fakes.compute import GceFake
    from regionvault.providers.gcp.fakes.kms import KmsFake

    with contextlib.ExitStack() as stack:
        emulator = GcsEmulator()
        emulator.start()
        stack.callback(emulator.stop)
        kms = KmsFake()
        kms_address = kms.start()
        stack.callback(kms.stop)
        gce = GceFake(project=PROJECT, zone=ZONE, state_dir=tmp_path / "gce")
        gce_url = gce.start()
        stack.callback(gce.stop)
        ports = {
            int(emulator.endpoint.rpartition(":")[2]),
            int(kms_address.rpartition(":")[2]),
            int(gce_url.rpartition(":")[2]),
        }
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
        }
    assert {port for _ip, port in listening} == ports, listening
    assert all(_is_loopback(ip) for ip, _port in listening), listening


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
