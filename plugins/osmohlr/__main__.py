"""``python -m regionvault.plugins.osmohlr``: run osmo-hlr as an instance's function."""

from __future__ import annotations

import sys

from regionvault.plugins.osmohlr.launcher import main

if __name__ == "__main__":
    sys.exit(main())
