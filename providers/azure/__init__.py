"""The Azure provider: Key Vault keys, Blob Storage vaults, an inbox container for transit and
the compute of VMs and their managed disks.

The Azure SDK is imported only when a service talks to Azure, so registering this provider
(and the whole core) works without it; install it with ``pip install 'regionvault[azure]'``.
"""

from __future__ import annotations
