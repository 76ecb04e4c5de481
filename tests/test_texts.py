"""Each cached pair's texts are stored once, outside Milvus (velo.edge.texts.TextStore), against a
real Milvus: searches get them back, eviction and restarts keep them right, and a collection
made before the move keeps serving its texts."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from velo.core.shape import AnswerFacts
from velo.edge.cache import VectorCache, VectorDBConfig
from velo.edge.texts import Entry, TextStore

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def texts(entries: dict[int, Entry]) -> dict[int, tuple[str, str]]:
    return {p: (e.question, e.answer) for p, e in entries.items()}


def test_store_keeps_one_copy_per_pair_and_survives_reopening(tmp_path: Path) -> None:
    store = TextStore(tmp_path / "texts.db")
    cut = AnswerFacts("length", prompt_tokens=9, completion_tokens=4, max_tokens=4)
    store.put([Entry(1, "q1", "a1", "acme", "acme", 100.0, cut),
               Entry(2, "q2", "a2", "acme", "~" + "0" * 32, 200.0)])
    store.put([Entry(1, "changed", "changed")])  # a pair's texts never change
    assert texts(store.get([1, 2, 3])) == {1: ("q1", "a1"), 2: ("q2", "a2")}
    assert store.get([1])[1].facts == cut
    assert [e.pair_id for e in store.newest("acme")[0]] == [2, 1]  # newest first
    assert store.scopes("acme") == ["acme", "~" + "0" * 32]
    assert store.select("acme", cached_before=150.0) == [1]
    store.delete([2])
    store.close()
    again = TextStore(tmp_path / "texts.db")
    assert texts(again.get([1, 2])) == {1: ("q1", "a1")} and again.count() == 1
    assert again.get([1])[1] == Entry(1, "q1", "a1", "acme", "acme", 100.0, cut)
    assert again.has(range(5000)) == {1}  # more ids than SQLite takes in one statement
    again.close()


def test_a_texts_file_from_before_tenants_and_facts_is_upgraded(milvus, tmp_path: Path) -> None:
    """An edge's texts file written before entries kept their tenant and answer facts: the
    columns are added on open, tenants, scopes and times read back from the Milvus rows, so
    that an operator can list and delete the old entries; their answers count as complete."""
    rng = np.random.default_rng(9)
    vecs = unit(rng, 2)
    name = f"tx_{uuid.uuid4().hex[:8]}"
    cfg = VectorDBConfig(uri=milvus.uri, token=milvus.token)
    cache = VectorCache(cfg, name, DIM)  # a throwaway store: the rows are what count
    cache.open()
    pair_id = cache.insert_pair("acme", "q", "a", vecs[0], vecs[1], 0.0)
    created = cache.pair_rows([pair_id])[pair_id][0].created
    cache.close()
    old = sqlite3.connect(tmp_path / "texts.db")
    old.execute("CREATE TABLE texts (pair_id INTEGER PRIMARY KEY, question TEXT NOT NULL, "
                "answer TEXT NOT NULL)")
    old.execute("INSERT INTO texts VALUES (?, 'q', 'a')", (pair_id,))
    old.commit()
    old.close()
    upgraded = VectorCache(cfg, name, DIM, texts_path=tmp_path / "texts.db")
    upgraded.open()
    try:
        (entry,), total = upgraded.texts.newest("acme")
        assert total == 1 and (entry.pair_id, entry.tenant, entry.scope) == (pair_id, "acme",
                                                                            "acme")
        assert entry.created == pytest.approx(created) and entry.facts == AnswerFacts()
        (row, _) = upgraded.search(vecs[0], "acme", 2)
        assert row.answer == "a" and row.facts.finish_reason == "stop"
    finally:
        upgraded.drop()
        upgraded.close()


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
        assert texts(cache.texts.get([77])) == {77: ("old question", "old answer")}
        assert cache.texts.newest("t")[0][0].created == 1.0  # read back from its rows
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


@pytest.mark.parametrize("elsewhere_is", ["no file", "an empty file"])
def test_an_edge_started_on_another_data_folder_sets_the_cache_aside_instead_of_wiping_it(
        milvus, tmp_path: Path, elsewhere_is: str) -> None:
    """A texts file without pairs beside a collection that holds rows is another data folder (a
    relative data_dir read from another working directory, a second stack on the same Milvus),
    not a lost store: the edge used to delete every row as an orphan. Now it renames the
    collection aside and starts empty; renamed back, the rows serve again from the folder that
    wrote them. An empty file is what a start that failed after creating it leaves (Milvus not
    up yet at boot): the next start must not take it for a lost store either."""
    rng = np.random.default_rng(12)
    vecs = unit(rng, 6)
    name = f"tx_{uuid.uuid4().hex[:8]}"
    cfg = VectorDBConfig(uri=milvus.uri, token=milvus.token)
    right = tmp_path / "right" / "texts.db"
    cache = VectorCache(cfg, name, DIM, texts_path=right)
    cache.open()
    for n in range(3):
        cache.insert_pair("t", f"question {n}", f"answer {n}", vecs[2 * n], vecs[2 * n + 1], 0.0)
    cache.close()

    if elsewhere_is == "an empty file":
        TextStore(tmp_path / "elsewhere" / "texts.db").close()
    elsewhere = VectorCache(cfg, name, DIM, texts_path=tmp_path / "elsewhere" / "texts.db")
    elsewhere.open()
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    try:
        assert elsewhere.set_aside.startswith(f"{name}_aside_")
        assert elsewhere.removed_without_texts == 0 and elsewhere.count() == 0
        assert elsewhere.search(vecs[3], "t", 1) == []
        elsewhere.insert_pair("t", "its own", "answer", vecs[0], vecs[1], 0.0)
        elsewhere.drop()
        elsewhere.close()
        client.load_collection(elsewhere.set_aside)  # set aside released
        (held,) = client.query(elsewhere.set_aside, filter="id >= 0",
                               output_fields=["count(*)"], consistency_level="Strong")
        assert held["count(*)"] == 6
        client.rename_collection(elsewhere.set_aside, name)
    finally:
        client.close()

    reopened = VectorCache(cfg, name, DIM, texts_path=right)
    reopened.open()
    try:
        assert reopened.set_aside == "" and reopened.removed_without_texts == 0
        assert reopened.count() == 6
        assert [r.answer for r in reopened.search(vecs[3], "t", 1)] == ["answer 1"]
    finally:
        reopened.drop()
        reopened.close()


@pytest.mark.parametrize("damage", ["truncated to half", "truncated to nothing"])
def test_a_damaged_texts_store_is_set_aside_and_its_orphan_rows_removed(
        milvus, tmp_path: Path, damage: str) -> None:
    """Half a file: the edge exited with "database disk image is malformed", naming no file.
    An empty file: it served on, with rows that could never be served counted as cached. Now
    the store checks itself, a damaged file is set aside under a name that says so, the rows
    left without texts are removed (cached rows = what can be served), and new pairs cache. An
    empty file cannot be told from another data folder's new store: its rows are set aside
    with their collection instead (not served, not counted either)."""
    rng = np.random.default_rng(11)
    vecs = unit(rng, 6)
    name = f"tx_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "texts.db"
    cache = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), name, DIM,
                        texts_path=path)
    cache.open()
    for n in range(3):
        cache.insert_pair("t", f"question {n}", f"answer {n}", vecs[2 * n], vecs[2 * n + 1], 0.0)
    cache.close()
    for extra in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        extra.unlink(missing_ok=True)  # as a copy of the file alone would be
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2 if damage == "truncated to half" else 0)

    reopened = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), name, DIM,
                           texts_path=path)
    reopened.open()
    try:
        if damage == "truncated to half":
            aside = reopened.texts.quarantined
            assert aside is not None and aside.name.startswith("texts.db.damaged-")
            assert aside.exists() and aside.stat().st_size == size // 2
        if damage == "truncated to half":
            assert reopened.removed_without_texts == 6  # 3 pairs: a question and an answer row
        else:
            assert reopened.removed_without_texts == 0 and reopened.set_aside
        for _ in range(50):  # count() reads Bounded: it may lag a write by a few seconds
            if reopened.count() == 0:
                break
            time.sleep(0.2)
        assert reopened.count() == 0 and reopened.search(vecs[0], "t", 5) == []
        reopened.insert_pair("t", "question again", "answer again", vecs[0], vecs[1], 0.0)
        assert [r.answer for r in reopened.search(vecs[1], "t", 1)] == ["answer again"]
    finally:
        reopened.drop()
        reopened.close()


def test_a_store_damaged_while_open_names_its_file_in_the_error(tmp_path: Path) -> None:
    """Damage after the start-up check (a disk fault, another writer) surfaces on the next read:
    the error names the file (it said only "database disk image is malformed")."""
    path = tmp_path / "texts.db"
    store = TextStore(path)
    store.put([Entry(i, f"question {i} " * 20, f"answer {i} " * 50) for i in range(2000)])
    store.close()
    store = TextStore(path)  # passes quick_check; nothing read into the page cache yet
    size = path.stat().st_size
    with path.open("r+b") as raw:  # every page but the first turns to noise
        raw.seek(4096)
        raw.write(np.random.default_rng(0).bytes(size - 4096))
    with pytest.raises(sqlite3.DatabaseError, match=f"texts store {path}: "):
        store.get(range(2000))
    store.close()
