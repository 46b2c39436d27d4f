"""A wire-level fake of the OpenStack calls the openstack provider makes (keystone v3, nova,
glance v2, cinder v3), reached by libcloud's unmodified ``OpenStack_2_NodeDriver`` over plain
HTTP on 127.0.0.1 in tests and in the provider's conformance support."""

from __future__ import annotations
