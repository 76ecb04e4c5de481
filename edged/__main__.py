"""velo-edged: run one edge daemon.  velo-edged --config /etc/velo/edged.toml"""

from __future__ import annotations

import argparse
import os
import sys

from edged.config import load
from edged.server import Edged
from velo.config import ConfigError
from velo.logs import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="velo-edged", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("VELO_EDGED_CONFIG"),
                        help="TOML file (default: $VELO_EDGED_CONFIG; env overrides apply)")
    args = parser.parse_args()
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        sys.exit(f"velo-edged: {exc}")
    configure_logging(cfg.log_level)
    Edged(cfg).run()


if __name__ == "__main__":
    main()
