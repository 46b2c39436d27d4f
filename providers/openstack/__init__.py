"""The openstack provider: a region's Compute in an OpenStack cloud (nova servers, their
cinder volumes, glance images), reached through apache-libcloud's unmodified
``OpenStack_2_NodeDriver``. It offers no keys, vault or transit: an edge site takes those
from other providers (docs/edge-compute.md)."""
