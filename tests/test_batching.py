"""DynamicBatcher and the batch plan it shares with the Ray runner: requests are batched, answers never mix,
failures stay with their request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from vision.backends.batching import BatchStats, DynamicBatcher, Result, plan_batches, run_plan
from vision.core.errors import ResourceExhausted, Unavailable


class RecordingModel:
    """Output row i = input row i * 2 + 1 (so a mixed-up answer is visible); records batch sizes."""

    def __init__(self, delay: float = 0.02, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.threads: set[str] = set()
        self.shapes: list[tuple[int, ...]] = []
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, x: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.sizes.append(len(x))
        self.shapes.append(x.shape[1:])
        self.asked.append(outputs)
        time.sleep(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("poisoned input")
        every = {"y": x * 2 + 1, "sum": x.reshape(len(x), -1).sum(axis=1)}
        return {name: every[name] for name in outputs}


OUT = ("y", "sum")


def rows(value: float, n: int = 1, side: int = 2) -> np.ndarray:
    return np.full((n, 3, side, side), value, dtype=np.float32)


async def test_concurrent_requests_are_batched_without_mixing():
    model = RecordingModel()
    stats: list[BatchStats] = []
    batcher = DynamicBatcher(model, max_batch_size=8, on_batch=stats.append)
    results = await asyncio.gather(*(batcher.submit(rows(float(i), n=1 + i % 3), OUT) for i in range(20)))
    for i, out in enumerate(results):
        assert out["y"].shape == (1 + i % 3, 3, 2, 2)
        assert (out["y"] == i * 2 + 1).all()
        assert (out["sum"] == i * 12).all()
    assert max(model.sizes) > 1 and max(model.sizes) <= 8
    assert sum(model.sizes) == sum(1 + i % 3 for i in range(20))
    assert len(stats) == len(model.sizes) and all(s.run_seconds > 0 for s in stats)
    assert len(model.threads) == 1
    await batcher.close()


async def test_lone_request_is_dispatched_without_waiting():
    model = RecordingModel(delay=0)
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_ms=0)
    started = time.perf_counter()
    await batcher.submit(rows(1), OUT)
    assert time.perf_counter() - started < 0.05
    await batcher.close()


async def test_max_wait_collects_stragglers():
    model = RecordingModel(delay=0)
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_ms=100)

    async def late(i: int):
        await asyncio.sleep(0.01 * i)
        return await batcher.submit(rows(i), OUT)

    await asyncio.gather(*(late(i) for i in range(4)))
    assert model.sizes == [4]
    await batcher.close()


async def test_large_request_is_split_and_reassembled():
    model = RecordingModel(delay=0)
    batcher = DynamicBatcher(model, max_batch_size=4)
    x = np.arange(10 * 12, dtype=np.float32).reshape(10, 3, 2, 2)
    out = await batcher.submit(x, OUT)
    np.testing.assert_array_equal(out["y"], x * 2 + 1)
    assert all(s <= 4 for s in model.sizes)
    await batcher.close()


async def test_failure_stays_with_the_request_that_caused_it():
    model = RecordingModel(fail_on=13.0)
    batcher = DynamicBatcher(model, max_batch_size=16)
    results = await asyncio.gather(*(batcher.submit(rows(float(i)), OUT) for i in range(16)), return_exceptions=True)
    failures = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert failures == [13]
    assert all((results[i]["y"] == i * 2 + 1).all() for i in range(16) if i != 13)
    await batcher.close()


async def test_full_queue_fails_fast():
    model = RecordingModel(delay=0.2)
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_images=4)
    first = asyncio.ensure_future(batcher.submit(rows(0, 4), OUT))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await batcher.submit(rows(1, 2), OUT)
    await first
    await batcher.close()


async def test_cancelled_request_is_skipped():
    model = RecordingModel(delay=0.1)
    batcher = DynamicBatcher(model, max_batch_size=1)
    blocker = asyncio.ensure_future(batcher.submit(rows(0), OUT))
    await asyncio.sleep(0.01)
    doomed = asyncio.ensure_future(batcher.submit(rows(99), OUT))
    await asyncio.sleep(0.01)
    doomed.cancel()
    after = await batcher.submit(rows(5), OUT)
    await blocker
    assert (after["y"] == 11).all()
    assert len(model.sizes) == 2  # the cancelled request never ran
    await batcher.close()


async def test_close_fails_the_running_batch_instead_of_leaving_it_pending():
    model = RecordingModel(delay=0.3)
    batcher = DynamicBatcher(model, max_batch_size=4)
    running = asyncio.ensure_future(batcher.submit(rows(1), OUT))
    await asyncio.sleep(0.05)  # the worker has popped it and is inside the forward pass
    await batcher.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(running, 2)


async def test_a_bug_outside_the_forward_pass_fails_the_batch_and_keeps_the_worker():
    calls = []

    def broken_hook(stats: BatchStats) -> None:
        calls.append(stats)
        if len(calls) == 1:
            raise RuntimeError("metrics hook bug")

    batcher = DynamicBatcher(RecordingModel(delay=0), max_batch_size=4, on_batch=broken_hook)
    first = await batcher.submit(rows(1), OUT)  # answered before the hook runs
    assert (first["y"] == 3).all()
    second = await asyncio.wait_for(batcher.submit(rows(2), OUT), 2)
    assert (second["y"] == 5).all() and batcher.alive()
    await batcher.close()


async def test_short_model_output_is_an_error_not_someone_elses_rows():
    def short(x: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {name: x[:-1] for name in outputs}

    batcher = DynamicBatcher(short, max_batch_size=8)
    results = await asyncio.gather(*(batcher.submit(rows(float(i)), OUT) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "rows" in str(r) for r in results)
    await batcher.close()


async def test_withdrawn_requests_stop_counting_against_the_queue_at_once():
    model = RecordingModel(delay=0.3)
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_images=3)
    blocker = asyncio.ensure_future(batcher.submit(rows(0), OUT))
    await asyncio.sleep(0.05)
    doomed = [asyncio.ensure_future(batcher.submit(rows(9), OUT)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for task in doomed:
        task.cancel()
    await asyncio.sleep(0)
    ok = await asyncio.wait_for(batcher.submit(rows(4, 3), OUT), 5)  # would be "queue full" if they still counted
    assert (ok["y"] == 9).all()
    await blocker
    await batcher.close()


async def test_a_queue_of_mixed_shapes_runs_in_batches_of_one_shape():
    """Inputs of different shapes cannot share a forward pass; they must not fall back to one at a time."""
    model = RecordingModel(delay=0.05)
    batcher = DynamicBatcher(model, max_batch_size=8)
    blocker = asyncio.ensure_future(batcher.submit(rows(0), OUT))  # occupies the worker while the queue fills
    await asyncio.sleep(0.01)
    requests = [rows(float(i), side=2 + i % 3) for i in range(1, 19)]  # three shapes, interleaved
    results = await asyncio.gather(*(batcher.submit(x, OUT) for x in requests))
    await blocker
    await batcher.close()
    for x, out in zip(requests, results, strict=True):
        np.testing.assert_array_equal(out["y"], x * 2 + 1)
    batches = list(zip(model.sizes[1:], model.shapes[1:], strict=True))
    assert len(batches) == 3, batches  # 18 queued requests of 3 shapes: one forward pass per shape
    assert sorted(shape[-1] for _, shape in batches) == [2, 3, 4]
    assert all(size == 6 for size, _ in batches)


async def test_a_batch_asks_for_the_union_of_outputs_and_each_caller_gets_its_own():
    model = RecordingModel(delay=0.05)
    batcher = DynamicBatcher(model, max_batch_size=8)
    blocker = asyncio.ensure_future(batcher.submit(rows(0), ("y",)))
    await asyncio.sleep(0.01)
    only_y, only_sum = await asyncio.gather(batcher.submit(rows(1), ("y",)), batcher.submit(rows(2), ("sum",)))
    await blocker
    await batcher.close()
    assert set(only_y) == {"y"} and set(only_sum) == {"sum"}
    assert model.asked[1] == ("y", "sum") and model.sizes[1] == 2
    assert only_sum["sum"].tolist() == [24.0]


@dataclass
class Queued:
    inputs: np.ndarray
    outputs: tuple[str, ...]
    enqueued: float


async def run_queue(model: RecordingModel, queue: list[Queued]) -> tuple[list[Result | None], list[BatchStats | None]]:
    """Every plan for `queue` run as the Ray runner's @serve.batch handler runs them."""
    results: list[Result | None] = [None] * len(queue)

    def deliver(position: int, result: Result) -> None:
        results[position] = result

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        stats = [await run_plan(plan, model, executor, deliver) for plan in plan_batches(queue)]
    return results, stats


