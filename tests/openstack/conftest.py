"""The fixtures of tests/openstack, defined in openstack_world.py: a module of its own name,
so that its helpers import without clashing with another directory's conftest."""

from __future__ import annotations

from openstack_world import cloud, make_compute  # noqa: F401 (fixtures, registered by being here)
