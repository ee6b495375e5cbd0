"""The micro-batcher merges concurrent requests, keeps shapes apart and sheds load when full."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from service import logs
from service.api.errors import ApiError
from service.budget import PixelBudget
from service.runtime import MicroBatcher
from service.runtime import log as runtime_log


class RecordingModel:
    """Doubles its input; remembers each batch it saw. Slow enough for requests to pile up."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        with self.lock:
            self.batches.append(batch.shape)
        time.sleep(self.seconds)
        return [batch * 2, batch.sum(axis=tuple(range(1, batch.ndim)))]


def test_concurrent_requests_share_runs_and_get_their_own_results() -> None:
    model = RecordingModel()

    async def main() -> list[list[np.ndarray]]:
        batcher = MicroBatcher([model], max_batch_size=8, max_wait_s=0.005, max_queue=100)
        inputs = [np.full((1, 3, 4, 4), i, np.float32) for i in range(32)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return results

    results = asyncio.run(main())
    for i, (doubled, total) in enumerate(results):
        assert doubled.shape == (1, 3, 4, 4) and (doubled == 2 * i).all()
        assert total[0] == 48 * i
    assert len(model.batches) <= 8 and max(shape[0] for shape in model.batches) == 8
    assert sum(shape[0] for shape in model.batches) == 32


def test_different_shapes_never_share_a_run() -> None:
    model = RecordingModel()

    async def main() -> None:
        batcher = MicroBatcher([model], max_batch_size=16, max_wait_s=0.005, max_queue=100)
        shapes = [(1, 1, 8, 8), (1, 1, 9, 8)] * 6
        results = await asyncio.gather(*(batcher.submit(np.ones(s, np.float32)) for s in shapes))
        for shape, (doubled, _) in zip(shapes, results, strict=True):
            assert doubled.shape == shape
        await batcher.close()

    asyncio.run(main())
    assert {shape[1:] for shape in model.batches} == {(1, 8, 8), (1, 9, 8)}


def test_merged_runs_of_a_free_size_graph_keep_within_the_pixel_budget() -> None:
    """Concurrent 1-MP denoise windows must not merge into one 32-MP run (ONNX Runtime's arena keeps its peak);
    a request over the budget alone still runs, alone."""
    model = RecordingModel()

    async def main() -> None:
        batcher = MicroBatcher([model], max_batch_size=32, max_wait_s=0.01, max_queue=100, max_batch_pixels=2 * 64 * 64)
        shapes = [(1, 1, 64, 64)] * 9 + [(3, 1, 64, 64)] + [(1, 1, 32, 32)] * 8
        results = await asyncio.gather(*(batcher.submit(np.ones(s, np.float32)) for s in shapes))
        assert [doubled.shape for doubled, _ in results] == shapes
        await batcher.close()

    asyncio.run(main())
    merged = [shape for shape in model.batches if shape != (3, 1, 64, 64)]  # the big request ran alone
    assert max(shape[0] * shape[2] * shape[3] for shape in merged) <= 2 * 64 * 64
    assert model.batches.count((3, 1, 64, 64)) == 1 and (8, 1, 32, 32) in model.batches  # small windows still merge


def test_a_full_queue_answers_503_with_retry_after() -> None:
    model = RecordingModel(seconds=0.2)

    async def main() -> list[object]:
        batcher = MicroBatcher([model], max_batch_size=1, max_wait_s=0, max_queue=3)
        results: list[object] = []
        futures = []
        for _ in range(8):  # a full queue refuses at submit time, before anything is awaited
            try:
                futures.append(batcher.submit(np.ones((1, 2), np.float32)))
            except ApiError as refused:
                results.append(refused)
        results += await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    rejected = [r for r in results if isinstance(r, ApiError)]
    assert rejected and all(r.status_code == 503 and r.headers["Retry-After"] for r in rejected)
    assert sum(not isinstance(r, Exception) for r in results) >= 3


def test_requests_whose_callers_gave_up_hold_no_place_in_the_queue() -> None:
    """Two requests time out while the model is busy: their entries stayed queued, so the next one got 503 overloaded
    with nobody waiting, and each counted as a success once run."""
    model = RecordingModel(seconds=0.5)

    async def main() -> None:
        batcher = MicroBatcher([model], max_batch_size=1, max_wait_s=0, max_queue=2)
        running = batcher.submit(np.ones((1, 2), np.float32))
        await asyncio.sleep(0.05)  # taken by the worker: the model is busy
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.submit(np.ones((1, 2), np.float32)), 0.05)
        assert batcher.queued_count() == 2
        (out, _), _ = await asyncio.gather(running, batcher.submit(np.ones((1, 2), np.float32)))
        assert out.shape == (1, 2) and batcher.queued_count() == 0
        assert batcher.statistics.success.count == 2 and len(model.batches) == 2  # the given-up ones never ran
        await batcher.close()

    asyncio.run(main())


