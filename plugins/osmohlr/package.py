"""Debian's ``osmo-hlr``: find it, and install it when missing::

    python -m regionvault.plugins.osmohlr.package install

``install`` runs ``apt-get install osmo-hlr`` when the binary is missing and this is root with
apt-get; otherwise it prints one line saying why not, and the tests and the demo that need it
skip it with that line (:func:`missing`). The package's own system service (osmo-hlr.service,
on 127.0.0.1) is never used: while apt-get runs, a ``policy-rc.d`` that refuses every start is
put in place when the machine has none, so installing starts nothing; each instance runs its
own osmo-hlr with its own configuration, database and loopback address.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.debian import apt_install

__all__ = ["find_binary", "install", "missing"]

#: Debian's service gate: invoke-rc.d and deb-systemd-invoke ask it before starting a service
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_REFUSE_STARTS = "#!/bin/sh\n# regionvault: no service starts while osmo-hlr installs\nexit 101\n"


def find_binary() -> Path | None:
    """The ``osmo-hlr`` binary, or None."""
    found = shutil.which("osmo-hlr") or next(
        (p for p in ("/usr/bin/osmo-hlr", "/usr/local/bin/osmo-hlr") if Path(p).is_file()), None
    )
    return Path(found) if found else None


def missing() -> str | None:
    """None when osmo-hlr is here, else one line saying what is missing and how to get it."""
    if find_binary() is None:
        return (
            "osmo-hlr is not installed: python -m regionvault.plugins.osmohlr.package install, "
            "or apt-get install osmo-hlr"
        )
    return None


@contextlib.contextmanager
def _raise_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit while the block runs, so that its ``finally`` runs
    (their default action ends the process at once); only in the main thread, where Python
    can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _is_ours(policy: Path) -> bool:
    """Whether ``policy`` is the refusing policy-rc.d this module writes (by its content)."""
    try:
        return policy.read_text(encoding="ascii", errors="replace") == _REFUSE_STARTS
    except OSError:
        return False


@contextlib.contextmanager
def _no_service_starts(policy: Path = POLICY_RC_D) -> Iterator[None]:
    """A ``policy-rc.d`` refusing every start while the block runs, removed afterwards, also
    when the process is sent SIGTERM or SIGHUP; a machine's own policy-rc.d is left as it is.
    A file with exactly our content is a leftover of ours (a run killed with SIGKILL): it is
    reused and removed afterwards like a fresh one."""
    with _raise_on_termination():
        if policy.exists() and not _is_ours(policy):
            yield
            return
        try:
            if not policy.exists():
                tmp = policy.with_name(f".{policy.name}.regionvault")
                tmp.write_text(_REFUSE_STARTS, encoding="ascii")
                tmp.chmod(0o755)
                tmp.replace(policy)
            yield
        finally:
            with contextlib.suppress(OSError):
                if _is_ours(policy):
                    policy.unlink()


def install() -> str:
    """Install Debian's osmo-hlr when it is missing; the one line to print."""
    if missing() is None:
        return f"osmo-hlr: {find_binary()}"
    failed = apt_install("osmo-hlr", "osmo-hlr", guard=_no_service_starts())
    if failed is not None:
        return failed
    if missing() is not None:
        return f"osmo-hlr: apt-get install osmo-hlr finished, but {missing()}"
    return f"osmo-hlr installed: {find_binary()}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m regionvault.plugins.osmohlr.package install", file=sys.stderr)
        return 2
    # a missing osmo-hlr is not a failure: its tests skip with the line printed here
    print(install())
    return 0


if __name__ == "__main__":
    sys.exit(main())
