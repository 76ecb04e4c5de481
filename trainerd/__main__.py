"""velo-trainerd: python -m trainerd [--config PATH]"""

from __future__ import annotations

from trainerd.config import load
from trainerd.server import Trainerd
from velo.runtime.serving import daemon_main


def main(argv: list[str] | None = None) -> None:
    daemon_main("trainerd", "VELO trainer: collects edge experience and serves versioned ONNX "
                "policies.", "VELO_TRAINERD__DATA_DIR=/var/lib/velo/trainerd", load, Trainerd,
                argv)


if __name__ == "__main__":
    main()
