"""The AWS provider: EC2 compute, KMS keys, S3 vaults and an S3 inbox for transit.

boto3 is imported only when a service talks to AWS, so registering this provider (and the
whole core) works without it; install it with ``pip install 'regionvault[aws]'``.
"""

from __future__ import annotations