def test_a_batch_full_by_pixels_waits_for_nobody() -> None:
    """A free-size graph's batch at its pixel budget (a denoise tile group) waited the whole max wait whenever another
    request was being decoded."""
    model = RecordingModel(seconds=0)

    async def main() -> float:
        batcher = MicroBatcher([model], max_batch_size=8, max_wait_s=0.5, max_queue=8, max_batch_pixels=4 * 64 * 64)
        with batcher.announce():  # another request is being decoded
            started = time.perf_counter()
            await batcher.submit(np.zeros((4, 1, 64, 64), np.float32))
            took = time.perf_counter() - started
        await batcher.close()
        return took

    assert asyncio.run(main()) < 0.25


def test_an_output_without_the_batch_first_fails_the_run_instead_of_mixing_up_requests() -> None:
    """A graph whose output is [1, N*A, 4] over a merged batch: the first request got both requests' rows, the second
    none; a 0-d output killed the worker and its requests waited for their timeout."""

    def flattened(batch: np.ndarray) -> list[np.ndarray]:
        time.sleep(0.05)
        return [batch.reshape(1, -1)]

    async def main() -> None:
        for run in (flattened, lambda batch: [np.array(1.0, np.float32)]):
            batcher = MicroBatcher([run], max_batch_size=4, max_wait_s=0.01, max_queue=10)
            first = batcher.submit(np.ones((1, 3), np.float32))
            results = await asyncio.wait_for(
                asyncio.gather(first, batcher.submit(np.ones((1, 3), np.float32)), return_exceptions=True), 2
            )
            assert all(isinstance(r, ApiError) and r.code == "inference_failed" for r in results), results
            await batcher.close()

    asyncio.run(main())


def test_a_failing_model_fails_its_requests_but_not_the_batcher() -> None:
    calls = 0

    def flaky(batch: np.ndarray) -> list[np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return [batch]

    async def main() -> None:
        batcher = MicroBatcher([flaky], max_batch_size=4, max_wait_s=0, max_queue=10)
        with pytest.raises(ApiError):
            await batcher.submit(np.ones((1, 2), np.float32))
        (out,) = await batcher.submit(np.ones((1, 2), np.float32))
        assert out.shape == (1, 2)
        await batcher.close()

    asyncio.run(main())


def test_a_request_that_fails_a_merged_run_fails_alone() -> None:
    """One request's tensor that the graph refuses (here: any NaN) failed every request merged with it."""
    runs: list[int] = []

    def refuses_nan(batch: np.ndarray) -> list[np.ndarray]:
        runs.append(len(batch))
        if np.isnan(batch).any():
            raise RuntimeError("NaN in the input")
        return [batch * 2]

    async def main() -> list[object]:
        batcher = MicroBatcher([refuses_nan], max_batch_size=8, max_wait_s=0.01, max_queue=10)
        inputs = [np.ones((1, 2), np.float32), np.full((1, 2), np.nan, np.float32), np.full((1, 2), 3, np.float32)]

        async def request(index: int, x: np.ndarray) -> list[np.ndarray]:  # a task per request, as the server's
            logs.set_request_id(f"request-{index}")
            return await batcher.submit(x)

        calls = (request(i, x) for i, x in enumerate(inputs))
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
        await batcher.close()
        return results

    lines: list[logging.LogRecord] = []
    stamped: list[str | None] = []  # the request id the JSON line would carry (the emitting context's)
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record) or stamped.append(logs.current_request_id())  # type: ignore[method-assign,func-returns-value]
    runtime_log.addHandler(handler)
    try:
        first, bad, third = asyncio.run(main())
    finally:
        runtime_log.removeHandler(handler)
    assert runs == [3, 1, 1, 1]  # the merged run, then each request alone
    # The log names the requests a failure touched (an operator finds the client's request by its X-Request-ID).
    ids = [getattr(line, "request_ids", None) for line in lines]
    assert ids == [["request-0", "request-1", "request-2"], ["request-1"]]
    assert stamped == [None, None]  # not the id of the request whose submit started the worker (request-0)
    assert isinstance(first, list) and (first[0] == 2).all()
    assert isinstance(third, list) and (third[0] == 6).all()
    assert isinstance(bad, ApiError) and bad.code == "inference_failed" and "NaN" in bad.detail


