"""Test support for the AWS provider: a moto server on 127.0.0.1, settings that point at it,
and seeding of EBS snapshots through the EBS direct APIs.

Used by tests/aws, the conformance suite and the end-to-end tests; boto3 and moto are needed
only when these functions are called.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from regionvault.core.errors import RegionVaultError

__all__ = [
    "DUMMY_CREDENTIALS",
    "LIVE_ENV",
    "MotoServer",
    "disk_blocks",
    "dummy_credentials",
    "free_port",
    "live_mode",
    "mixed_disk_blocks",
    "region_settings",
    "seed_snapshot",
]

#: set to ``1`` to run the AWS tests against real AWS with the standard credential chain
LIVE_ENV = "REGIONVAULT_AWS_LIVE"

DUMMY_CREDENTIALS: Mapping[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
}
#: variables that would send a test somewhere other than the moto server
_UNSET_FOR_MOTO = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE")

EBS_BLOCK_SIZE = 512 * 1024


def live_mode() -> bool:
    """True when the AWS tests should talk to real AWS (``REGIONVAULT_AWS_LIVE=1``)."""
    return os.environ.get(LIVE_ENV, "") == "1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dummy_credentials() -> Iterator[None]:
    """Dummy AWS credentials in the environment for the duration; the old values come back."""
    saved = {k: os.environ.get(k) for k in (*DUMMY_CREDENTIALS, *_UNSET_FOR_MOTO)}
    try:
        for key in _UNSET_FOR_MOTO:
            os.environ.pop(key, None)
        os.environ.update(DUMMY_CREDENTIALS)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MotoServer:
    """moto's server in a child process on 127.0.0.1, stopped by its PID.

    A child process rather than a thread: the server then uses the second core and its
    request handling never holds the test's interpreter lock.
    """

    def __init__(self, *, port: int | None = None, log: Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 20.0) -> MotoServer:
        """Start the server and wait (at most ``timeout`` seconds) until it answers."""
        if self._process is not None:
            return self
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log is not None:
            self._log_file = out = self.log.open("ab")
        cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._process = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RegionVaultError(f"moto server exited with code {code} while starting")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RegionVaultError(f"moto server on {self.endpoint} not ready in {timeout}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def reset(self) -> None:
        """Forget every resource in every region (``POST /moto-api/reset``)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        elif process is not None:
            process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def region_settings(
    aws_region: str,
    *,
    endpoint_url: str | None,
    tag: str,
    object_lock: bool = True,
) -> dict[str, Any]:
    """site.toml settings of a throw-away test region ``aws:<aws_region>``: a key alias and a
    bucket named after ``tag`` (unique per test run), made on first use. ``endpoint_url``
    is the moto server's, or None for real AWS."""
    settings: dict[str, Any] = {
        "kms_key": f"alias/rv-test-{tag}",
        "bucket": f"rv-test-{tag}-{aws_region}",
        "create": True,
        "object_lock": object_lock,
    }
    if endpoint_url is not None:
        settings["endpoint_url"] = endpoint_url
    return settings


def disk_blocks(data: Mapping[str, bytes]) -> tuple[dict[int, bytes], int]:
    """``data`` (relative path -> bytes) as a tar archive cut into 512 KiB EBS blocks (all-zero
    blocks left out), and the archive's length. Each file's bytes lie contiguous in it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(data.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    image = out.getvalue()
    blocks: dict[int, bytes] = {}
    for index, start in enumerate(range(0, len(image), EBS_BLOCK_SIZE)):
        block = image[start : start + EBS_BLOCK_SIZE]
        if block.strip(b"\0"):
            blocks[index] = block
    return blocks, len(image)


def seed_snapshot(
    ebs: Any,
    blocks: Mapping[int, bytes],
    *,
    volume_size_gib: int = 1,
    tags: Mapping[str, str] | None = None,
    description: str = "regionvault test seed",
) -> str:
    """Write ``blocks`` (block index -> at most 512 KiB, zero-padded) into a new completed EBS
    snapshot through the EBS direct APIs, with SHA-256 checksums as AWS requires; returns its
    id. ``ebs`` is a boto3 ``ebs`` client of the region the snapshot belongs in.

    moto does not tie a volume's contents to the snapshots taken of it, so tests seed a
    snapshot and capture from it (the ``regionvault:capture-snapshot`` instance tag).
    """
    kwargs: dict[str, Any] = {"VolumeSize": volume_size_gib, "Description": description}
    if tags:
        kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    snapshot_id = str(ebs.start_snapshot(**kwargs)["SnapshotId"])
    for index in sorted(blocks):
        data = blocks[index]
        if len(data) > EBS_BLOCK_SIZE:
            raise ValueError(f"block {index} is longer than {EBS_BLOCK_SIZE} bytes")
        data = data.ljust(EBS_BLOCK_SIZE, b"\0")
        ebs.put_snapshot_block(
            SnapshotId=snapshot_id,
            BlockIndex=index,
            BlockData=data,
            DataLength=len(data),
            Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode("ascii"),
            ChecksumAlgorithm="SHA256",
        )
    ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=len(blocks))
    return snapshot_id


def mixed_disk_blocks(size: int, *, seed: int = 0) -> dict[int, bytes]:
    """A synthetic disk of ``size`` bytes (a multiple of 512 KiB) with the content mix of a
    small server's root volume, as EBS blocks (block index -> 512 KiB; holes left out), made
    deterministically from ``seed``. Blocks cycle through eight kinds: three of random
    (incompressible) bytes, two of log-like text (compresses about 4:1), one never written
    (a hole), one half random and half zeros, one repeating an earlier random block (dedup):
    about 44% random, 25% text, 19% zeros and 12% duplicate data."""
    if size <= 0 or size % EBS_BLOCK_SIZE:
        raise ValueError(f"disk size {size} is not a positive multiple of {EBS_BLOCK_SIZE}")
    rng = random.Random(seed)
    blocks: dict[int, bytes] = {}
    earlier: list[int] = []
    for index in range(size // EBS_BLOCK_SIZE):
        kind = index % 8
        if kind in (0, 1, 2):
            blocks[index] = rng.randbytes(EBS_BLOCK_SIZE)
            earlier.append(index)
        elif kind in (3, 4):
            blocks[index] = _log_text(rng, index)
        elif kind == 6:
            blocks[index] = rng.randbytes(EBS_BLOCK_SIZE // 2).ljust(EBS_BLOCK_SIZE, b"\0")
        elif kind == 7:
            blocks[index] = blocks[earlier[rng.randrange(len(earlier))]]
    return blocks


def _log_text(rng: random.Random, index: int) -> bytes:
    """512 KiB of log lines, unique to ``index`` (so text blocks do not dedup)."""
    words = ("attach", "detach", "handover", "paging", "bearer", "release", "setup", "modify")
    lines: list[bytes] = []
    length = 0
    line_no = 0
    while length < EBS_BLOCK_SIZE:
        line = (
            f"{index:06d}.{line_no:05d} vcu[{rng.randrange(1, 64)}]: ue {rng.getrandbits(40):010x} "
            f"{rng.choice(words)} cell {rng.randrange(4096)} rsrp -{rng.randrange(70, 120)}dBm\n"
        ).encode("ascii")
        lines.append(line)
        length += len(line)
        line_no += 1
    return b"".join(lines)[:EBS_BLOCK_SIZE]
