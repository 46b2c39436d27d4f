"""Debian packages the project's scripts install for its tests and demo (osmo-hlr,
redis-server, softhsm2): one ``apt-get install`` path, as root where apt exists, that says in
one line why it did not run or failed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = ["apt_install"]


def apt_install(
    package: str, label: str, *, guard: AbstractContextManager[object] | None = None
) -> str | None:
    """Install Debian's ``package`` (named ``label`` to the reader) with apt-get, once more
    after an ``apt-get update`` when the first try fails; ``guard`` is held around apt-get
    (e.g. a policy-rc.d that keeps services from starting). None when apt-get succeeded, else
    the one line saying why it did not run or what it said last."""
    apt = shutil.which("apt-get")
    if apt is None:
        return f"{label} is missing and there is no apt-get here: install {package} by hand"
    if os.geteuid() != 0:
        return f"{label} is missing and installing it needs root: apt-get install {package}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt_get(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [apt, "-o", "DPkg::Lock::Timeout=300", *args],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )

    with guard if guard is not None else contextlib.nullcontext():
        done = apt_get("install", "-y", "-q", package)
        if done.returncode != 0:
            apt_get("update", "-q")
            done = apt_get("install", "-y", "-q", package)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"{label}: apt-get install {package} failed: {tail[0]}"
    return None
