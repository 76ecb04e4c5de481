"""velo-cloudd: serve velo.v1.CloudService in front of an OpenAI-compatible LLM server.

    velo-cloudd --config /etc/velo/cloudd.toml
    python -m cloudd            # defaults: listen 127.0.0.1:50060, LLM at 127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse
import os
import sys

from cloudd.config import load
from cloudd.server import Cloudd
from velo.config import ConfigError
from velo.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="velo-cloudd",
        description="VELO cloud LLM proxy (gRPC velo.v1.CloudService -> OpenAI-compatible HTTP).",
        epilog="Every config key can be overridden by the environment, "
        "e.g. VELO_CLOUDD__LLM__BASE_URL=http://gpu-1:8000/v1.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("VELO_CLOUDD_CONFIG"),
        help="TOML config file (default: $VELO_CLOUDD_CONFIG, else built-in defaults)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"velo-cloudd: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(cfg.log_level)
    Cloudd(cfg).run()


if __name__ == "__main__":
    main()
