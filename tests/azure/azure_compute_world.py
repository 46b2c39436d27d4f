"""The offline stack of the Azure Compute tests: Azurite (the real blob server disk bytes travel
through), the ARM fake in front of it (HTTPS, self-signed CA), the unmodified
``ClientSecretCredential`` logging in at the fake's token endpoint, and the unmodified
``ComputeManagementClient``.

Azurite comes from the blob engineer's launcher (``regionvault.providers.azure.azurite``) when
it is there; until that lands, an Azurite already installed is used (``azurite-blob`` on PATH,
``$REGIONVAULT_AZURITE_BLOB``, or an install in the Azurite cache directory), else the tests
are skipped saying so.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from regionvault.core.types import Instance
from regionvault.providers.azure.compute import (
    NAME_TAG,
    AzureCompute,
    AzureComputeSettings,
    MiB,
    compute_client,
)
from regionvault.providers.azure.fakes.arm import ArmFake, seed_disk, seed_vm

RESOURCE_GROUP = "rv-test"
LOCATION = "eastus"
ACCOUNT = "armdisks"


class NoAzurite(Exception):
    """No Azurite here: the tests that need it are skipped with this reason."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _installed_azurite() -> str | None:
    explicit = os.environ.get("REGIONVAULT_AZURITE_BLOB")
    if explicit and Path(explicit).exists():
        return explicit
    found = shutil.which("azurite-blob")
    if found:
        return found
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for candidate in sorted(
        (base / "regionvault" / "azurite").glob("*/node_modules/.bin/azurite-blob")
    ):
        return str(candidate)
    return None


class _FallbackAzurite:
    """Azurite's blob service in memory on 127.0.0.1, telemetry off, stopped by its PID."""

    def __init__(self, accounts: Mapping[str, str], log: Path) -> None:
        binary = _installed_azurite()
        if binary is None:
            raise NoAzurite(
                "Azurite is not installed (the blob branch's launcher installs it with npm ci)"
            )
        self.accounts = dict(accounts)
        self.port = _free_port()
        self._log: IO[bytes] = log.open("ab")
        env = dict(os.environ)
        env["AZURITE_ACCOUNTS"] = ";".join(f"{n}:{k}" for n, k in self.accounts.items())
        self._process = subprocess.Popen(
            [
                binary,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
            ],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=log.parent,
        )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NoAzurite(f"Azurite did not start (log: {log})")
            time.sleep(0.1)

    def account_url(self, account: str) -> str:
        return f"http://127.0.0.1:{self.port}/{account}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.account_url(next(iter(self.accounts)))}?comp=list", timeout=2
            ):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def azurite(workdir: Path) -> Iterator[tuple[Any, str, str]]:
    """An Azurite with one account: yields (server, account name, key)."""
    key = base64.b64encode(os.urandom(64)).decode("ascii")
    try:
        from regionvault.providers.azure.azurite import (  # type: ignore[import-not-found]
            AzuriteServer,
        )
    except ImportError:
        server: Any = _FallbackAzurite({ACCOUNT: key}, workdir / "azurite.log")
        try:
            yield server, ACCOUNT, key
        finally:
            server.stop()
        return
    with AzuriteServer({ACCOUNT: key}, log=workdir / "azurite.log", workdir=workdir) as server:
        yield server, ACCOUNT, key


def tar_image(data: Mapping[str, bytes]) -> bytes:
    """A disk image in which each file's bytes lie contiguous (a tar archive), whole MiB."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(data.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    image = out.getvalue()
    return image + bytes(-len(image) % MiB)


class ArmWorld:
    """One region's offline Azure compute: the fake, a logged-in client, an AzureCompute."""

    def __init__(self, fake: ArmFake, blob_endpoint: str, *, region: str = "azure:east") -> None:
        self.fake = fake
        self.blob_endpoint = blob_endpoint
        self.region = region
        self.credential = ClientSecretCredential(
            fake.tenant,
            fake.client_id,
            fake.client_secret,
            authority=fake.endpoint,
            disable_instance_discovery=True,
            connection_verify=str(fake.ca_path),
        )
        self.settings = AzureComputeSettings(
            subscription_id=fake.subscription,
            resource_group=RESOURCE_GROUP,
            location=LOCATION,
            arm_endpoint=fake.endpoint,
            ca_bundle=str(fake.ca_path),
            vm_size="Standard_B1s",
        )
        self.client: ComputeManagementClient = compute_client(
            self.settings,
            self.credential,
            retry_total=2,
            retry_backoff_factor=0.01,
            polling_interval=0,
        )
        self._computes: list[AzureCompute] = []

    def compute(self, **kwargs: Any) -> AzureCompute:
        settings = kwargs.pop("settings", self.settings)
        client = compute_client(
            settings, self.credential, retry_total=2, retry_backoff_factor=0.01, polling_interval=0
        )
        compute = AzureCompute(region=self.region, settings=settings, client=client, **kwargs)
        self._computes.append(compute)
        return compute

    def close(self) -> None:
        for compute in self._computes:
            compute.close()
        self.client.close()
        self.credential.close()

    # ------------------------------------------------------------------ seeding, raw SDK

    def seed_disk(
        self, name: str, image: bytes | Mapping[int, bytes], *, size: int | None = None
    ) -> str:
        """An upload disk holding ``image``, made with the plain SDK; its resource id."""
        pieces = image if isinstance(image, bytes) else dict(image)
        return seed_disk(self.client, RESOURCE_GROUP, LOCATION, name, pieces, size=size)

    def seed_vm(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        image: bytes | Mapping[int, bytes] = b"",
        vm_size: str = "Standard_D2s_v5",
    ) -> str:
        """A VM whose OS disk holds ``image``; returns its resource id."""
        pieces = image if isinstance(image, bytes) else dict(image)
        return seed_vm(
            self.client,
            RESOURCE_GROUP,
            LOCATION,
            name,
            tags=dict(tags or {}),
            image=pieces,
            vm_size=vm_size,
        )

    def disk_bytes(self, disk_id: str, length: int) -> bytes:
        """The first ``length`` bytes of a disk, read beside the provider (account key)."""
        blob = self.fake.blob_client(disk_id)
        return bytes(blob.download_blob(offset=0, length=length).readall())


def instance_named(instances: list[Instance], name: str) -> Instance:
    return next(i for i in instances if i.name == name or i.extra.get("vm_name") == name)


__all__ = [
    "ACCOUNT",
    "LOCATION",
    "NAME_TAG",
    "RESOURCE_GROUP",
    "ArmWorld",
    "NoAzurite",
    "azurite",
    "instance_named",
    "tar_image",
]
