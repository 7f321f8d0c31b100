"""Micro-batching: concurrent requests share one forward pass.

Requests put their preprocessed image on a bounded queue and await a future. One worker task takes the first
waiting image, gathers more for at most `max_wait_ms` or until `max_batch_size`, and runs the model in a single
inference thread (off the event loop, which keeps accepting and decoding requests meanwhile). A full queue raises
`Overloaded` at once, so an overloaded server answers 503 quickly instead of letting every request time out.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from catdog.serve.observability import ServiceMetrics


class Overloaded(Exception):
    """The inference queue is full."""


class MicroBatcher:
    def __init__(self, predict_batch: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, metrics: ServiceMetrics):
        self.predict_batch = predict_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catdog-inference")
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.worker:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(Overloaded("server is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise Overloaded(f"inference queue is full ({self.queue.maxsize} images waiting)") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(items) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            live = [(image, future) for image, future in items if not future.cancelled()]
            if not live:
                continue
            self.metrics.batch_size.observe(len(live))
            try:
                batch = np.stack([image for image, _ in live])
                probabilities = await loop.run_in_executor(self.executor, self.predict_batch, batch)
            except Exception as error:  # surfaced to each waiting request, never kills the worker
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.metrics.images.inc(len(live))
            for (_, future), row in zip(live, probabilities):
                if not future.done():
                    future.set_result(row)
