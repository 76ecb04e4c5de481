"""Each cached pair's texts are stored once, outside Milvus (velo.texts.TextStore), against a
real Milvus: searches get them back, eviction and restarts keep them right, and a collection
made before the move keeps serving its texts."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient

from velo.cache import VectorCache, VectorDBConfig
from velo.texts import TextStore

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_store_keeps_one_copy_per_pair_and_survives_reopening(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "texts.db")
    store.put([(1, "q1", "a1"), (2, "q2", "a2")])
    store.put([(1, "changed", "changed")])  # a pair's texts never change
    assert store.get([1, 2, 3]) == {1: ("q1", "a1"), 2: ("q2", "a2")}
    store.delete([2])
    store.close()
    again = TextStore(tmp_path / "texts.db")
    assert again.get([1, 2]) == {1: ("q1", "a1")} and again.count() == 1
    assert again.has(range(5000)) == {1}  # more ids than SQLite takes in one statement
    again.close()


def test_texts_live_outside_milvus_once_per_pair(milvus, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vecs = unit(rng, 4)
    name = f"tx_{uuid.uuid4().hex[:8]}"
    cache = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), name, DIM,
                        texts_path=tmp_path / "texts.db")
    cache.open()
    try:
        fields = {f["name"] for f in cache.client.describe_collection(name)["fields"]}
        assert "question" not in fields and "answer" not in fields
        long_answer = "an answer " * 200
        cache.insert_pair("t", "first question", long_answer, vecs[0], vecs[1], 0.0)
        cache.insert_pair("t", "second question", "second answer", vecs[2], vecs[3], 0.0)
        assert cache.texts.count() == 2  # one copy per pair, not per row
        (row,) = cache.search(vecs[1], "t", 1)  # the answer row carries its pair's texts
        assert (row.kind, row.question, row.answer) == (2, "first question", long_answer)
        assert cache.search(vecs[1], "other", 5) == []  # tenants stay apart
        cache.wait_indexed()

        # Evicting one row of a pair keeps its texts for the other; the last row takes them.
        rows = cache.search(vecs[0], "t", 4)
        first = [r for r in rows if r.question == "first question"]
        cache.update_row(first[0], "t", hits=1, value=1.0)
        cache.update_row(first[1], "t", hits=1, value=-1.0)
        for r in rows:
            if r.question == "second question":
                cache.update_row(r, "t", hits=1, value=2.0)
        cache.flush_updates()
        assert cache.evict(below_mean=True, max_rows=100, ttl_s=0) == 1
        assert cache.texts.count() == 2
        left = {r.id: r.question for r in cache.search(vecs[0], "t", 4)}
        assert sorted(left.values()) == ["first question", "second question", "second question"]
        assert cache.evict(below_mean=False, max_rows=2, ttl_s=0) == 1
        assert cache.texts.get([first[0].pair_id]) == {}  # no row of the pair left
        assert [r.question for r in cache.search(vecs[0], "t", 4)] == ["second question"] * 2
    finally:
        cache.close()

    # A restarted edge gets its texts back from its data_dir.
    reopened = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), name, DIM,
                           texts_path=tmp_path / "texts.db")
    reopened.open()
    try:
        assert {r.answer for r in reopened.search(vecs[2], "t", 2)} == {"second answer"}
    finally:
        reopened.drop()
        reopened.close()


def test_a_collection_with_texts_on_its_rows_keeps_serving_them(milvus, tmp_path: Path) -> None:
    """Collections made before the texts moved out: their texts are copied to the store on
    open, and new pairs are written with empty text fields."""
    rng = np.random.default_rng(8)
    vecs = unit(rng, 4)
    name = f"old_{uuid.uuid4().hex[:8]}"
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=DIM)
    for field in ("pair_id", "kind", "hits"):
        schema.add_field(field, DataType.INT64)
    schema.add_field("tenant", DataType.VARCHAR, max_length=64)
    schema.add_field("question", DataType.VARCHAR, max_length=65_535)
    schema.add_field("answer", DataType.VARCHAR, max_length=65_535)
    schema.add_field("value", DataType.DOUBLE)
    schema.add_field("created", DataType.DOUBLE)
    index = MilvusClient.prepare_index_params()
    index.add_index("vec", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 128})
    client.create_collection(name, schema=schema, index_params=index)
    client.insert(name, [{"id": 2 * 77 + kind - 1, "vec": vecs[kind - 1].tolist(), "pair_id": 77,
                          "kind": kind, "hits": 0, "tenant": "t", "question": "old question",
                          "answer": "old answer", "value": 0.0, "created": 1.0}
                         for kind in (1, 2)])
    client.close()
    cache = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), name, DIM,
                        texts_path=tmp_path / "texts.db")
    cache.open()
    try:
        assert cache.texts.get([77]) == {77: ("old question", "old answer")}
        (row,) = cache.search(vecs[0], "t", 1)
        assert (row.pair_id, row.question, row.answer) == (77, "old question", "old answer")
        cache.insert_pair("t", "new question", "new answer", vecs[2], vecs[3], 0.0)
        cache.update_row(row, "t", hits=2, value=0.5)
        assert cache.flush_updates() == 1  # the upsert fills the old text fields
        (new,) = cache.search(vecs[2], "t", 1)
        assert (new.question, new.answer) == ("new question", "new answer")
    finally:
        cache.drop()
        cache.close()
