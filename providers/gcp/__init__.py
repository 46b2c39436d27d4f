"""The GCP provider: Cloud KMS keys, Cloud Storage vaults, an inbox bucket for transit and
the compute of Compute Engine instances and their persistent disks.

The Google Cloud SDK is imported only when a service talks to GCP, so registering this
provider (and the whole core) works without it; install it with
``pip install 'regionvault[gcp]'``.
"""

from __future__ import annotations
