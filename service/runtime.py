"""ONNX Runtime sessions and the per-model dynamic micro-batcher.

A model has one or more ``InferenceSession`` replicas, each run by its own worker thread, while
request handling stays on the event loop. The batcher merges concurrent requests (same
per-sample shape) into one ``session.run`` of up to ``max_batch_size`` samples. A free replica
runs at once when nothing else is on its way; requests that queue while the replicas are busy
form the next batches (two single-threaded replicas against one two-threaded session at concurrency 32
on 2 cores: from 7 % less to 21 % more in two runs, and a lone request 1.5x slower: bench/classify). It waits (at most
``max_batch_wait_ms``) only for requests announced as being decoded right now, so a lone
request never pays for batching. A full queue answers 503 at once instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service import logs, timing
from service.api.errors import ApiError

log = logging.getLogger("ocellus")


# Runs of models served at any size larger than one 512x512 window (samples x pixels) hand the arena memory they grew
# back after them: kept, one largest run of each of the four free-size reference models held 3.8 GB in one arena.
SHRINK_ABOVE_PIXELS = 512 * 512
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


_arena_lock = threading.Lock()
_arena_shared = False


def _share_one_arena() -> None:
    """One CPU memory arena for every session of the process (ONNX Runtime's environment allocator), grown by what
    a run asks, not in powers of two. Each session's own arena kept its model's largest run for good: the four
    free-size reference models held 6.4 GB after one large run each, over the compose file's 4 GB limit.
    Registered once (ONNX Runtime refuses a second registration)."""
    global _arena_shared
    with _arena_lock:
        if not _arena_shared:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
            _arena_shared = True


def session_options(threads: int) -> ort.SessionOptions:
    _share_one_arena()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spin-waiting threads burn the cores that HTTP parsing and decoding need (measured +27-34 %).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxModel:
    """A loaded graph: ``run(batch)`` returns the outputs in the order of ``output_names``."""

    def __init__(
        self, graph: Path | bytes, input_name: str, output_names: list[str], threads: int, shrink_above: int | None = None
    ) -> None:
        """``graph``: the ONNX file, or its bytes (what was hashed is then what runs). ``shrink_above``: runs of a graph
        of free height and width over this many samples x pixels shrink the arena after them (None: never)."""
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        graph_inputs = {node.name: node for node in self.session.get_inputs()}
        graph_outputs = {node.name for node in self.session.get_outputs()}
        if input_name not in graph_inputs:
            raise ValueError(f"the graph has no input {input_name!r} (it has {sorted(graph_inputs)})")
        missing = [name for name in output_names if name not in graph_outputs]
        if missing:
            raise ValueError(f"the graph has no output(s) {missing} (it has {sorted(graph_outputs)})")
        self.input_name = input_name
        self.input_shape = graph_inputs[input_name].shape
        self.output_names = output_names
        # Graphs exported elsewhere often fix the batch (usually to 1); such a graph runs batches in slices.
        first = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        free_size = len(self.input_shape) == 4 and not all(isinstance(side, int) for side in self.input_shape[2:])
        self.shrink_above = shrink_above if free_size else None

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        size = self.fixed_batch
        if size is None or len(batch) == size:
            return self._run(batch)
        count = len(batch)
        missing = -count % size if count else size  # an empty batch still runs once: its outputs keep their shapes
        padded = np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])
        runs = [self._run(padded[i : i + size]) for i in range(0, len(padded), size)]
        return [np.concatenate(parts)[:count] for parts in zip(*runs, strict=True)]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        # (shrink_above is set for graphs of four axes only)
        large = self.shrink_above is not None and batch.shape[0] * batch.shape[2] * batch.shape[3] > self.shrink_above
        return self.session.run(self.output_names, {self.input_name: batch}, _SHRINK if large else None)


@dataclass
class Duration:
    """A count and the nanoseconds they took in all (Triton's statistics extension's unit)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += round(seconds * 1e9)


@dataclass
class RunStatistics:
    """What a model's batcher has done since it was loaded, in the terms of Triton's statistics extension."""

    inference_count: int = 0  # samples run
    execution_count: int = 0  # session.run calls (batches)
    last_inference_ms: int = 0  # epoch milliseconds of the last batch's end
    success: Duration = field(default_factory=Duration)  # per request: queued until answered
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per request: queued until its batch ran
    compute_infer: Duration = field(default_factory=Duration)  # per request: its batch's session.run
    batches: dict[int, Duration] = field(default_factory=dict)  # samples per batch -> its runs


@dataclass
class _Request:
    inputs: np.ndarray  # [n, ...]
    future: asyncio.Future[list[np.ndarray]]
    queued_at: float = field(default_factory=time.perf_counter)
    spent: timing.Spent | None = field(default_factory=timing.current)  # the submitting request's record
    request_id: str | None = field(default_factory=logs.current_request_id)  # names it in a failure's log line


class MicroBatcher:
    """Merges concurrent ``submit`` calls into batched runs, one worker thread per model replica."""

    def __init__(
        self,
        runs: Sequence[Callable[[np.ndarray], list[np.ndarray]]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observe: Callable[[int, float, Sequence[float]], None] | None = None,
        max_batch_pixels: int | None = None,
    ) -> None:
        self._runs = list(runs)
        self.max_batch_size = max_batch_size
        # Free-size graphs: samples x height x width per run. Each request keeps within it alone; merged ones
        # must too, or 32 concurrent denoise requests would make one run 32 times that, which ONNX Runtime's arena
        # then keeps.
        self.max_batch_pixels = max_batch_pixels
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._observe = observe or (lambda size, seconds, waits: None)
        self.statistics = RunStatistics()
        self._queue: deque[_Request] = deque()
        self._incoming = 0  # requests being decoded for this model: worth waiting for
        self._users = 0  # requests that will submit (again): tiled photos, detect-then-embed
        self._in_hand = 0  # batches taken off the queue: being formed or in session.run
        self._closed = False
        self._arrived: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort{i}") for i in range(len(self._runs))]

    @contextmanager
    def announce(self) -> Iterator[None]:
        """Wrap a request's pre-processing so the batcher knows it is coming (and waits for it)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Wrap a request that runs this model several times: a reload retires the model only after it."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1

    def submit(self, inputs: np.ndarray) -> asyncio.Future[list[np.ndarray]]:
        """Queue ``inputs`` (``[n, ...]``, n >= 1) for a shared batch; the future has their outputs.

        Synchronous on purpose: the request is queued before the caller's next await, so a reload's
        drain cannot miss it.
        """
        if self._closed:
            raise _unloaded()
        if len(self._queue) >= self.max_queue:  # callers that gave up (timed out) hold no place: their entries go first
            self._queue = deque(request for request in self._queue if not request.future.done())
        if len(self._queue) >= self.max_queue:
            raise ApiError(
                503, "overloaded", "too many requests are waiting for this model; retry shortly", headers={"Retry-After": "1"}
            )
        loop = asyncio.get_running_loop()
        if not self._workers or any(worker.done() for worker in self._workers):
            for worker in self._workers:
                worker.cancel()
            self._arrived = asyncio.Event()
            # A fresh context: a worker outlives the request that started it, whose id and timing record it must not keep.
            self._workers = [
                loop.create_task(self._work(replica), context=contextvars.Context()) for replica in range(len(self._runs))
            ]
        request = _Request(inputs, loop.create_future())
        self._queue.append(request)
        assert self._arrived is not None
        self._arrived.set()
        return request.future

    def _limit(self, batch: list[_Request]) -> int:
        """The most samples a batch of this per-sample shape may hold (its first request, whatever its size)."""
        shape = batch[0].inputs.shape[1:]
        limit = self.max_batch_size
        if self.max_batch_pixels is not None and len(shape) >= 2:
            limit = min(limit, self.max_batch_pixels // (shape[-2] * shape[-1] or 1))
        return max(limit, len(batch[0].inputs))

    def _take_compatible(self, batch: list[_Request], count: int) -> int:
        """Move queued requests whose per-sample shape matches the batch's into it."""
        shape, limit = batch[0].inputs.shape[1:], self._limit(batch)
        kept: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            n = len(request.inputs)
            if request.future.done():
                continue  # the caller gave up (timeout or disconnect)
            if request.inputs.shape[1:] == shape and count + n <= limit:
                batch.append(request)
                count += n
            else:
                kept.append(request)
        self._queue.extendleft(reversed(kept))
        return count

    async def _work(self, replica: int) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None
        # Closed is checked as well as cancelled: Python 3.11's wait_for (in _fill) can swallow a
        # cancellation that arrives as the event fires, and the worker must still stop.
        while not self._closed:
            # Sleep only on an empty queue: another replica may have cleared the event while work waits.
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            while self._queue and not self._closed:
                first = self._queue.popleft()
                if first.future.done():
                    continue
                batch = [first]
                self._in_hand += 1
                try:
                    await self._run_batch(loop, replica, batch, await self._fill(batch))
                except asyncio.CancelledError:  # closed while this batch was in hand: answer it, never leave it hanging
                    _fail(batch, _unloaded)
                    raise
                finally:
                    self._in_hand -= 1

    async def _fill(self, batch: list[_Request]) -> int:
        """Add queued requests to ``batch``, waiting (until its first request's max wait) for announced ones."""
        assert self._arrived is not None
        count = self._take_compatible(batch, len(batch[0].inputs))
        deadline, limit = batch[0].queued_at + self.max_wait_s, self._limit(batch)
        # A batch already full (by count, or by pixels for a free-size graph) waits for nobody.
        while count < limit and self._incoming > 0 and (remaining := deadline - time.perf_counter()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            count = self._take_compatible(batch, count)
        return count

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, replica: int, batch: list[_Request], count: int) -> None:
        if self._closed:  # closed while the batch filled (its executor is shut down)
            _fail(batch, _unloaded)
            return
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executors[replica], self._runs[replica], inputs)
        except Exception as error:  # a failed run fails its requests, never the worker
            if len(batch) > 1:
                # One request's tensor can fail a merged run (a graph with data-dependent ops, a client's /v2 input):
                # each runs alone, so the others still get their answers.
                log.warning(
                    "a merged model run failed; its requests run one by one",
                    extra={"error": str(error)[:500], "request_ids": [request.request_id for request in batch]},
                )
                for request in batch:
                    if not request.future.done():
                        await self._run_batch(loop, replica, [request], len(request.inputs))
                return
            self._fail_run(batch, count, error)
            return
        if any(output.ndim == 0 or len(output) != count for output in outputs):
            # Sliced per request below: an output whose first axis is not the batch's would hand one request's
            # results to another (a [1, N, 4] detector output over a merged batch). The graph is at fault: no rerun.
            shapes = [list(output.shape) for output in outputs]
            self._fail_run(
                batch, count, ValueError(f"outputs of shapes {shapes} for a batch of {count}: the first axis must be the batch")
            )
            return
        self._record(batch, count, started, time.perf_counter())
        start = 0
        for request in batch:
            n = len(request.inputs)
            if not request.future.done():
                request.future.set_result([output[start : start + n] for output in outputs])
            start += n

    def _fail_run(self, batch: list[_Request], count: int, error: Exception) -> None:
        ids = [request.request_id for request in batch]
        log.warning("a model run failed", extra={"error": str(error)[:500], "batch": count, "request_ids": ids})
        message = f"the model failed: {error}"
        _fail(batch, lambda: ApiError(500, "inference_failed", message))
        for request in batch:
            self.statistics.fail.add(time.perf_counter() - request.queued_at)

    def _record(self, batch: list[_Request], samples: int, started: float, ended: float) -> None:
        """A batch that ran: into the statistics (/v2) and to the observer (Prometheus)."""
        stats, run = self.statistics, ended - started
        waits = [started - request.queued_at for request in batch]
        stats.inference_count += samples
        stats.execution_count += 1
        stats.last_inference_ms = round(time.time() * 1000)
        stats.batches.setdefault(samples, Duration()).add(run)
        stats.compute_infer.add(run * len(batch), len(batch))  # each request's: its batch's run
        for request, wait in zip(batch, waits, strict=True):
            stats.queue.add(wait)
            # Not answered yet: one already done was given up by its caller (a timeout), not served.
            (stats.fail if request.future.done() else stats.success).add(wait + run)
            timing.add("queue", request.queued_at, started, request.spent)
            timing.add("infer", started, ended, request.spent)
        self._observe(samples, run, waits)

    def queued_count(self) -> int:
        """Requests waiting for a batch (those whose caller gave up included, until a worker drops them)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No request is being decoded for, using, queued at or running in this batcher."""
        return not (self._incoming or self._users or self._queue or self._in_hand)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every request that reached this batcher has its answer."""
        deadline = time.perf_counter() + timeout_s
        while not self.idle and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)  # their frames hold the sessions until they end
        _fail(list(self._queue), _unloaded)
        self._queue.clear()
        for executor in self._executors:
            executor.shutdown(wait=False)


def _unloaded() -> ApiError:
    return ApiError(503, "model_unloaded", "the model was unloaded by a reload; retry", headers={"Retry-After": "1"})


def _fail(requests: list[_Request], error: Callable[[], ApiError]) -> None:
    """Answer every request still waiting with its own instance of ``error()``."""
    for request in requests:
        if not request.future.done():
            request.future.set_exception(error())
