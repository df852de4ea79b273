"""Dynamic batching: concurrent caption requests gathered into one batched speculative decode.

One asyncio task pulls jobs from a bounded queue. It takes the first waiting job, then keeps taking
jobs until it holds ``max_batch_size`` of them or ``max_wait_ms`` has passed since the first, and runs
them as one call of the caption function in a single worker thread (the model is not thread-safe, so
exactly one decode runs at a time; while it runs, new requests queue up and form the next batch). Jobs
in a batch that differ in prompt or ``max_new_tokens`` are split into groups that each make one call.

Failure isolation: when a batched call raises, each of its jobs is run again alone, so one request
that breaks the model fails alone and its batch-mates still get their captions. A job that fails alone
with ``ValueError``/``TypeError`` (the model rejecting this input) is answered 422 ``invalid_input``;
any other exception is a real internal failure, 500 ``internal_error``, logged with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ServeError

log = logging.getLogger("mmspec.serve")

# caption_fn(images, prompt, max_new_tokens) -> one caption per image, in order.
CaptionFn = Callable[[List[Any], Optional[str], int], Sequence[str]]


@dataclass
class CaptionResult:
    """What a request gets back from the batcher.

    Attributes:
        caption: the generated text.
        batch_size: how many requests shared the decode call that produced it (1 when run alone).
        queue_ms: time from entering the queue to the start of its decode.
        decode_ms: wall time of that decode call.
    """

    caption: str
    batch_size: int
    queue_ms: float
    decode_ms: float


@dataclass
class _Job:
    image: Any
    prompt: Optional[str]
    max_new_tokens: int
    request_id: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """Counters since start: decode calls, requests answered, requests failed, isolation retries."""

    batches: int = 0
    requests: int = 0
    failed: int = 0
    retried_alone: int = 0
    batch_seconds: float = 0.0  # moving average of one decode call's wall time

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class Batcher:
    """Gathers queued caption jobs into batched calls of ``caption_fn`` in one worker thread.

    Args:
        caption_fn: ``(images, prompt, max_new_tokens) -> list[str]``; called from the worker thread,
            never concurrently with itself.
        max_batch_size: most jobs per call (1 turns batching off).
        max_wait_ms: how long the first job of a batch waits for batch-mates.
        max_queue: most jobs waiting (not counting the batch being decoded); ``submit`` beyond it raises
            ``ServeError('overloaded')`` with a Retry-After estimate.
        executor: the worker thread pool (``max_workers=1``); one is made when omitted.
    """

    def __init__(self, caption_fn: CaptionFn, max_batch_size: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64, executor: Optional[ThreadPoolExecutor] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.caption_fn = caption_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmspec-decode")
        self.stats = BatcherStats()
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self._busy = False  # a decode call is running
        self._started = 0.0  # perf_counter at the start of the latest decode call
        self._inflight: List[_Job] = []  # taken from the queue, not answered yet

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is not None:
            raise RuntimeError("Batcher.start() called twice")
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mmspec-batcher")

    async def stop(self, timeout: Optional[float] = None) -> None:
        """Refuse new jobs, finish every job already queued or decoding, then stop the task.

        ``timeout`` bounds the wait in seconds; jobs still queued after it are failed with 503.
        """
        self._closing = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d queued caption requests not finished in %.1fs", self._queue.qsize(), timeout)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        leftover = list(self._inflight)
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for job in leftover:
            if not job.future.done():
                job.future.set_exception(ServeError("not_ready", "the server is shutting down", retry_after=1))
        self.executor.shutdown(wait=False)  # a decode still running after the timeout must not block the loop

    # ---------------------------------------------------------------- state
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def closing(self) -> bool:
        """True once ``stop`` was called, or if the task ended."""
        return self._closing or (self._task is not None and self._task.done())

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (the batch being decoded is not counted)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def full(self) -> bool:
        return self.depth >= self.max_queue

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the batches ahead of it times the recent decode time."""
        per_batch = self.stats.batch_seconds or 1.0
        batches_ahead = math.ceil(self.depth / self.max_batch_size) + (1 if self._busy else 0)
        return int(min(60, max(1, math.ceil(batches_ahead * per_batch))))

    # ---------------------------------------------------------------- submit
    async def submit(self, image, prompt: Optional[str], max_new_tokens: int, request_id: str) -> CaptionResult:
        """Queue one image and wait for its caption.

        Raises ``ServeError``: ``overloaded`` (503) when the queue is full, ``not_ready`` (503) while
        stopping, ``invalid_input`` (422) or ``internal_error`` (500) when the model fails on this job.
        """
        if self._queue is None or not self.running:
            raise ServeError("not_ready", "the server is shutting down or not started", retry_after=1)
        job = _Job(image, prompt, int(max_new_tokens), request_id, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServeError("overloaded", f"the request queue is full ({self.max_queue} waiting); retry later",
                             retry_after=self.retry_after()) from None
        return await job.future

    # ---------------------------------------------------------------- the loop
    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            try:
                live = [j for j in batch if not j.future.done()]  # a client that went away cancels its future
                groups: Dict[Tuple[Optional[str], int], List[_Job]] = {}
                for job in live:
                    groups.setdefault((job.prompt, job.max_new_tokens), []).append(job)
                for (prompt, max_new_tokens), jobs in groups.items():
                    await self._decode(jobs, prompt, max_new_tokens)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not stop the server: fail this batch, keep serving
                log.exception("batcher error")
                for job in batch:
                    if not job.future.done():
                        self._fail(job, RuntimeError(f"batcher error: {type(e).__name__}: {e}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _gather(self) -> List[_Job]:
        first = await self._queue.get()
        batch = self._inflight = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    batch.append(self._queue.get_nowait())  # no more waiting, but take what is already there
                else:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    async def _decode(self, jobs: List[_Job], prompt: Optional[str], max_new_tokens: int) -> None:
        ids = ",".join(j.request_id for j in jobs)
        try:
            captions, seconds = await self._call([j.image for j in jobs], prompt, max_new_tokens)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("batch of %d failed (%s: %s); retrying each request alone [request_ids=%s]",
                        len(jobs), type(e).__name__, e, ids)
            self.stats.retried_alone += len(jobs)
            for job in jobs:
                await self._decode([job], prompt, max_new_tokens)
            return
        log.info("decoded batch of %d in %.1f ms [request_ids=%s]", len(jobs), seconds * 1e3, ids)
        for job, caption in zip(jobs, captions):
            if not job.future.done():
                job.future.set_result(CaptionResult(caption=caption, batch_size=len(jobs),
                                                    queue_ms=(self._started - job.enqueued) * 1e3,
                                                    decode_ms=seconds * 1e3))
        self.stats.requests += len(jobs)

    async def _call(self, images, prompt, max_new_tokens):
        loop = asyncio.get_running_loop()
        self._busy = True
        self._started = time.perf_counter()
        try:
            captions = await loop.run_in_executor(self.executor, self.caption_fn, images, prompt, max_new_tokens)
        finally:
            self._busy = False
        seconds = time.perf_counter() - self._started
        captions = list(captions)
        if len(captions) != len(images) or not all(isinstance(c, str) for c in captions):
            raise RuntimeError(f"caption function returned {len(captions)} items for {len(images)} images")
        self.stats.batches += 1
        a = 0.2  # moving average: recent load decides Retry-After
        self.stats.batch_seconds = seconds if self.stats.batches == 1 else (1 - a) * self.stats.batch_seconds + a * seconds
        return captions, seconds

    def _fail(self, job: _Job, e: Exception) -> None:
        self.stats.failed += 1
        if isinstance(e, (ValueError, TypeError)):
            log.info("model rejected the input: %s: %s [request_id=%s]", type(e).__name__, e, job.request_id)
            err = ServeError("invalid_input", f"the model rejected this input: {e}")
        else:
            log.error("caption failed [request_id=%s]", job.request_id, exc_info=(type(e), e, e.__traceback__))
            err = ServeError("internal_error", f"the model failed on this request ({type(e).__name__}); "
                             f"the server log has the details under request id {job.request_id}")
        if not job.future.done():
            job.future.set_exception(err)
