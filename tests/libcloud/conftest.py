"""The fixtures of tests/libcloud, defined in libcloud_world.py: a module of its own name, so
that its helpers import without clashing with another directory's conftest."""

from __future__ import annotations

from libcloud_world import (  # noqa: F401 (fixtures and hooks, registered by being here)
    azurite,
    make_vault,
    s3_server,
    store,
    swift_cloud,
)
