"""What every image service does between the wire and its postprocessing: pick the model, check the
batch, decode + preprocess the images in a thread pool, run the backend. Services stay thin."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vision import metrics
from vision.backends import Outputs
from vision.errors import InvalidArgument, InvalidImage, ResourceExhausted
from vision.imaging import DecodeLimits, decode_image, preprocess
from vision.repository import ModelRepository, ServedModel


@dataclass(frozen=True)
class EncodedImage:
    """Transport-neutral view of a request image (the servicer converts from protobuf)."""

    id: str
    content: bytes


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
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_batch(self, images: Sequence[EncodedImage]) -> None:
        if not images:
            raise InvalidArgument("request has no images; send at least one")
        if len(images) > self._max_images:
            raise ResourceExhausted(
                f"request has {len(images)} images, over the limit of {self._max_images} per request; "
                "split it into several requests"
            )

    def _load_one(self, model: ServedModel, index: int, image: EncodedImage) -> np.ndarray:
        labels = {"model": model.card.name, "version": model.card.version}
        preset = model.card.preset
        try:
            started = time.perf_counter()
            decoded = decode_image(image.content, self._limits, min_target_side=preset.resize_shorter)
            decoded_at = time.perf_counter()
            array = preprocess(decoded, preset)
        except InvalidImage as exc:
            raise exc.at(index, image.id) from None
        metrics.STAGE_LATENCY.labels(stage="decode", **labels).observe(decoded_at - started)
        metrics.STAGE_LATENCY.labels(stage="preprocess", **labels).observe(time.perf_counter() - decoded_at)
        return array

    async def load_images(self, model: ServedModel, images: Sequence[EncodedImage]) -> np.ndarray:
        """(N, C, H, W) float32 for the model's preset; the first bad image fails the call, naming its index,
        and the decodes not started yet are cancelled (a bad request should not keep the pool busy)."""
        self.check_batch(images)
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._load_one, model, i, img) for i, img in enumerate(images)]
        try:
            done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            for future in futures:  # in request order, so the lowest failed index is reported
                if future in done and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
            return np.stack([f.result() for f in futures])
        finally:
            for future in futures:
                future.cancel()

    async def run(self, model: ServedModel, images: Sequence[EncodedImage], service: str) -> Outputs:
        """Decode, preprocess and infer `images` with `model` (found by the servicer via `repository.get`)."""
        batch = await self.load_images(model, images)
        outputs = await model.infer(batch)
        metrics.IMAGES.labels(service=service, model=model.card.name, version=model.card.version).inc(len(images))
        return outputs
