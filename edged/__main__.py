"""velo-edged: serve velo.v1.EdgeService on one edge box (--config /etc/velo/edged.toml)."""

from __future__ import annotations

from edged.config import load
from edged.server import Edged
from velo.runtime.serving import daemon_main


def main(argv: list[str] | None = None) -> None:
    daemon_main("edged", "VELO edge daemon (gRPC velo.v1.EdgeService).",
                "VELO_EDGED__VECTOR_DB__URI=http://127.0.0.1:19530", load, Edged, argv)


if __name__ == "__main__":
    main()
