"""The in-process index (velo/edge/index.py) and Milvus never disagree about what may be served:
after concurrent writes, after a crash between the two writes, and after Milvus changes behind
the edge's back (an outage, a restore)."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

import velo.edge.cache
from velo.core.shape import AnswerFacts
from velo.core.state import CachedRow
from velo.edge.cache import VectorCache, VectorDBConfig
from velo.edge.index import RowIndex

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(vectors: np.ndarray, first_id: int) -> list[CachedRow]:
    return [CachedRow(id=first_id + i, pair_id=(first_id + i) // 2, kind=(first_id + i) % 2 + 1,
                      question="", answer="", hits=0, value=0.0, created=1.0, distance=0.0,
                      vector=v) for i, v in enumerate(vectors)]


def test_each_scope_is_searched_alone_and_removed_rows_are_never_found() -> None:
    rng = np.random.default_rng(1)
    vecs = unit(rng, 20)
    index = RowIndex(DIM)
    index.add("a", rows(vecs[:10], 0))
    index.add("b", rows(vecs[10:], 100))
    assert index.search("a", vecs[12], 10)[0][0].id < 100  # b's exact match is not a's
    assert index.search("b", vecs[12], 1)[0][0].id == 102
    assert index.search("c", vecs[12], 1) == [[]]
    index.remove([102])
    assert 102 not in {r.id for r in index.search("b", vecs[12], 10)[0]}
    index.update(103, hits=4, value=0.7)
    (found,) = index.search("b", vecs[13], 1)
    assert (found[0].id, found[0].hits, found[0].value) == (103, 4, 0.7)
    assert len(index) == 19 and index.row_ids() == set(range(10)) | set(range(100, 110)) - {102}


def test_a_grown_scope_is_approximate_and_still_finds_near_duplicates() -> None:
    """Past `exact_up_to` rows a scope becomes IVF over 8-bit vectors: a slightly changed
    vector still finds its row, at about the exact distance, and removals still apply."""
    rng = np.random.default_rng(2)
    vecs = unit(rng, 3000, 64)
    index = RowIndex(64, nlist=16, nprobe=4, exact_up_to=1000)
    index.add("t", rows(vecs[:900], 0))
    index.add("t", rows(vecs[900:], 900))
    probes = unit(rng, 1, 64)[0] * 0.05
    near = vecs[:200] + probes
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    found = index.search("t", near, 1)
    assert sum(r[0].id == i for i, r in enumerate(found)) >= 190
    exact = np.linalg.norm(near - vecs[:200], axis=1)
    assert np.allclose([r[0].distance for r in found], exact, atol=0.03)
    index.remove(range(100))
    assert all(r[0].id >= 100 for r in index.search("t", near[:100], 1))
    assert len(index) == 2900


def test_a_scope_expected_to_be_large_gets_lists_for_its_size() -> None:
    """A rebuild tells the index how large each scope will be: that scope stays exact until it
    has rows to train ~√rows lists on (not nlist), and still finds its near-duplicates; a scope
    told nothing is trained at `exact_up_to` rows on the lists its rows then call for."""
    rng = np.random.default_rng(4)
    vecs = unit(rng, 12_000, 64)
    index = RowIndex(64, nlist=16, nprobe=8, exact_up_to=1000)
    index.expect("big", 65_000)  # sqrt(65,000) ~ 255: 256 lists, trained at 40 x 256 rows
    for start in range(0, 12_000, 1000):
        index.add("big", rows(vecs[start : start + 1000], start))
        index.add("small", rows(vecs[start : start + 1000], 100_000 + start))
        assert index._scopes["big"].exact == (start + 1000 <= 40 * 256)
    assert index._scopes["big"].nlist == 256
    assert index._scopes["small"].nlist == 32  # trained at 2,000 rows: sqrt ~ 45 -> 32 > 16
    near = vecs[:300] + unit(rng, 1, 64)[0] * 0.05
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    assert sum(r[0].id == i for i, r in enumerate(index.search("big", near, 1))) >= 285


def test_compacting_keeps_every_row_and_rows_still_come_and_go() -> None:
    """compact() (after a rebuild) copies the IVF lists into lists of their exact size (the
    memory it saves is measured in tools/bench_edge.py): the same rows at the same distances,
    and rows added or removed afterwards are found or not."""
    rng = np.random.default_rng(3)
    vecs = unit(rng, 4000, 64)
    index = RowIndex(64, nlist=16, nprobe=16, exact_up_to=1000)
    for start in range(0, 3000, 100):  # lists grow by doubling, as a rebuild's batches do
        index.add("t", rows(vecs[start : start + 100], start))
    queries = unit(rng, 50, 64)
    before = [[(r.id, r.distance) for r in hits] for hits in index.search("t", queries, 5)]
    index.compact()
    assert [[(r.id, r.distance) for r in hits] for hits in index.search("t", queries, 5)] == before
    index.add("t", rows(vecs[3000:], 3000))
    index.remove(range(1000))
    assert index.search("t", vecs[3500], 1)[0][0].id == 3500
    assert all(r.id >= 1000 for r in index.search("t", vecs[:1000], 1)[0])
    assert len(index) == 3000


@pytest.fixture
def cache(milvus, tmp_path: Path):
    made: list[VectorCache] = []

    def open_cache(name: str = "") -> VectorCache:
        c = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token),
                        name or f"ri_{uuid.uuid4().hex[:8]}", DIM,
                        texts_path=tmp_path / "texts.db")
        c.open()
        made.append(c)
        return c

    yield open_cache
    if made:
        made[-1].drop()
    for c in made:
        c.close()


def milvus_ids(cache: VectorCache) -> set[int]:
    client = MilvusClient(uri=cache.cfg.uri, token=cache.cfg.token)
    try:
        found = client.query(cache.collection, filter="id >= 0", output_fields=["id"],
                             consistency_level="Strong", limit=16384)
        return {int(r["id"]) for r in found}
    finally:
        client.close()


def test_concurrent_writes_leave_the_index_and_milvus_holding_the_same_rows(cache) -> None:
    """Inserts, operator deletes, evictions and write-backs from four threads at once: the
    index ends with exactly Milvus's rows, and so does an index rebuilt from Milvus."""
    c = cache()
    rng = np.random.default_rng(3)
    vecs = unit(rng, 400)
    inserted: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def guarded(work):
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
        return run

    done = threading.Event()  # the inserts are over: the other writers stop

    def insert() -> None:
        for n in range(0, 400, 8):  # 4 pairs a write
            ids = c.insert_pairs("t", [(f"q{k}", f"a{k}", vecs[k], vecs[k + 1], AnswerFacts())
                                       for k in range(n, n + 8, 2)], float(rng.random()))
            with lock:
                inserted.extend(p for p in ids if p is not None)
        done.set()

    def delete() -> None:
        picker = random.Random(4)
        while not done.is_set():
            with lock:
                doomed = picker.sample(inserted, min(2, len(inserted)))
            c.delete_pairs(doomed)

    def evict() -> None:
        while not done.is_set():
            c.evict(below_mean=False, max_rows=120, ttl_s=0)

    def write_back() -> None:
        while not done.is_set():
            for row in c.search(vecs[int(rng.integers(400))], "t", 3):
                c.update_row(row, "t", row.hits + 1, row.value + 0.1)
            c.flush_updates()

    threads = [threading.Thread(target=guarded(w)) for w in (insert, delete, evict, write_back)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    c.flush_updates()
    assert c.index is not None
    held = milvus_ids(c)
    assert 0 < len(held) < 300  # the evictions and deletes ran among the inserts
    assert c.index.row_ids() == held
    assert c.reload_index() == len(held) and c.index.row_ids() == held


CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    from velo.edge import index
    from velo.edge.cache import VectorCache, VectorDBConfig
    uri, token, name, texts, step = sys.argv[1:]
    c = VectorCache(VectorDBConfig(uri=uri, token=token), name, 16, texts_path=texts)
    c.open()
    rng = np.random.default_rng(5)
    v = rng.normal(size=(2, 16)).astype(np.float32)
    if step == "insert":
        index.RowIndex.add = lambda *a, **k: os._exit(17)   # dies after Milvus took the rows
        c.insert_pair("t", "crash question", "crash answer", v[0], v[1], 0.0)
    else:
        index.RowIndex.remove = lambda *a, **k: os._exit(17)  # dies after Milvus deleted them
        c.delete_pairs([int(step)])
    os._exit(0)
""")


def test_a_crash_between_milvus_and_the_index_is_mended_at_the_next_start(cache, tmp_path):
    """The edge dies after Milvus took a write and before its index did: at the next start the
    index is rebuilt from Milvus, so the pair Milvus took is served and the pair Milvus
    deleted is not."""
    first = cache()
    rng = np.random.default_rng(6)
    kept = first.insert_pair("t", "kept question", "kept answer", *unit(rng, 2), 0.0)
    doomed = first.insert_pair("t", "doomed question", "doomed answer", *unit(rng, 2), 0.0)
    first.close()
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    root = Path(__file__).resolve().parents[1]
    for step in ("insert", str(doomed)):
        done = subprocess.run([sys.executable, str(script), first.cfg.uri, first.cfg.token,
                               first.collection, str(tmp_path / "texts.db"), step], cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 17, done.stderr[-2000:]
    again = cache(first.collection)
    assert again.index is not None
    served = {r.answer for r in again.search(np.zeros(DIM, np.float32), "t", 10)}
    assert served == {"kept answer", "crash answer"}
    assert again.index.row_ids() == milvus_ids(again)
    assert kept is not None and doomed is not None


def test_rows_milvus_gained_while_the_edge_was_away_are_served_after_it_comes_back(cache):
    """Milvus changed behind the edge (another writer, a restore): the probe that finds
    Milvus back rebuilds the index, and the rows Milvus holds are what is served."""
    c = cache()
    rng = np.random.default_rng(7)
    vecs = unit(rng, 4)
    c.insert_pair("t", "before", "before answer", vecs[0], vecs[1], 0.0)
    other = VectorCache(VectorDBConfig(uri=c.cfg.uri, token=c.cfg.token, in_process_index=False),
                        c.collection, DIM, texts_path=c.texts_path)
    other.open()
    other.insert_pair("t", "restored", "restored answer", vecs[2], vecs[3], 0.0)
    other.close()
    assert [r.answer for r in c.search(vecs[2], "t", 1)] == ["before answer"]
    assert c.ping(warm=True) is None
    assert [r.answer for r in c.search(vecs[2], "t", 1)] == ["restored answer"]



def test_rows_other_clients_write_or_delete_reach_the_index_at_its_next_sync(
        cache, monkeypatch) -> None:
    """Another client (an operator's tool) inserts a pair into the edge's collection and
    deletes one of the edge's: the periodic sync adds the one and drops the other, and leaves
    the edge's own fresh writes alone (an insert, a bulk import) although a Bounded scan may
    not see them yet. The counts stay alike here: the sync's every-FULL_SYNC_EVERY-th scan
    finds the change."""
    # Rows younger than this are never taken as deleted elsewhere; 6 s outlasts Milvus's
    # Bounded staleness (5 s) and keeps the test short.
    monkeypatch.setattr(velo.edge.cache, "RECENT_S", 6.0)
    c = cache()
    rng = np.random.default_rng(8)
    vecs = unit(rng, 6)
    gone = c.insert_pair("t", "deleted elsewhere", "deleted answer", vecs[0], vecs[1], 0.0)
    other = VectorCache(VectorDBConfig(uri=c.cfg.uri, token=c.cfg.token, in_process_index=False),
                        c.collection, DIM, texts_path=c.texts_path)
    other.open()
    other.insert_pair("t", "written elsewhere", "written answer", vecs[2], vecs[3], 0.0)
    assert gone is not None
    other.delete_pairs([gone])
    other.close()
    c.insert_pair("t", "fresh", "fresh answer", vecs[4], vecs[5], 0.0)
    imported = unit(rng, 2)
    assert c.import_pairs("t", ["imported"], ["imported answer"], imported[:1], imported[1:],
                          0.0) == 2
    assert c.index is not None and 2 * gone in c.index.row_ids()  # (its texts went too)
    assert {r.answer for r in c.search(vecs[0], "t", 10)} == {"fresh answer", "imported answer"}
    added = removed = 0
    for _ in range(60):  # the scan reads Bounded, and the deleted row must age past RECENT_S
        a, r = c.sync_index()
        added, removed = added + a, removed + r
        if (added, removed) == (2, 2):
            break
        time.sleep(0.5)
    assert (added, removed) == (2, 2)
    assert {r.answer for r in c.search(vecs[0], "t", 10)} == {"written answer", "fresh answer",
                                                             "imported answer"}
    assert c.index.row_ids() == milvus_ids(c)


def test_a_sync_scans_the_rows_only_when_the_counts_differ_or_its_turn_comes(
        cache, monkeypatch) -> None:
    """Scanning every row id takes seconds at 10^6 rows, once a minute: a sync first compares
    row counts (milliseconds). Nothing changed: no scan. Another client's insert: the counts
    differ and the very next sync adds the row. Every FULL_SYNC_EVERY-th sync scans anyway (an
    insert and a delete elsewhere leave the counts alike)."""
    c = cache()
    rng = np.random.default_rng(9)
    vecs = unit(rng, 4)
    c.insert_pair("t", "mine", "my answer", vecs[0], vecs[1], 0.0)
    scans = []
    scan = c._scan
    monkeypatch.setattr(c, "_scan", lambda: scans.append(1) or scan())
    monkeypatch.setattr(velo.edge.cache, "FULL_SYNC_EVERY", 3)
    assert [c.sync_index() for _ in range(2)] == [(0, 0), (0, 0)] and scans == []
    assert c.sync_index() == (0, 0) and scans == [1]  # its turn

    other = VectorCache(VectorDBConfig(uri=c.cfg.uri, token=c.cfg.token, in_process_index=False),
                        c.collection, DIM, texts_path=c.texts_path)
    other.open()
    other.insert_pair("t", "written elsewhere", "written answer", vecs[2], vecs[3], 0.0)
    other.close()
    added = 0
    for _ in range(20):  # the scan reads Bounded: it may miss the row for a few seconds
        added += c.sync_index()[0]
        if added:
            break
        time.sleep(0.5)
    assert added == 2 and len(scans) >= 2
    assert [r.answer for r in c.search(vecs[2], "t", 1)] == ["written answer"]


def test_an_eviction_pass_decides_on_the_index_s_values_without_scanning_milvus(
        cache, monkeypatch) -> None:
    """A pass runs every xi requests; scanning every row's value from Milvus took seconds at
    10^6 rows. The index holds each row's value and creation time: the pass reads them there,
    a write-back not yet flushed included, and Milvus and the index keep the same rows."""
    c = cache()
    rng = np.random.default_rng(11)
    vecs = unit(rng, 8)
    pairs = [c.insert_pair("t", f"q{i}", f"a{i}", vecs[2 * i], vecs[2 * i + 1], value)
             for i, value in enumerate((-2.0, -2.0, 3.0, 3.0))]
    assert None not in pairs
    low = c.pair_rows([pairs[1]])[pairs[1]]  # (pair_id -> rows) of a low-valued pair
    for row in low:  # reused since: its value rose, in memory only (flushed later)
        c.update_row(row, "t", hits=3, value=3.0)
    scans: list[int] = []
    scan = c._scan
    monkeypatch.setattr(c, "_scan", lambda: scans.append(1) or scan())
    dropped = c.evict(below_mean=True, max_rows=100, ttl_s=0)
    assert scans == [] and dropped == 2
    assert c.index is not None
    kept = {int(i) // 2 for i in c.index.row_ids()}
    assert kept == {pairs[1], pairs[2], pairs[3]}
    assert c.index.row_ids() == milvus_ids(c)
