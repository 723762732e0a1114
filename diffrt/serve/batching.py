"""One worker per package: a bounded queue, dynamic batching, one batch at a time on a worker thread.

A request waits in the queue until the worker takes it; the worker then gathers queued requests with the same
batch key (task, size, steps, scheduler, guidance, LoRA set) up to `max_batch` images, waiting at most `batch_wait`
for more, and runs them as one pipeline call (`runner.run_batch`), on the package's pipeline or, for requests with
LoRAs, on an adapted one (`lora_cache.AdaptedPipelines`). Requests with other keys keep their place in line.
A full queue refuses at once (429 with Retry-After), never growing without bound. A cancelled request (timeout,
client gone) is skipped if still queued and stops its batch at the next step if it was alone in it.
If a batch of several requests fails, each is run again alone, so an error fails only the request that causes it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diffrt.errors import InputError
from diffrt.serve.jobs import GenerationRequest, GenerationResult, ServeError
from diffrt.serve.lora_cache import AdaptedPipelines
from diffrt.serve.metrics import Metrics
from diffrt.serve.runner import Abandoned, BatchControl, PipelineSet, run_batch

logger = logging.getLogger(__name__)


@dataclass
class Job:
    request: GenerationRequest
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()


class PackageWorker:
    """Serves one package; `submit` from the event loop, `await job.future` for the result."""

    def __init__(self, name: str, pipes: PipelineSet, metrics: Metrics, *, max_batch: int, batch_wait_s: float,
                 max_queue: int, replica: str = "", adapted: AdaptedPipelines | None = None) -> None:
        self.name = name
        self.pipes = pipes
        self.adapted = adapted
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.replica = replica
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffrt-{name}")
        self._task: asyncio.Task | None = None
        self._running: list[Job] = []
        self._control: BatchControl | None = None
        self._batch_seconds = 1.0  # a running mean of batch time: the Retry-After estimate

    # ----- life cycle -----
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"diffrt-worker-{self.name}")

    async def stop(self) -> None:
        for job in list(self._pending):
            job.cancel()
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
        if self.adapted is not None:
            self.adapted.release()

    # ----- requests -----
    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request, or ServeError 429 with Retry-After when `max_queue` requests are waiting."""
        if len(self._pending) >= self.max_queue:
            retry = max(1, math.ceil(self._batch_seconds * (1 + len(self._pending) / max(self.max_batch, 1))))
            raise ServeError(429, f"the queue of {self.name!r} is full ({self.max_queue} requests waiting); retry "
                             f"after {retry} s", code="queue_full", kind="rate_limit_error",
                             headers={"Retry-After": str(retry)})
        try:
            request.prompt_chunks = self.pipes.prompt_chunks(request)
        except InputError as error:
            raise ServeError(400, str(error), param="prompt", code="invalid_value") from None
        job = Job(request, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self.metrics.queue_depth.labels(self.name).set(len(self._pending))
        self._wake.set()
        return job

    def interrupt(self) -> bool:
        """Stop the running batch at its next step (A1111's interrupt); False when nothing runs."""
        control = self._control
        if control is None:
            return False
        control.interrupt.set()
        return True

    def progress(self) -> dict[str, Any]:
        control = self._control
        if control is None:
            return {"running": False, "step": 0, "steps": 0, "queued": len(self._pending), "interrupted": False,
                    "eta_s": 0.0}
        elapsed = time.perf_counter() - control.started
        eta = elapsed / control.step * (control.steps - control.step) if control.step else 0.0
        return {"running": True, "step": control.step, "steps": control.steps, "queued": len(self._pending),
                "interrupted": control.interrupt.is_set(), "eta_s": eta}

    # ----- the loop -----
    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                await self._run(batch)
            except Exception as error:  # a fault here must not stop the worker: fail this batch, serve the next
                logger.exception("batch on %s failed", self.name)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(_as_serve_error(error))

    async def _next_batch(self) -> list[Job]:
        first = await self._take()
        batch, rows = [first], first.request.rows
        key = first.request.batch_key()
        deadline = time.perf_counter() + self.batch_wait_s
        while rows < self.max_batch:
            job = self._take_matching(key, self.max_batch - rows)
            if job is not None:
                batch.append(job)
                rows += job.request.rows
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.labels(self.name).set(len(self._pending))
        return [job for job in batch if not job.cancelled]

    async def _take(self) -> Job:
        while True:
            while self._pending:
                job = self._pending.popleft()
                if not job.cancelled:
                    return job
                self.metrics.cancelled.labels(self.name, "before_start").inc()
            self._wake.clear()
            await self._wake.wait()

    def _take_matching(self, key: Any, room: int) -> Job | None:
        for job in list(self._pending):
            if job.cancelled:
                self._pending.remove(job)
                self.metrics.cancelled.labels(self.name, "before_start").inc()
            elif job.request.batch_key() == key and job.request.rows <= room:
                self._pending.remove(job)
                return job
        return None

    async def _run(self, batch: list[Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            self.metrics.stage.labels(self.name, "queue_wait").observe(now - job.queued_at)
        control = BatchControl(abandoned=lambda: all(job.cancelled for job in batch))
        self._control = control
        start = time.perf_counter()
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_isolated, [job.request for job in batch], control)
        finally:
            self._control = None
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - start)
        for job, result in zip(batch, outcome):
            if job.future.done():  # cancelled meanwhile: nobody to answer
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                result.replica = self.replica
                job.future.set_result(result)

    def _run_isolated(self, requests: list[GenerationRequest], control: BatchControl) -> list[
            GenerationResult | BaseException]:
        """The batch's results, or each request's own error: a failing batch of several runs again one by one."""
        try:
            results: list[GenerationResult | BaseException] = list(run_batch(self._pipes_for(requests[0]),
                                                                             requests, control))
            self._record(results, requests)
            return results
        except ServeError as error:  # the batch's LoRA set cannot be applied: the same for each of its requests
            return [error for _ in requests]
        except Abandoned:
            self.metrics.cancelled.labels(self.name, "while_running").inc(len(requests))
            return [ServeError(499, "cancelled", code="cancelled") for _ in requests]
        except Exception as error:  # noqa: BLE001 - an engine error must fail the request, not the server
            if len(requests) == 1:
                logger.exception("request on %s failed", self.name)
                return [_as_serve_error(error)]
        outcome: list[GenerationResult | BaseException] = []
        for request in requests:
            outcome.extend(self._run_isolated([request], BatchControl(control.abandoned, control.interrupt)))
        return outcome

    def _pipes_for(self, request: GenerationRequest) -> PipelineSet:
        if not request.loras:
            return self.pipes
        if self.adapted is None:  # the API refuses LoRAs before queueing on a server without --lora-dir
            raise ServeError(400, "this server applies no LoRAs (start it with --lora-dir)", param="prompt",
                             code="lora_not_enabled")
        return self.adapted.get(request.loras)

    def _record(self, results: list[GenerationResult | BaseException], requests: list[GenerationRequest]) -> None:
        rows = sum(r.rows for r in requests)
        self.metrics.batch_size.labels(self.name).observe(rows)
        self.metrics.images.labels(self.name).inc(rows)
        timings = next((r.timings for r in results if isinstance(r, GenerationResult)), {})
        for stage, seconds in timings.items():
            self.metrics.stage.labels(self.name, stage).observe(seconds)


def _as_serve_error(error: Exception) -> ServeError:
    if isinstance(error, ServeError):
        return error
    if isinstance(error, InputError):  # a value only the pipeline could check (e.g. an image too small)
        return ServeError(400, str(error), code="invalid_value")
    return ServeError(500, f"generation failed: {type(error).__name__}: {error}", code="engine_error",
                      kind="server_error")
