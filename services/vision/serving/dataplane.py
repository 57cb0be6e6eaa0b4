"""What every image service does between the wire and its response, in one place: find the model (and
hold it while the request runs), check the batch, decode and cut each image into its views in a thread
pool, run the views through the backend grouped by shape, and run the task's postprocessing off the event
loop. Servicers only convert protobuf to a `TaskCall` and the task's results back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from vision.core import metrics, tracing
from vision.core.errors import InvalidArgument, InvalidImage, ResourceExhausted
from vision.media.imaging import DecodeLimits, decode_image
from vision.media.views import ViewSpec, make_views
from vision.models.card import ModelCard
from vision.serving.repository import ModelRepository, ServedModel
from vision.tasks.contract import EncodedImage, Task, TaskCall, ViewOutputs

P = TypeVar("P")
Q = TypeVar("Q")
R = TypeVar("R")
# An image's (width, height) as decoded and its views.
Loaded = tuple[tuple[int, int], list[np.ndarray]]


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        limits: DecodeLimits,
        max_images_per_request: int,
        decode_workers: int,
    ) -> None:
        self.repository = repository
        self._limits = limits
        self._max_images = max_images_per_request
        self._decode_workers = decode_workers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        # Postprocessing and response building of a large request (a 64-image Tag at threshold 0 makes
        # ~115k tags) take long enough to stall every other RPC if run on the event loop.
        self._post_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers, thread_name_prefix="postprocess"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._post_pool.shutdown(wait=False, cancel_futures=True)

    def check_batch(self, images: Sequence[EncodedImage]) -> None:
        if not images:
            raise InvalidArgument("request has no images; send at least one")
        if len(images) > self._max_images:
            raise ResourceExhausted(
                f"request has {len(images)} images, over the limit of {self._max_images} per request; "
                "split it into several requests"
            )

    async def execute(
        self,
        task: Task[P, Q, R],
        call: TaskCall[P],
        service: str,
        respond: Callable[[ModelCard, Sequence[EncodedImage], R], Any],
    ) -> Any:
        """Run `call` through `task` on the model it selects and return `respond(card, images, results)`,
        computed in a worker thread with the postprocessing."""
        # The batch first: a request no model could serve costs no model lookup.
        self.check_batch(call.images)
        model = self.repository.get(call.model_name, call.model_version, task=task.name)
        with model.lease():
            card = model.card
            prepared = task.validate(card, call.params)
            outputs = await self.infer(model, call.images, task.views(card, prepared), task.outputs(card, prepared))
            metrics.IMAGES.labels(service=service, model=card.name, version=card.version).inc(len(call.images))

            parent = tracing.capture()

            def finish() -> Any:
                started = tracing.now_ns()
                try:
                    return respond(card, call.images, task.postprocess(card, outputs, prepared))
                finally:
                    if parent is not None:
                        tracing.record("postprocess", parent, started, tracing.now_ns(), {"vision.task": task.name})

            return await asyncio.get_running_loop().run_in_executor(self._post_pool, finish)

    def _load_one(
        self,
        model: ServedModel,
        spec: ViewSpec,
        limits: DecodeLimits,
        draft: int | None,
        parent: Any,
        index: int,
        image: EncodedImage,
    ) -> Loaded:
        labels = {"model": model.card.name, "version": model.card.version}
        preset = model.card.preset
        try:
            started = time.perf_counter()
            decoded = decode_image(image.content, limits, min_target_side=draft)
            decoded_at = time.perf_counter()
            # Under the platform's minimum only where the spec lowered it: no usable signal, so no views.
            tiny = limits is not self._limits and min(decoded.size) < self._limits.min_side
            views = [] if tiny else make_views(decoded, preset, spec)
        except InvalidImage as exc:
            raise exc.at(index, image.id) from None
        finished = time.perf_counter()
        metrics.STAGE_LATENCY.labels(stage="decode", **labels).observe(decoded_at - started)
        metrics.STAGE_LATENCY.labels(stage="preprocess", **labels).observe(finished - decoded_at)
        if parent is not None:
            end_ns = tracing.now_ns()
            decoded_ns = end_ns - int((finished - decoded_at) * 1e9)
            tracing.record("decode", parent, decoded_ns - int((decoded_at - started) * 1e9), decoded_ns, {
                "vision.image.index": index, "vision.image.bytes": len(image.content),
                "vision.image.width": decoded.size[0], "vision.image.height": decoded.size[1],
            })
            tracing.record("views", parent, decoded_ns, end_ns, {"vision.image.index": index, "vision.views": len(views)})
        return decoded.size, views

    def _limits_for(self, spec: ViewSpec) -> DecodeLimits:
        """The configured limits, with the minimum side lowered where the spec accepts smaller images."""
        if spec.min_side and spec.min_side < self._limits.min_side:
            return dataclasses.replace(self._limits, min_side=spec.min_side)
        return self._limits

    async def load_views(self, model: ServedModel, images: Sequence[EncodedImage], spec: ViewSpec) -> list[Loaded]:
        """Each image's decoded size and views for the model's preset (a request's images, checked with
        `check_batch`); the first bad image fails the call, naming its index, and the decodes not started
        yet are not run (a bad request should not keep the pool busy)."""
        limits = self._limits_for(spec)
        draft = spec.min_decode_side(model.card.preset)
        if draft is not None and limits is not self._limits:
            # A JPEG decoded downsampled must not turn into a tiny image: its views would be dropped.
            draft = max(draft, self._limits.min_side)
        loop = asyncio.get_running_loop()
        parent = tracing.capture()
        # A request keeps at most one decode per worker queued, so the pool interleaves requests instead of
        # making a 1-image request wait behind all 64 images of another (the same fairness the batcher gives
        # inference by queueing a large request one chunk at a time).
        window = asyncio.Semaphore(self._decode_workers)
        failed = asyncio.Event()

        async def load(index: int, image: EncodedImage) -> Loaded:
            async with window:
                if failed.is_set():
                    raise asyncio.CancelledError
                return await loop.run_in_executor(self._pool, self._load_one, model, spec, limits, draft, parent, index, image)

        tasks = [asyncio.ensure_future(load(i, img)) for i, img in enumerate(images)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:  # in request order, so the lowest failed index is reported
                if task in done and not task.cancelled() and task.exception() is not None:
                    failed.set()
                    raise task.exception()  # type: ignore[misc]
            return [t.result() for t in tasks]
        finally:
            failed.set()
            for task in tasks:
                task.cancel()

    async def infer(
        self, model: ServedModel, images: Sequence[EncodedImage], spec: ViewSpec, outputs: tuple[str, ...]
    ) -> ViewOutputs:
        """Decode, cut into views and infer; views of one shape go to the backend as one batch (all of a
        request's centre crops or ten-crops: one call), other shapes as batches of their own, concurrently.
        Only views that exist are inferred: images without views cost no backend call."""
        per_image = await self.load_views(model, images, spec)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        flat: list[np.ndarray] = []
        for _, views in per_image:
            for view in views:
                by_shape.setdefault(view.shape, []).append(len(flat))
                flat.append(view)
        positions = list(by_shape.values())
        results = await asyncio.gather(
            *(model.infer(flat[p[0]][None] if len(p) == 1 else np.stack([flat[i] for i in p]), outputs) for p in positions)
        )
        return ViewOutputs(
            [len(views) for _, views in per_image],
            list(zip(positions, results, strict=True)),
            [size for size, _ in per_image],
        )
