"""Wire-level fakes of the GCP services no emulator covers (Cloud KMS over gRPC, the Compute
Engine REST API), reached by the unmodified Google clients on 127.0.0.1 in tests."""

from __future__ import annotations