def test_a_lone_request_never_waits_for_company() -> None:
    model = RecordingModel(seconds=0.0)

    async def main() -> float:
        batcher = MicroBatcher([model], max_batch_size=32, max_wait_s=0.5, max_queue=10)
        started = time.perf_counter()
        await batcher.submit(np.ones((1, 2), np.float32))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(main()) < 0.25


def test_requests_announced_while_decoding_join_the_batch() -> None:
    model = RecordingModel(seconds=0.0)

    async def late_request(batcher: MicroBatcher) -> None:
        with batcher.announce():
            await asyncio.sleep(0.05)  # still decoding when the first request reaches the batcher
            inputs = np.ones((1, 2), np.float32)
        await batcher.submit(inputs)

    async def main() -> None:
        batcher = MicroBatcher([model], max_batch_size=8, max_wait_s=1.0, max_queue=10)
        late = asyncio.create_task(late_request(batcher))
        await asyncio.sleep(0)  # the late request announces itself first
        await batcher.submit(np.ones((1, 2), np.float32))
        await late
        await batcher.close()

    asyncio.run(main())
    assert model.batches == [(2, 2)]


def test_drain_waits_for_announced_and_running_requests_then_close_refuses_new_ones() -> None:
    model = RecordingModel(seconds=0.1)

    async def main() -> None:
        batcher = MicroBatcher([model], max_batch_size=4, max_wait_s=0.0, max_queue=10)

        answers: list[asyncio.Future[list[np.ndarray]]] = []

        async def slow_client() -> list[np.ndarray]:
            with batcher.announce():
                await asyncio.sleep(0.05)  # decoding when the reload starts draining
            answers.append(batcher.submit(np.ones((1, 2), np.float32)))
            return await answers[0]

        client = asyncio.create_task(slow_client())
        await asyncio.sleep(0)
        assert not batcher.idle
        await batcher.drain(timeout_s=5)
        # The answer is there when drain returns (the client task itself resumes a loop turn later).
        assert batcher.idle and answers[0].done() and answers[0].result()[0].shape == (1, 2)
        assert (await client)[0].shape == (1, 2)
        await batcher.close()
        with pytest.raises(ApiError) as raised:
            await batcher.submit(np.ones((1, 2), np.float32))
        assert raised.value.status_code == 503 and raised.value.code == "model_unloaded"

    asyncio.run(main())


def test_replicas_run_batches_side_by_side() -> None:
    # Each replica's run waits at a two-party barrier: it only passes when both run at once.
    barrier = threading.Barrier(2, timeout=5)
    seen: list[int] = []

    def replica(batch: np.ndarray) -> list[np.ndarray]:
        seen.append(barrier.wait())
        return [batch]

    async def main() -> list[list[np.ndarray]]:
        batcher = MicroBatcher([replica, replica], max_batch_size=1, max_wait_s=0, max_queue=10)
        results = await asyncio.gather(*(batcher.submit(np.full((1, 2), i, np.float32)) for i in range(4)))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert [float(out[0, 0]) for (out,) in results] == [0, 1, 2, 3]
    assert sorted(seen) == [0, 0, 1, 1]  # two rounds of two concurrent runs; a broken barrier would raise


