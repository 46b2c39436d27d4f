"""The Azure provider: Key Vault keys, Blob Storage vaults and an inbox container for transit
(managed-disk compute lands separately, issue #15).

The Azure SDK is imported only when a service talks to Azure, so registering this provider
(and the whole core) works without it; install it with ``pip install 'regionvault[azure]'``.
"""

from __future__ import annotations
