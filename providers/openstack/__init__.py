"""The openstack provider: compute from an OpenStack cloud through libcloud's OpenStack driver."""

from __future__ import annotations