def test_a_submitted_request_counts_before_its_first_await() -> None:
    # A reload drains a batcher once it looks idle; a request must be visible from the moment it is submitted.
    async def main() -> None:
        batcher = MicroBatcher([RecordingModel(seconds=0.05)], max_batch_size=4, max_wait_s=0, max_queue=10)
        future = batcher.submit(np.ones((1, 2), np.float32))
        assert not batcher.idle
        await batcher.drain(timeout_s=5)
        assert future.done() and future.result()[0].shape == (1, 2)
        await batcher.close()

    asyncio.run(main())


def test_a_request_in_use_across_several_runs_keeps_the_batcher_from_draining() -> None:
    # A tiled photo submits one batch of tiles after another; between two, nothing is queued or running.
    async def main() -> None:
        batcher = MicroBatcher([RecordingModel(seconds=0.01)], max_batch_size=4, max_wait_s=0, max_queue=10)

        async def tiled_request() -> int:
            with batcher.in_use():
                for _ in range(5):
                    await batcher.submit(np.ones((1, 2), np.float32))
                    await asyncio.sleep(0.01)  # stitching between runs
            return 5

        request = asyncio.create_task(tiled_request())
        await asyncio.sleep(0.015)
        await batcher.drain(timeout_s=5)
        assert request.done() and request.result() == 5  # drain waited for the last tile batch
        await batcher.close()

    asyncio.run(main())


def test_a_batch_being_formed_counts_until_it_is_answered() -> None:
    # The worker holds a request while it waits for announced company; the batcher is not idle meanwhile.
    async def main() -> None:
        batcher = MicroBatcher([RecordingModel(seconds=0.01)], max_batch_size=4, max_wait_s=0.2, max_queue=10)
        with batcher.announce():  # this one ends without submitting (say its photo had no face)
            future = batcher.submit(np.ones((1, 2), np.float32))
            await asyncio.sleep(0.01)  # the worker has taken it and waits for the announced request
        assert not batcher.idle
        await batcher.drain(timeout_s=5)
        assert future.done() and future.result()[0].shape == (1, 2)
        await batcher.close()

    asyncio.run(main())


def test_close_answers_the_batch_it_interrupts() -> None:
    async def main() -> None:
        batcher = MicroBatcher([RecordingModel(seconds=0.3)], max_batch_size=1, max_wait_s=0, max_queue=10)
        running = batcher.submit(np.ones((1, 2), np.float32))
        queued = batcher.submit(np.ones((1, 2), np.float32))
        await asyncio.sleep(0.05)  # the first is in session.run, the second queued
        await batcher.close()
        for future in (running, queued):
            with pytest.raises(ApiError) as raised:
                await asyncio.wait_for(future, 1)
            assert raised.value.status_code == 503 and raised.value.headers == {"Retry-After": "1"}

    asyncio.run(main())


def test_a_worker_whose_cancellation_is_lost_still_stops_at_close() -> None:
    # Python 3.11's wait_for can swallow a cancellation that arrives as the awaited event fires. Simulated
    # here by a close whose cancel never reaches the worker: the batch in formation still gets 503, not a
    # run on a shut-down executor (a 500), and the worker ends instead of waiting forever.
    async def main() -> None:
        model = RecordingModel(seconds=0.01)
        batcher = MicroBatcher([model], max_batch_size=4, max_wait_s=0.3, max_queue=10)
        with batcher.announce():  # the worker waits in _fill for this announced request
            forming = batcher.submit(np.ones((1, 2), np.float32))
            await asyncio.sleep(0.02)
            workers = list(batcher._workers)
            batcher._workers = []  # close() cancels nobody: the lost cancellation
            await batcher.close()
        with pytest.raises(ApiError) as raised:
            await asyncio.wait_for(forming, 1)
        assert raised.value.status_code == 503 and raised.value.code == "model_unloaded"
        await asyncio.wait_for(asyncio.gather(*workers), 1)
        assert model.batches == []

    asyncio.run(main())


