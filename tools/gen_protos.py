"""Regenerate the Python stubs of proto/velo/v1 into velo/v1 (messages, .pyi and gRPC).

    python tools/gen_protos.py          # write the stubs
    python tools/gen_protos.py --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("velo") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto of the package, writing under out_root/velo/v1."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs of velo.v1."""\n')
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing in) the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = {p.name for p in (ROOT / PACKAGE).iterdir() if p.suffix in {".py", ".pyi"}}
        stale = [
            str(rel)
            for rel in fresh
            if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, False)
        ]
        stale += sorted(str(PACKAGE / n) for n in committed - {p.name for p in fresh})
        return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run python tools/gen_protos.py):", *stale, sep="\n  ")
            sys.exit(1)
        print("generated stubs are up to date")
        return
    for rel in generate(ROOT):
        print("wrote", rel)


if __name__ == "__main__":
    main()
