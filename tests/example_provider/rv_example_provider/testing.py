"""What the conformance suite needs beyond the four interfaces: a two-region test site.

Test instances need nothing here: the provider declares ``register_instance``, so the suite
adopts directories of test data as instances.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.conformance import ConformanceSupport

SITE = """\
[regions."flatdir:north"]
root = "{root}/north"

[regions."flatdir:south"]
root = "{root}/south"

[[replication]]
from = "flatdir:north"
to = "flatdir:south"
"""


class FlatDirSupport(ConformanceSupport):
    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        # $REGIONVAULT_FLATDIR_ROOT keeps the regions somewhere to look at after the run
        root = Path(os.environ.get("REGIONVAULT_FLATDIR_ROOT") or workdir).resolve()
        site = workdir / "site.toml"
        site.write_text(SITE.format(root=root.as_posix()), encoding="utf-8")
        yield site