def test_only_runs_past_what_a_model_is_served_at_shrink_the_arena() -> None:
    """A free-size graph hands its arena's growth back after runs over ``shrink_above`` samples x pixels, sliced runs of a
    fixed-batch graph included; a model served at a fixed size (the repository's choice) never does for its own
    batches: each shrink made the next run take its memory from the system again (~8 % slower)."""
    import onnxruntime as ort

    from service.runtime import SHRINK_ABOVE_PIXELS, OnnxModel
    from service.settings import Settings
    from tests.conftest import MODELS

    class Recording:
        def __init__(self, session: ort.InferenceSession) -> None:
            self.session, self.shrunk = session, []

        def run(self, names: list[str], feeds: dict, options: ort.RunOptions | None = None) -> list:
            self.shrunk.append(options is not None)
            return self.session.run(names, {key: value[:, :, :32, :32] for key, value in feeds.items()})  # kept cheap

    graph = MODELS / "pennfudan-unet" / "model.onnx"
    model = OnnxModel(graph, "input", ["logits"], threads=1, shrink_above=SHRINK_ABOVE_PIXELS)
    model.session = recording = Recording(model.session)  # type: ignore[assignment]
    for shape in ((1, 3, 512, 512), (2, 3, 512, 512), (1, 3, 512, 544)):
        model.run(np.zeros(shape, np.float32))
    model.fixed_batch = 1  # a graph exported with batch 1 runs a batch in slices, each judged alone
    model.run(np.zeros((2, 3, 512, 544), np.float32))
    assert recording.shrunk == [False, True, True, True, True]

    from service.metrics import Metrics
    from service.repository import ModelRepository, arena_shrink_above

    repository = ModelRepository(Settings(_env_file=None, models_dir=MODELS), Metrics())
    kept = {name: repository.load_model(MODELS / name) for name in ("cifar10-resnet", "pennfudan-unet", "lfw-face")}
    shrink = {name: loaded.model.shrink_above for name, loaded in kept.items()}
    assert shrink == {"cifar10-resnet": None, "pennfudan-unet": SHRINK_ABOVE_PIXELS, "lfw-face": None}  # fixed graphs: never
    # Served at a fixed size (add_model's --size for a free graph), only a run past its largest batch of it shrinks:
    # a 640x640 detector shrank after every run of its own.
    face = kept["lfw-face"].manifest
    assert arena_shrink_above(face, 32) == 32 * 112 * 112 and arena_shrink_above(face, 1) == SHRINK_ABOVE_PIXELS


def test_the_pixel_budget_serves_in_order_and_a_wait_given_up_takes_nothing() -> None:
    async def main() -> None:
        budget = PixelBudget(100)
        assert await budget.take(60, 1) == 60
        big = asyncio.create_task(budget.take(70, 5))  # waits: 40 free
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.take(10, 5))  # would fit, but comes after the big one: no starving it
        await asyncio.sleep(0.05)
        assert not big.done() and not small.done()
        with pytest.raises(TimeoutError):
            await budget.take(30, 0.05)  # gave up: takes nothing, blocks nobody
        budget.give(60)
        assert await big == 70 and await small == 10 and budget.free == 20
        budget.give(80)
        assert await budget.take(10**9, 1) == 100 and budget.free == 0  # more than there is: all of it, alone
        budget.give(100)
        assert budget.free == budget.total

    asyncio.run(main())


def test_the_heap_is_trimmed_after_idle_time_not_in_gaps_of_steady_traffic(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a review: the trimmer slept 2 s and trimmed whenever nothing was in progress at that moment, so steady
    traffic got a malloc_trim every 2 s, each about 0.1 s after a request."""
    from service import memory

    trims: list[float] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(memory, "IDLE_S", 0.4)

    async def main() -> None:
        budget = PixelBudget(memory.MIN_PIXELS)
        trimmer = asyncio.create_task(memory.trim_when_idle(budget))
        until = time.monotonic() + 2
        while time.monotonic() < until:  # busy 0.25 s, idle 0.05 s: never idle 0.4 s
            await budget.take(memory.MIN_PIXELS, 1)
            await asyncio.sleep(0.25)
            budget.give(memory.MIN_PIXELS)
            await asyncio.sleep(0.05)
        assert trims == []
        stopped = time.monotonic()
        await asyncio.sleep(1.2)
        trimmer.cancel()
        assert len(trims) == 1 and trims[0] - stopped >= 0.4, (trims, stopped)

    asyncio.run(main())
