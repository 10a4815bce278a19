"""Dynamic batching: concurrent requests become one generation.

Requests go into an asyncio queue; one worker task takes the oldest, waits until ``max_wait_ms``
after it arrived for more requests with the same sampling settings (up to ``max_batch_size``),
and runs one :meth:`Engine.answer` call for them in a worker thread, so the event loop keeps
accepting connections while the model runs. Each decoding step's new tokens are handed to the
requests' own asyncio queues with ``loop.call_soon_threadsafe`` (streaming), then the final
``Answer``.

Batches are grouped by settings: greedy requests batch together whatever their ``max_tokens``
(the batch runs to the largest; each request's answer is cut at its own, which is exactly what it
gets alone, since a greedy row does not depend on its neighbours: :mod:`medtune.generation`
left-pads with per-row positions and masks). Sampled requests batch only with the same
temperature and top-p; a sampled request with a ``seed`` runs alone, so that its draws do not
depend on who else was waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medtune.data.sample import Sample
from medtune.generation import GenerationConfig
from medtune.serve.protocol import APIError

_unique = itertools.count()


def batch_key(temperature: float, top_p: float | None, seed: int | None) -> tuple:
    """Requests with equal keys may share a generation."""
    if temperature <= 0:
        return ("greedy",)
    if seed is not None:
        return ("seeded", next(_unique))
    return ("sampled", float(temperature), top_p)


@dataclass
class Pending:
    """One request waiting for (or in) a batch.

    ``events`` receives ``("tokens", ids)`` per step, then ``("done", Answer)`` or
    ``("error", exception)``.
    """

    sample: Sample
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.key = batch_key(self.temperature, self.top_p, self.seed)


class Batcher:
    """Collects requests into batches and runs them on the engine, one batch at a time.

    Args:
        engine: a :class:`medtune.serve.engine.Engine` (anything with ``answer(samples, settings,
            on_tokens)``).
        max_batch_size: requests per generation (1: one at a time).
        max_wait_ms: how long the oldest request waits for company.
        max_queue: requests allowed to wait; one more gets HTTP 503 at once.
    """

    def __init__(
        self, engine, *, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64
    ):
        self.engine = engine
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.waiting = 0
        self.running = 0
        self.batch_sizes: list[int] = []  # history, for /health and tests
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medtune-generate")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker(), name="medtune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, req: Pending) -> None:
        """Queue a request.

        Raises:
            APIError: HTTP 503 when ``max_queue`` requests are already waiting.
        """
        if self._queue is None:
            raise APIError(503, "the server is starting", type="server_error", code="not_ready")
        if self.waiting >= self.max_queue:
            raise APIError(
                503,
                f"the server is busy ({self.waiting} requests waiting); retry shortly",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        self._queue.put_nowait(req)

    async def _worker(self) -> None:
        pending: deque[Pending] = deque()
        loop = asyncio.get_running_loop()
        while True:
            if not pending:
                pending.append(await self._queue.get())
            first = pending[0]
            same = sum(1 for r in pending if r.key == first.key)
            # collect company until the oldest request has waited max_wait or the batch is full
            while same < self.max_batch_size:
                while not self._queue.empty():
                    pending.append(self._queue.get_nowait())
                    same += pending[-1].key == first.key
                remaining = first.arrived + self.max_wait - time.monotonic()
                if same >= self.max_batch_size or remaining <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), remaining))
                    same += pending[-1].key == first.key
                except TimeoutError:
                    break
            batch: list[Pending] = []
            for r in list(pending):
                if r.key == first.key and len(batch) < self.max_batch_size:
                    pending.remove(r)
                    self.waiting -= 1
                    if not r.cancelled:  # a client that went away before its turn
                        batch.append(r)
            if batch:
                await self._run(batch, loop)

    async def _run(self, batch: list[Pending], loop: asyncio.AbstractEventLoop) -> None:
        head = batch[0]
        settings = GenerationConfig.from_config(
            {
                "max_new_tokens": max(r.max_tokens for r in batch),
                "temperature": float(head.temperature),
                "top_p": head.top_p,
                "seed": int(head.seed) if head.seed is not None else random.getrandbits(31),
            }
        )

        def deliver(indices: list[int], token_ids: list[int]) -> None:
            for i, t in zip(indices, token_ids):
                batch[i].events.put_nowait(("tokens", [int(t)]))

        def on_tokens(indices: list[int], token_ids: list[int]) -> None:
            loop.call_soon_threadsafe(deliver, list(indices), list(token_ids))

        self.running = len(batch)
        self.batch_sizes.append(len(batch))
        try:
            answers = await loop.run_in_executor(
                self._pool, self.engine.answer, [r.sample for r in batch], settings, on_tokens
            )
        except Exception as e:  # reported to every request of the batch
            for r in batch:
                r.events.put_nowait(("error", e))
        else:
            for r, a in zip(batch, answers):
                r.events.put_nowait(("done", a))
        finally:
            self.running = 0

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": self.waiting,
            "running": self.running,
            "batches": len(self.batch_sizes),
            "largest_batch": max(self.batch_sizes, default=0),
            "max_batch_size": self.max_batch_size,
        }
