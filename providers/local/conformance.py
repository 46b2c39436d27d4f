"""The local provider's support for the conformance suite: a throwaway two-region site,
``local:east`` replicating to ``local:west``, under the run's temporary directory or
``$REGIONVAULT_LOCAL_ROOT``::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=local

Test instances are the suite's default: directories adopted through
``Compute.register_instance``, which the local provider declares.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.conformance.support import ConformanceSupport, env_name

__all__ = ["LocalConformanceSupport"]


class LocalConformanceSupport(ConformanceSupport):
    """Two local regions, ``local:east`` replicating to ``local:west``."""

    SITE = (
        '[site]\nname = "conformance"\n\n'
        '[regions."local:east"]\nroot = "{root}/east"\n\n'
        '[regions."local:west"]\nroot = "{root}/west"\n\n'
        '[[replication]]\nfrom = "local:east"\nto = "local:west"\n'
    )

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        root = Path(os.environ.get(env_name("local", "ROOT")) or workdir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        path = workdir / "site.toml"
        path.write_text(self.SITE.format(root=root.as_posix()), encoding="utf-8")
        yield path
