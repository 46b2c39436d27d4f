"""The fixtures of tests/pkcs11, defined in pkcs11_world.py: a module of its own name, so
that its helpers import without clashing with another directory's conftest."""

from __future__ import annotations

from pkcs11_world import (  # noqa: F401 (fixtures and hooks, registered by being here)
    east,
    hsm,
    west,
)
