"""Micro-batching of concurrent requests (edged.batching) and the write-behind of hit counts
and values (velo.edge.cache): the two hot-path changes measured by tools/bench_edge.py."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest

from edged.batching import MicroBatcher
from velo.edge.cache import VectorCache, VectorDBConfig

DIM = 16


async def test_idle_batcher_runs_at_once_and_busy_one_batches() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(items)
        time.sleep(0.05)  # busy: everything submitted meanwhile waits for the next call
        return [i * i for i in items]

    batcher = MicroBatcher(square, max_batch=4, name="test")
    try:
        assert await batcher.submit(3) == 9
        assert calls == [[3]]  # a single stream is never held back for a batch
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        assert results == [i * i for i in range(10)]  # each caller gets its own result
        sizes = [len(c) for c in calls[1:]]
        assert max(sizes) == 4 and sum(sizes) == 10 and len(sizes) < 10
        assert batcher.items == 11 and batcher.calls == len(calls)
    finally:
        batcher.close()


async def test_batcher_passes_errors_to_every_caller_and_keeps_working() -> None:
    def fail_on_seven(items: list[int]) -> list[int]:
        if 7 in items:
            raise ValueError("seven")
        return items

    batcher = MicroBatcher(fail_on_seven, max_batch=8, name="test")
    try:
        with pytest.raises(ValueError, match="seven"):
            await batcher.submit(7)
        assert await batcher.submit(1) == 1
    finally:
        batcher.close()


async def test_an_error_in_an_items_place_fails_that_caller_alone() -> None:
    """One bad query must not fail its batch-mates (a bad tenant once failed 98 of 120
    requests of another tenant sharing its batches)."""
    def checked(items: list[int]) -> list[int | Exception]:
        time.sleep(0.02)
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    batcher = MicroBatcher(checked, max_batch=16, name="test")
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 2, 3, -4, 5)),
                                       return_exceptions=True)
        assert [r if isinstance(r, int) else str(r) for r in results] == \
            [1, "bad -1", 2, 3, "bad -4", 5]
        assert batcher.calls < 6  # they really shared batches
    finally:
        batcher.close()


def test_a_bad_tenant_in_a_batched_search_fails_alone(milvus) -> None:
    cache = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token),
                        f"t_{uuid.uuid4().hex[:8]}", DIM)
    cache.open()
    try:
        v = np.ones(DIM, np.float32) / np.sqrt(DIM)
        cache.insert_pair("t1", "q", "a", v, v, 0.0)
        results = cache.search_many([("t1", v), ('acme" || tenant != "', v), ("acme\n", v),
                                     ("t2", v)], 5)
        assert [r.question for r in results[0]] == ["q", "q"]
        assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)
        assert results[3] == []  # another tenant sees nothing of t1's
    finally:
        cache.drop()
        cache.close()


async def test_batcher_runs_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    batcher = MicroBatcher(lambda items: seen.append(threading.get_ident()) or items, 2, "t")
    try:
        await batcher.submit(1)
        assert seen and seen[0] != loop_thread
    finally:
        batcher.close()


def test_write_backs_are_seen_at_once_and_reach_milvus_on_flush(milvus, tmp_path) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(4, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    name = f"wb_{uuid.uuid4().hex[:8]}"
    cfg = VectorDBConfig(uri=milvus.uri, token=milvus.token)
    cache = VectorCache(cfg, name, DIM, texts_path=tmp_path / "texts.db")
    cache.open()
    try:
        cache.insert_pair("t", "q0", "a0", vecs[0], vecs[1], value=-1.0)
        cache.insert_pair("t", "q1", "a1", vecs[2], vecs[3], value=-1.0)
        (row,) = cache.search(vecs[0], "t", 1)
        cache.update_row(row, "t", hits=3, value=0.25)
        (seen,) = cache.search(vecs[0], "t", 1)
        assert (seen.hits, seen.value) == (3, 0.25)  # at once, before any flush

        def stored() -> tuple[int, float]:
            (r,) = cache.client.query(name, filter=f"id == {row.id}",
                                      output_fields=["hits", "value", "vec"],
                                      consistency_level="Strong")
            np.testing.assert_allclose(r["vec"], vecs[0], atol=1e-6)  # vector kept
            return r["hits"], r["value"]

        assert stored() == (0, -1.0)  # not yet written: write-behind
        assert cache.flush_updates() == 1
        assert stored() == (3, 0.25)
        assert cache.flush_updates() == 0  # nothing pending any more

        # close() flushes what is pending: a restart loses no hit count.
        cache.update_row(seen, "t", hits=4, value=0.5)
    finally:
        cache.close()
    reopened = VectorCache(cfg, name, DIM, texts_path=tmp_path / "texts.db")
    reopened.open()
    try:
        (again,) = reopened.search(vecs[0], "t", 1)
        assert (again.hits, again.value, again.question, again.answer) == (4, 0.5, "q0", "a0")
        assert again.vector is None  # searches do not fetch the stored vectors from Milvus
        # An evicted row is not brought back by a late write-back.
        reopened.update_row(again, "t", hits=5, value=-9.0)
        assert reopened.evict(below_mean=True, max_rows=100, ttl_s=0) == 1
        reopened.flush_updates()
        left = reopened.client.query(name, filter="id >= 0", output_fields=["kind"],
                                     consistency_level="Strong")
        assert row.id not in {r["id"] for r in left} and len(left) == 3
    finally:
        reopened.drop()
        reopened.close()


async def test_workers_run_batches_side_by_side() -> None:
    threads: set[int] = set()

    def slow(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        time.sleep(0.2)
        return items

    batcher = MicroBatcher(slow, max_batch=1, name="test", workers=2)
    try:
        start = time.perf_counter()
        assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [1, 2]
        assert time.perf_counter() - start < 0.35 and len(threads) == 2
        # After the workers have gone idle, a new submission still runs.
        assert await batcher.submit(3) == 3
    finally:
        batcher.close()


async def test_a_burst_is_shared_between_workers() -> None:
    seen: list[int] = []

    def record(items: list[int]) -> list[int]:
        seen.append(len(items))
        time.sleep(0.05)
        return items

    batcher = MicroBatcher(record, max_batch=16, name="test", workers=2)
    try:
        await asyncio.gather(*(batcher.submit(i) for i in range(8)))
        assert sorted(seen) == [4, 4]  # two runs side by side, not one of 8
    finally:
        batcher.close()


async def test_a_batch_in_parts_answers_each_part_as_it_is_done() -> None:
    """MicroBatcher.in_parts (the embedder's runs): the callers of a finished part go on
    while the rest of the batch still runs; a position the batch function never hands back
    fails its caller instead of leaving it waiting."""
    first_part_answered = threading.Event()

    def parts(items: list[int]):
        yield [0, 1], [items[0] * 10, items[1] * 10]
        # The rest of the batch waits until the first part's callers have their answers.
        assert first_part_answered.wait(5), "the first part was held back until the end"
        yield [2], [items[2] * 10]

    batcher: MicroBatcher[int, int] = MicroBatcher.in_parts(parts, max_batch=8, name="test")
    try:
        a, b, c = (asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3))
        assert await asyncio.wait_for(asyncio.gather(a, b), 5) == [10, 20]
        first_part_answered.set()
        assert await asyncio.wait_for(c, 5) == 30

        def forgetful(items: list[int]):
            yield [0], [items[0]]  # the second item is never handed back

        lossy: MicroBatcher[int, int] = MicroBatcher.in_parts(forgetful, 8, "test")
        blocker = threading.Event()
        lossy._executor.submit(blocker.wait)  # both submissions join one batch
        kept, lost = (asyncio.ensure_future(lossy.submit(i)) for i in (7, 8))
        await asyncio.sleep(0)
        blocker.set()
        assert await asyncio.wait_for(kept, 5) == 7
        with pytest.raises(RuntimeError, match="no result"):
            await asyncio.wait_for(lost, 5)
        lossy.close()
    finally:
        batcher.close()
