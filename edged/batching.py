"""Micro-batching: concurrent requests share one call of a batched function.

Natural batching, no timer: when a worker is idle a submission runs at once, so a single
stream pays no added latency; while all workers are busy, submissions queue and the next free
worker takes up to `max_batch` of them. Under load the batch grows by itself, which is when
batching pays (one vector search or one transaction for many requests).

The function runs in the batcher's own worker threads (`workers` of them, each running one
batch at a time), off the event loop. Several workers pay where the function releases the
GIL and one call leaves cores idle (onnxruntime: a small run cannot keep two threads busy).

A batcher made with `MicroBatcher.in_parts` hands each part of a batch back as soon as it is
done (the embedder runs a batch as several runs of similar length): its callers go on while
the rest of the batch runs, so under load the next batch is already waiting when a worker is
free. Handed back all at once, a closed loop of clients runs in lock step with the workers,
which then wait for work between batches (on 2 cores at 64 clients, with batches of 32
instead of 16: +16 % new-prompt Asks a second, docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
# A part of a batch: the positions of some of its items, and their results in that order.
Part = tuple[Sequence[int], Iterable[R | BaseException]]


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` returns `fn([..., item, ...])[i]` for that item. When `fn` raises,
    every caller of the batch gets the exception; when it puts an exception in an item's
    place, that caller alone gets it (one bad query must not fail its batch-mates)."""

    # `fn` returns one result per item, in order (an array counts: it iterates by row), or an
    # exception in the place of an item that failed alone.
    def __init__(self, fn: Callable[[list[T]], Iterable[R | BaseException]], max_batch: int,
                 name: str, workers: int = 1) -> None:
        self._init(lambda items: [(range(len(items)), fn(items))], max_batch, name, workers)

    @classmethod
    def in_parts(cls, parts: Callable[[list[T]], Iterable[Part[R]]], max_batch: int, name: str,
                 workers: int = 1) -> MicroBatcher[T, R]:
        """A batcher whose `parts(items)` yields the batch's results a part at a time (every
        position once); each part's callers are answered as it comes."""
        batcher = cls.__new__(cls)
        batcher._init(parts, max_batch, name, workers)
        return batcher

    def _init(self, parts: Callable[[list[T]], Iterable[Part[R]]], max_batch: int, name: str,
              workers: int) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1")
        self.parts, self.max_batch, self.name, self.workers = parts, max_batch, name, workers
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._drains: set[asyncio.Task[None]] = set()
        self._busy = 0  # workers running a batch now
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.calls = 0  # batches run, and items in them: their ratio is the mean batch size
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if len(self._drains) < self.workers:
            self._drains.add(asyncio.create_task(self._drain(), name=self.name))
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                # A fair share, so that a burst is split over every worker instead of one
                # worker taking it all while the others find the queue empty.
                share = -(-len(self._queue) // (self.workers - self._busy))
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, share))]
                batch = [(item, fut) for item, fut in batch if not fut.done()]  # timed out
                if not batch:
                    continue
                self.calls += 1
                self.items += len(batch)
                self._busy += 1
                error: Exception
                try:
                    await loop.run_in_executor(self._executor, self._run, loop, batch)
                    error = RuntimeError(f"{self.name}: the batch function gave no result for "
                                         "this item")
                except Exception as exc:
                    error = exc
                finally:
                    self._busy -= 1
                # The parts handed back are settled by now (the loop runs callbacks in the
                # order they came); whoever is still waiting gets the error.
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
        finally:
            # Here, not in a done callback: between this task's last look at the queue and a
            # callback, a submission would find every worker "busy" and wait forever.
            self._drains.discard(asyncio.current_task())

    def _run(self, loop: asyncio.AbstractEventLoop,
             batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """In a worker thread: run the batch, handing each part back to the loop as it comes."""
        for positions, results in self.parts([item for item, _ in batch]):
            done = [(batch[i][1], result) for i, result in zip(positions, results, strict=True)]
            loop.call_soon_threadsafe(_settle, done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(done: list[tuple[asyncio.Future[R], R | BaseException]]) -> None:
    for fut, result in done:
        if fut.done():  # its caller gave up (timed out or cancelled)
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
