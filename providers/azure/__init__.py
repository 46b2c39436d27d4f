"""The Azure provider: Key Vault, Blob Storage, managed disks (extra ``azure``)."""

from __future__ import annotations
