"""Our metric names under Ray: each replica keeps the usual `vision_*` metrics (vision.core.metrics, recorded by
the same servicers, data plane and batching code) in its own process and pushes them to one hub actor; the
hub merges them with a `replica` label per series. They are read from the ingress over Serve's HTTP proxy
(`GET /metrics`) and, in `vision serve --runner ray`, from `--metrics-port` together with Ray's own metrics
(`ray_*`, from Ray's metrics agent), so one scrape sees both.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

HUB_NAME = "vision-metrics"
HUB_NAMESPACE = "vision"
PUSH_INTERVAL_S = 2.0
# A replica that stopped pushing (killed, scaled down) is dropped after this long.
STALE_AFTER_S = 30.0


def merge_expositions(texts: dict[str, str]) -> bytes:
    """Prometheus text from several processes as one exposition, each series labelled `replica=<key>`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))

    class _Collector:
        def collect(self):  # noqa: ANN202 - prometheus_client collector protocol
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest exposition of every replica (a named, detached actor: `serve run` deployments find it too)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.monotonic(), text)

    def forget(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def exposition(self) -> bytes:
        now = time.monotonic()
        self._texts = {k: v for k, v in self._texts.items() if now - v[0] < STALE_AFTER_S}
        return merge_expositions({k: text for k, (_, text) in self._texts.items()})


def hub() -> "ray.actor.ActorHandle":
    return MetricsHub.options(  # type: ignore[attr-defined]
        name=HUB_NAME, namespace=HUB_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


async def push_forever(replica: str, interval_s: float = PUSH_INTERVAL_S) -> None:
    """Run in every replica: push this process's metrics to the hub until cancelled."""
    target = hub()
    while True:
        try:
            await target.push.remote(replica, generate_latest(REGISTRY).decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the hub restarting must not take the replica down
            log.warning("cannot push metrics to the hub: %s", exc)
            target = hub()
        await asyncio.sleep(interval_s)
