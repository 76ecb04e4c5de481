"""The embedded Milvus's memory-mapping option reaches the config the server reads.

(Starting a second embedded server here is not possible: one per machine, and the session's
runs already. tools/bench_edge.py --milvus-mmap measures what the option does.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from velo.milvus_server import EmbeddedMilvus


def written_config(data_dir: Path, mmap: bool) -> str:
    from milvus import MilvusServer

    server = MilvusServer(wait_for_started=False)
    server.set_base_dir(str(data_dir))
    if mmap:
        EmbeddedMilvus(data_dir, mmap=True)._enable_mmap(server)
    server.config.resolve()  # writes configs/milvus.yaml, as start() does
    return (data_dir / "configs" / "milvus.yaml").read_text()


@pytest.mark.parametrize("mmap", [True, False])
def test_mmap_dir_goes_under_query_node(tmp_path: Path, mmap: bool) -> None:
    lines = written_config(tmp_path, mmap).splitlines()
    query_node = lines.index("queryNode:")
    mmap_lines = [i for i, line in enumerate(lines) if "mmapDirPath" in line]
    if not mmap:
        assert mmap_lines == []
        return
    assert mmap_lines == [query_node + 1]
    assert lines[query_node + 1] == f"  mmapDirPath: {tmp_path.resolve() / 'mmap'}"
    assert (tmp_path / "mmap").is_dir()