async def test_a_plan_runs_one_pass_per_shape_and_gives_each_request_its_own_rows():
    model = RecordingModel(delay=0)
    now = time.perf_counter()
    # Three shapes interleaved, each asked for "y" by some requests and "sum" by others.
    queue = [Queued(rows(float(i), n=1 + i // 3, side=2 + i % 3), (("y",), ("sum",))[i % 2], now) for i in range(9)]
    results, stats = await run_queue(model, queue)
    assert [s[-1] for s in model.shapes] == [2, 3, 4]  # one pass per shape, in order of first appearance
    assert model.sizes == [6, 6, 6]
    assert model.asked == [("y", "sum"), ("sum", "y"), ("y", "sum")]  # the union, in first-asked order
    for item, out in zip(queue, results, strict=True):
        assert isinstance(out, dict) and set(out) == set(item.outputs)
        if "y" in out:
            np.testing.assert_array_equal(out["y"], item.inputs * 2 + 1)
        if "sum" in out:
            np.testing.assert_array_equal(out["sum"], item.inputs.reshape(len(item.inputs), -1).sum(axis=1))
    assert [s.size for s in stats if s is not None] == model.sizes


async def test_a_failed_plan_is_rerun_request_by_request():
    model = RecordingModel(delay=0, fail_on=2.0)
    queue = [Queued(rows(float(i)), OUT, time.perf_counter()) for i in range(4)]
    results, stats = await run_queue(model, queue)
    assert stats == [None]  # only a merged pass that succeeded is reported
    assert model.sizes == [4, 1, 1, 1, 1]
    assert [isinstance(r, ValueError) for r in results] == [False, False, True, False]
    assert all((results[i]["y"] == i * 2 + 1).all() for i in (0, 1, 3))  # type: ignore[index]
