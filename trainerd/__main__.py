"""velo-trainerd: python -m trainerd [--config PATH]"""

from __future__ import annotations

import argparse
import os
import sys

from trainerd.config import load
from trainerd.server import Trainerd
from velo.config import ConfigError
from velo.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="velo-trainerd",
        description="VELO trainer: collects edge experience and serves versioned ONNX policies.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("VELO_TRAINERD_CONFIG"),
        help="TOML config file (default: $VELO_TRAINERD_CONFIG; without either, the built-in "
        "defaults). Every key can be overridden by VELO_TRAINERD__<KEY>.",
    )
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"velo-trainerd: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(config.log_level)
    Trainerd(config).run()


if __name__ == "__main__":
    main()
