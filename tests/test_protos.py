"""The committed Python stubs must match proto/ (regenerate with: python tools/gen_protos.py)."""

import subprocess
import sys

from velo.core.models import ROOT


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_changed_proto_is_detected(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import gen_protos

    proto = tmp_path / "velo" / "v1"
    proto.mkdir(parents=True)
    for source in (ROOT / "proto" / "velo" / "v1").glob("*.proto"):
        (proto / source.name).write_text(source.read_text())
    (proto / "edge.proto").write_text((proto / "edge.proto").read_text().replace(
        "int32 max_tokens = 5;", "int32 max_tokens = 5;\n  string extra = 99;"))
    monkeypatch.setattr(gen_protos, "PROTO_ROOT", tmp_path)
    assert "velo/v1/edge_pb2.py" in gen_protos.stale_files()
