"""A sample virtual network function for the demo and the tests.

It keeps subscriber and session state on disk in its data directory (as a core network
function keeps its subscriber database) and answers on loopback:

- ``GET /health``: 200 once its state is loaded;
- ``GET /state``: the subscribers and sessions it serves, and a digest of them;
- ``POST /attach?imsi=...``: registers a subscriber and opens a session (written to disk).

Run it with ``python -m regionvault.plugins.samplenf [--data DIR] [--seed N]``; the data
directory defaults to ``$REGIONVAULT_DATA_DIR``, then the current directory. It binds
127.0.0.1 on a free port and writes that port to ``<data>/run/port`` so health checks find it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.plugins.samplenf.layout import PORT_FILE

if TYPE_CHECKING:
    from regionvault.plugins.samplenf.nf import NetworkFunction, read_state, state_digest

__all__ = ["PORT_FILE", "NetworkFunction", "read_state", "state_digest"]

_LAZY = frozenset({"NetworkFunction", "read_state", "state_digest"})


def __getattr__(name: str) -> object:
    # the server (and http.server with it) loads on first use: every regionvault command
    # imports this package for the plugin's health check, which needs only PORT_FILE
    if name in _LAZY:
        from regionvault.plugins.samplenf import nf

        return getattr(nf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
