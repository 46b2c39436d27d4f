"""``python -m regionvault.plugins.samplenf``: run the sample network function."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from regionvault.plugins.samplenf.nf import NetworkFunction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samplenf", description=__doc__)
    parser.add_argument("--data", type=Path, default=None, help="state directory")
    parser.add_argument("--seed", type=int, default=0, help="provision N subscribers first")
    args = parser.parse_args(argv)
    data = args.data or Path(os.environ.get("REGIONVAULT_DATA_DIR") or Path.cwd())
    data.mkdir(parents=True, exist_ok=True)
    nf = NetworkFunction(data)
    if args.seed:
        nf.seed(args.seed)
    server = nf.serve()

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(
        f"samplenf serving {len(nf.state['subscribers'])} subscribers on "
        f"127.0.0.1:{server.server_address[1]}",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
