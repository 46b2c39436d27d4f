"""The ``regionvault`` command (placeholder until the CLI lands)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("regionvault: CLI not built yet")
