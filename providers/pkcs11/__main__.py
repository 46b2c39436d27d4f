"""``python -m regionvault.providers.pkcs11 export-public-key SITE REGION OUT``: write the PEM
of a pkcs11 region's seal public key, read from its token (with its PIN, as the region's
KeyService opens it), to ``OUT``: the file other regions name as that region's ``public_key``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from regionvault.core.errors import RegionVaultError
from regionvault.core.site import Site

USAGE = "usage: python -m regionvault.providers.pkcs11 export-public-key SITE REGION OUT"


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "export-public-key":
        print(USAGE, file=sys.stderr)
        return 2
    site_file, region_name, out = argv[1:]
    try:
        with Site.load(site_file) as site:
            keys = site.region(region_name).keys
            export = getattr(keys, "public_key_pem", None)
            if export is None:
                print(f"{region_name}: its keys are not from the pkcs11 provider", file=sys.stderr)
                return 1
            pem: bytes = export()
    except RegionVaultError as exc:
        print(f"{region_name}: {exc}", file=sys.stderr)
        return 1
    Path(out).write_bytes(pem)
    print(f"{region_name}: public key written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
