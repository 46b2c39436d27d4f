"""Health check for the sample network function (entry point ``samplenf``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.plugins import hookimpl
from regionvault.plugins.samplenf.layout import PORT_FILE

if TYPE_CHECKING:
    from regionvault.core.types import Instance

MARKER = "regionvault.plugins.samplenf"


def endpoint(instance: Instance) -> str | None:
    """``http://127.0.0.1:PORT`` of this instance's own process, or None if not up yet."""
    data_dir = instance.extra.get("data_dir")
    if not data_dir:
        return None
    try:
        info: dict[str, Any] = json.loads((Path(data_dir) / PORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    # a restored data directory carries the original's port file until the new process
    # rewrites it: only trust a file written by this instance's own process, or by one in the
    # session it leads (a launch through a shell)
    if not _same_process(info.get("pid"), instance.extra.get("pid")):
        return None
    return f"http://127.0.0.1:{int(info['port'])}"


def _same_process(writer: object, launched: object) -> bool:
    if not isinstance(writer, int) or not isinstance(launched, int):
        return False
    if writer == launched:
        return True
    try:
        return os.getsid(writer) == launched
    except OSError:
        return False


@hookimpl
def regionvault_health_check(region: str, instance: Instance) -> bool | None:
    if not instance.function or MARKER not in instance.function:
        return None
    base = endpoint(instance)
    if base is None:
        return False
    import urllib.request  # here: every process that loads the plugins imports this module

    try:
        with urllib.request.urlopen(f"{base}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
