"""The libcloud provider: a region's Vault, and the Transit into it, in any object store
apache-libcloud's storage drivers reach (S3, Azure Blobs, and S3-compatible stores such as
MinIO and Ceph RGW through the S3 driver with a host). It offers no compute and no keys: a
site takes those from other providers (docs/edge-vault.md)."""
