"""velo-cloudd: serve velo.v1.CloudService in front of an OpenAI-compatible LLM server.

    velo-cloudd --config /etc/velo/cloudd.toml
    python -m cloudd            # defaults: listen 127.0.0.1:50060, LLM at 127.0.0.1:8080/v1
"""

from __future__ import annotations

from cloudd.config import load
from cloudd.server import Cloudd
from velo.runtime.serving import daemon_main


def main(argv: list[str] | None = None) -> None:
    daemon_main("cloudd", "VELO cloud LLM proxy (gRPC velo.v1.CloudService -> OpenAI-compatible "
                "HTTP).", "VELO_CLOUDD__LLM__BASE_URL=http://gpu-1:8000/v1", load, Cloudd, argv)


if __name__ == "__main__":
    main()
