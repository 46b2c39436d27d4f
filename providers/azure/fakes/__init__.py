"""Wire-level fakes of Azure services that have no emulator, shipped for the provider's tests
and its conformance support: the unmodified SDK clients talk to them over HTTPS on 127.0.0.1."""

from __future__ import annotations
