"""Where the sample network function keeps things in its data directory (light to import:
the plugin's health check needs it in every regionvault process, the server only in its own)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PORT_FILE"]

#: ``{"port": N, "pid": P}``, relative to the data directory; rewritten at every start
PORT_FILE = Path("run") / "port"
