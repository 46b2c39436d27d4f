"""Azurite, the Blob Storage emulator, for the Azure tests and the provider's conformance
support: pinned by the ``package.json`` and ``package-lock.json`` shipped next to this module
(``node/``), installed with ``npm ci`` into a cache directory on first use when
``azurite-blob`` is not on PATH, started on 127.0.0.1 with telemetry off and with the
storage accounts asked for (each region its own), and stopped by its PID.

Nothing here imports the Azure SDK. The cache directory is ``$REGIONVAULT_AZURITE_CACHE``,
else ``$XDG_CACHE_HOME/regionvault/azurite``, else ``~/.cache/regionvault/azurite``; each
lockfile gets a directory of its own (named by the lockfile's hash), so a new pin never
runs an old install.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from regionvault.core.errors import RegionVaultError

__all__ = [
    "AZURITE_PACKAGE",
    "AzuriteServer",
    "AzuriteUnavailable",
    "azurite_command",
    "azurite_version",
    "cache_root",
    "free_port",
    "install_azurite",
    "new_account_key",
]

#: the directory holding the pinned package.json and package-lock.json
AZURITE_PACKAGE = Path(__file__).resolve().parent / "node"
CACHE_ENV = "REGIONVAULT_AZURITE_CACHE"
#: seconds ``npm ci`` may take (about 100 s on a fresh cache, 361 MB)
INSTALL_TIMEOUT = 900


class AzuriteUnavailable(RegionVaultError):
    """Azurite cannot be installed or started here (no npm, the install failed)."""


def azurite_version() -> str:
    """The pinned Azurite version, as package.json names it."""
    manifest = json.loads((AZURITE_PACKAGE / "package.json").read_text(encoding="utf-8"))
    return str(manifest["dependencies"]["azurite"])


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "regionvault" / "azurite"


def _install_dir() -> Path:
    lock = (AZURITE_PACKAGE / "package-lock.json").read_bytes()
    return cache_root() / hashlib.sha256(lock).hexdigest()[:12]


def _installed_bin(directory: Path) -> Path:
    return directory / "node_modules" / ".bin" / "azurite-blob"


def install_azurite(*, log: Path | None = None) -> Path:
    """The ``azurite-blob`` of the pinned install in the cache, running ``npm ci`` first if
    it is not there yet (once, under a file lock, into a temporary directory renamed into
    place when complete). :class:`AzuriteUnavailable` in one line when npm is missing or the
    install fails."""
    target = _install_dir()
    binary = _installed_bin(target)
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteUnavailable(
            f"the Azure tests need npm (Node.js) to install Azurite {azurite_version()} into "
            f"{target.parent}: install Node.js and npm, or put azurite-blob on PATH"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # another process installed it while we waited
            return binary
        work = target.parent / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(AZURITE_PACKAGE / name, work / name)
        out_path = log or (target.parent / f"{target.name}.npm-ci.log")
        with out_path.open("ab") as out:
            try:
                result = subprocess.run(
                    [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev"],
                    cwd=work,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    timeout=INSTALL_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                shutil.rmtree(work, ignore_errors=True)
                raise AzuriteUnavailable(
                    f"npm ci of Azurite {azurite_version()} took over {INSTALL_TIMEOUT}s "
                    f"(log: {out_path})"
                ) from None
        if result.returncode != 0 or not _installed_bin(work).exists():
            shutil.rmtree(work, ignore_errors=True)
            raise AzuriteUnavailable(
                f"npm ci of Azurite {azurite_version()} failed with exit code "
                f"{result.returncode} (log: {out_path})"
            )
        work.rename(target)
    return binary


def azurite_command() -> list[str]:
    """``azurite-blob`` from PATH, else the pinned install (made on first use)."""
    found = shutil.which("azurite-blob")
    if found is not None:
        return [found]
    return [str(install_azurite())]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_account_key() -> str:
    """A random storage account key (64 bytes, base64), as Azure makes them."""
    return base64.b64encode(os.urandom(64)).decode("ascii")


class AzuriteServer:
    """Azurite's blob service in a child process on 127.0.0.1, in memory, telemetry off,
    with one storage account per name in ``accounts`` (name -> key; keys are made when not
    given). Stopped by its PID.

    ``account_url(name)`` is the account's path-style endpoint, ``http://127.0.0.1:P/name``
    (``https://`` with ``tls``, a server certificate for 127.0.0.1). With ``oauth`` Azurite
    also takes bearer tokens (``--oauth basic``, HTTPS only), checking their issuer
    (``https://sts.windows.net/...``), audience (``https://storage.azure.com``, or the
    account's blob endpoint), and lifetime, never their signature or any role assignment.
    """

    def __init__(
        self,
        accounts: Mapping[str, str | None],
        *,
        port: int | None = None,
        log: Path | None = None,
        workdir: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        oauth: bool = False,
    ) -> None:
        if not accounts:
            raise ValueError("Azurite needs at least one account")
        if oauth and tls is None:
            raise ValueError("Azurite accepts OAuth bearer tokens over HTTPS only: give tls")
        #: (server certificate, its key, the CA that signed it), PEM files: serve HTTPS
        self.tls = tls
        #: accept bearer tokens (``--oauth basic``): their shape, issuer, audience and
        #: lifetime are checked, not their signature, nor any role
        self.oauth = oauth
        self.accounts = {name: key or new_account_key() for name, key in accounts.items()}
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.log = log
        self.workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def account_url(self, account: str) -> str:
        return f"{self.endpoint}/{account}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 60.0) -> AzuriteServer:
        """Start the server (installing Azurite first if needed) and wait, at most
        ``timeout`` seconds, until it answers."""
        if self._process is not None:
            return self
        command = [
            *azurite_command(),
            "--blobHost",
            self.host,
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",
            "--disableTelemetry",  # Azurite reports usage to Microsoft unless told not to
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]
        if self.tls is not None:
            command += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        if self.oauth:
            command += ["--oauth", "basic"]
        env = dict(os.environ)
        env["AZURITE_ACCOUNTS"] = ";".join(f"{n}:{k}" for n, k in self.accounts.items())
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log is not None:
            self._log_file = out = self.log.open("ab")
        cwd = self.workdir
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            command, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise AzuriteUnavailable(f"Azurite exited with code {code} while starting")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AzuriteUnavailable(f"Azurite on {self.endpoint} not ready in {timeout}s")
            time.sleep(0.1)

    def _answers(self) -> bool:
        """Any HTTP answer (an unauthenticated listing is refused with 403) means ready."""
        account = next(iter(self.accounts))
        context = ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None
        url = f"{self.account_url(account)}?comp=list"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

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

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in the environment for the duration; the old values come back."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    """``python -m regionvault.providers.azure.azurite install``: install the pinned Azurite
    into the cache now (scripts/test does, so that no test waits for npm)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m regionvault.providers.azure.azurite install", file=sys.stderr)
        return 2
    try:
        command = azurite_command()
    except AzuriteUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"azurite-blob {azurite_version()}: {command[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
