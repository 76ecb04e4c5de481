"""velo-edged: run one edge daemon.  velo-edged --config /etc/velo/edged.toml"""

from __future__ import annotations

import argparse
import os
import sys

from edged.config import load
from edged.server import Edged
from velo.config import ConfigError
from velo.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="velo-edged", description="VELO edge daemon (gRPC velo.v1.EdgeService).",
        epilog="Every config key can be overridden by the environment, "
        "e.g. VELO_EDGED__VECTOR_DB__URI=http://127.0.0.1:19530.")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get("VELO_EDGED_CONFIG"),
                        help="TOML config file (default: $VELO_EDGED_CONFIG, else built-in "
                        "defaults)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"velo-edged: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(cfg.log_level)
    Edged(cfg).run()


if __name__ == "__main__":
    main()
