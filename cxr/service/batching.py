"""Micro-batching: many concurrent requests, one model call.

Each request puts its item on an asyncio queue and awaits a future. One worker task takes the
first waiting item, gathers more for at most `max_wait_ms` (or until `max_batch`), and runs the
batch function once in a single dedicated thread, so the event loop never blocks on the model and
the model never runs twice at once. If a batch raises, its items are retried one by one, so a bad
item fails only its own request.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class BatchStats:
    """Counters shown by GET /health: how well requests are being batched."""

    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    last_batch: int = 0
    model_seconds: float = 0.0
    sizes: Counter = field(default_factory=Counter)

    def record(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.items += n
        self.last_batch = n
        self.max_batch_seen = max(self.max_batch_seen, n)
        self.model_seconds += seconds
        self.sizes[n] += 1

    def to_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0,
                "max_batch_seen": self.max_batch_seen, "last_batch": self.last_batch,
                "model_seconds": round(self.model_seconds, 3),
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class MicroBatcher:
    """`await batcher.submit(item)` -> `fn([item, ...])[i]`, with concurrent submits batched.

    Call `start()` from inside the running event loop (the app's lifespan) and `stop()` at
    shutdown; `fn` takes a list and returns a list of the same length; `initializer` runs once
    in the model thread (e.g. to set torch's thread count there).
    """

    def __init__(self, fn: Callable[[list], Sequence[Any]], max_batch: int = 16,
                 max_wait_ms: float = 5.0, initializer: Callable[[], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = max(float(max_wait_ms), 0.0) / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model",
                                            initializer=initializer)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="cxr-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:  # nobody will serve these any more
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.cancelled()]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, items)
            except Exception as exc:  # pragma: no cover - _run catches per item
                outputs = [exc] * len(items)
            self.stats.record(len(items), time.perf_counter() - start)
            for (_, fut), out in zip(batch, outputs):
                if fut.done():  # the client went away
                    continue
                if isinstance(out, BaseException):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)

    def _run(self, items: list) -> list:
        """The batch at once; if that fails, item by item (each output or its exception)."""
        try:
            outputs = list(self.fn(items))
            if len(outputs) == len(items):
                return outputs
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        outputs = []
        for item in items:
            try:
                outputs.append(self.fn([item])[0])
            except Exception as exc:
                outputs.append(exc)
        return outputs
