"""Open-loop load: requests arrive at a set rate whatever the server does, so queueing shows honestly.

    python -m loadtest.openloop --target 127.0.0.1:50051 --image coffee.jpg --rates 20,40,80 --duration 15 \
        --mix classify=70,tag=20,extract=10 --deadline-ms 2000 --arrivals poisson --json out.json

A closed loop (`python -m loadtest`) waits for each answer before sending the next request, so a slow server
slows the client down and hides its own queueing (coordinated omission). Here each request has an intended
send time drawn from the arrival process (constant gaps or Poisson: exponential gaps) and its latency is
measured from that intended time, so time a request spent waiting for the client counts too. Latencies go
into HDR histograms (`hdrhistogram`, microseconds, 3 significant digits); warm-up requests are sent but not
recorded; each request carries a gRPC deadline. The client's own CPU use and send lag are reported: when
the client cannot send on schedule, the offered rate was not really offered and the result is flagged.

A sweep runs the rates in order and reports the knee: the highest offered rate the service still met
(≥ 95 % of the requests sent answered OK, errors ≤ 1 %, p99 ≤ 3 × the lowest rate's p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from vision.client.channel import open_channel
from vision.v1 import (
    classification_pb2,
    classification_pb2_grpc,
    common_pb2,
    features_pb2,
    features_pb2_grpc,
    tagging_pb2,
    tagging_pb2_grpc,
)

from loadtest.harness import read_image

# Latencies are recorded in microseconds from 1 µs to 10 minutes.
_HDR_MAX_US = 600_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# The client is flagged as the bottleneck when its sends start this late (p99), or it used this much of a core.
CLIENT_LAG_FLAG_MS = 10.0
CLIENT_CPU_FLAG = 0.9


def new_histogram():  # noqa: ANN201 - hdrh.histogram.HdrHistogram
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, _HDR_MAX_US, 3)


def parse_mix(text: str) -> dict[str, float]:
    """`classify=70,tag=20,extract=10` → weights per RPC (any positive numbers; normalised when drawing)."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in RPCS:
            raise ValueError(f"unknown RPC {name!r} in --mix; known: {', '.join(RPCS)}")
        mix[name] = float(weight or 1)
        if mix[name] <= 0:
            raise ValueError(f"--mix weight of {name} must be positive")
    return mix


def _classify(channel: grpc.aio.Channel, image: bytes):  # noqa: ANN202
    stub = classification_pb2_grpc.ClassificationStub(channel)
    request = classification_pb2.ClassifyRequest(images=[common_pb2.Image(id="0", content=image)], top_k=5)
    return lambda timeout: stub.Classify(request, timeout=timeout)


def _tag(channel: grpc.aio.Channel, image: bytes):  # noqa: ANN202
    stub = tagging_pb2_grpc.TaggingStub(channel)
    request = tagging_pb2.TagRequest(images=[common_pb2.Image(id="0", content=image)])
    return lambda timeout: stub.Tag(request, timeout=timeout)


def _extract(channel: grpc.aio.Channel, image: bytes):  # noqa: ANN202
    stub = features_pb2_grpc.FeaturesStub(channel)
    request = features_pb2.ExtractRequest(images=[common_pb2.Image(id="0", content=image)])
    return lambda timeout: stub.Extract(request, timeout=timeout)


RPCS = {"classify": _classify, "tag": _tag, "extract": _extract}


@dataclass
class OpenLoopResult:
    mode: str
    arrivals: str
    offered_rps: float
    achieved_rps: float  # answered OK per second of the measured window
    sent: int
    ok: int
    duration_s: float
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max, mean (from the intended send time)
    latency_ms_by_rpc: dict[str, dict[str, float]]
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0  # CPU seconds per wall second of this process (1.0 = one core)
    send_lag_p99_ms: float = 0.0
    client_bound: bool = False
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the window, latency ms)
    cdf: list[tuple[float, float]] = field(default_factory=list)  # (percentile, latency ms)


def _summary(histogram) -> dict[str, float]:  # noqa: ANN001
    if histogram.get_total_count() == 0:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p99.9", "max", "mean")}
    out = {f"p{p:g}": histogram.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max"] = histogram.get_max_value() / 1000
    out["mean"] = histogram.get_mean_value() / 1000
    return out


def _cdf(histogram) -> list[tuple[float, float]]:  # noqa: ANN001
    if histogram.get_total_count() == 0:
        return []
    points = [p for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100)]
    return [(p, histogram.get_value_at_percentile(p) / 1000) for p in points]


async def open_loop(
    target: str,
    image: bytes,
    *,
    rate: float,
    duration: float,
    warmup: float = 2.0,
    mix: dict[str, float] | None = None,
    deadline_s: float = 2.0,
    arrivals: str = "poisson",
    max_requests: int | None = None,
    mode: str = "service",
    seed: int = 0,
    channels: int = 4,
    rpcs: dict | None = None,
) -> OpenLoopResult:
    """Send at `rate` requests/s for `warmup` + `duration` s (or until `max_requests` measured requests were
    sent), each RPC drawn from `mix`; wait for the stragglers up to their deadline. `rpcs` replaces the
    call factories of `RPCS` by name (a peer server's own API, e.g. TorchServe's Predictions as "classify")."""
    mix = mix or {"classify": 1.0}
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    pool = [open_channel(target, aio=True) for _ in range(channels)]
    factories = {**RPCS, **(rpcs or {})}
    calls = {name: [factories[name](ch, image) for ch in pool] for name in names}
    overall, by_rpc = new_histogram(), {name: new_histogram() for name in names}
    lag = new_histogram()
    errors: Counter[str] = Counter()
    timeline: list[tuple[float, float]] = []
    ok = sent = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    measure_from, stop_at = start + warmup, start + warmup + duration
    tasks: set[asyncio.Task[None]] = set()

    async def one(name: str, call, intended: float, measured: bool) -> None:  # noqa: ANN001
        nonlocal ok
        now = loop.time()
        if measured:
            lag.record_value(max(1, int((now - intended) * 1e6)))
        try:
            await call(deadline_s)
        except grpc.aio.AioRpcError as exc:
            if measured:
                errors[exc.code().name] += 1
            return
        if measured:
            latency_us = max(1, int((loop.time() - intended) * 1e6))
            overall.record_value(latency_us)
            by_rpc[name].record_value(latency_us)
            ok += 1
            timeline.append((intended - measure_from, latency_us / 1000))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    intended = start
    index = 0
    while intended < stop_at and (max_requests is None or sent < max_requests):
        delay = intended - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        name = rng.choices(names, weights)[0]
        measured = intended >= measure_from
        sent += measured
        task = loop.create_task(one(name, calls[name][index % channels], intended, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
        intended += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
    window = min(duration, intended - measure_from) if max_requests is not None else duration
    if tasks:
        await asyncio.wait(set(tasks), timeout=deadline_s + 5)
    cpu = (time.process_time() - cpu0) / max(1e-9, time.perf_counter() - wall0)
    for ch in pool:
        await ch.close()
    lag_p99 = lag.get_value_at_percentile(99) / 1000 if lag.get_total_count() else 0.0
    if len(timeline) > 20000:  # enough for a plot
        step = len(timeline) / 20000
        timeline = [timeline[int(i * step)] for i in range(20000)]
    return OpenLoopResult(
        mode=mode,
        arrivals=arrivals,
        offered_rps=rate,
        achieved_rps=ok / window if window > 0 else 0.0,
        sent=sent,
        ok=ok,
        duration_s=window,
        latency_ms=_summary(overall),
        latency_ms_by_rpc={name: _summary(h) for name, h in by_rpc.items()},
        errors=dict(errors),
        client_cpu=cpu,
        send_lag_p99_ms=lag_p99,
        client_bound=lag_p99 > CLIENT_LAG_FLAG_MS or cpu > CLIENT_CPU_FLAG,
        timeline=sorted(timeline),
        cdf=_cdf(overall),
    )


def knee(results: list[OpenLoopResult]) -> OpenLoopResult | None:
    """The highest offered rate the service met: ≥ 95 % of the requests sent answered OK, errors ≤ 1 % of
    sent, and p99 within 3× the lowest rate's p99. None when even the lowest rate was not met."""
    ordered = sorted(results, key=lambda r: r.offered_rps)
    if not ordered:
        return None
    base = ordered[0].latency_ms["p99"]
    best = None
    for r in ordered:
        met = (
            r.ok >= 0.95 * r.sent  # of what was sent: Poisson arrivals over a short window stray from the rate
            and sum(r.errors.values()) <= 0.01 * max(1, r.sent)
            and r.latency_ms["p99"] <= 3 * base
        )
        if not met:
            break
        best = r
    return best


async def sweep(target: str, image: bytes, rates: list[float], *, stop_when_saturated: bool = True, **kwargs) -> list[OpenLoopResult]:
    """One open-loop run per rate, lowest first; stops after the first rate that is clearly saturated
    (less than 80 % achieved), since higher rates only add queueing."""
    results = []
    for rate in sorted(rates):
        result = await open_loop(target, image, rate=rate, **kwargs)
        results.append(result)
        print_result(result)
        if stop_when_saturated and result.achieved_rps < 0.8 * rate:
            break
    return results


def print_result(r: OpenLoopResult) -> None:
    lat = r.latency_ms
    errs = ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0"
    flag = "  CLIENT-BOUND" if r.client_bound else ""
    print(
        f"{r.mode:>12} offered {r.offered_rps:7.1f}/s achieved {r.achieved_rps:7.1f}/s  p50 {lat['p50']:7.1f}  "
        f"p90 {lat['p90']:7.1f}  p99 {lat['p99']:7.1f}  p99.9 {lat['p99.9']:7.1f} ms  errors {errs}  "
        f"client cpu {r.client_cpu:.2f} lag p99 {r.send_lag_p99_ms:.1f} ms{flag}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="server address, e.g. 127.0.0.1:50051 (loopback only)")
    parser.add_argument("--image", type=Path, required=True, help="image sent in every request")
    parser.add_argument("--rates", default="10,20,40", help="comma-separated offered rates, requests/s (default 10,20,40)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per rate (default 15)")
    parser.add_argument("--requests", type=int, help="measure this many requests per rate instead of --duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--mix", default="classify=1", help="RPC weights, e.g. classify=70,tag=20,extract=10 (default classify only)")
    parser.add_argument("--deadline-ms", type=float, default=2000.0, help="gRPC deadline of each request (default 2000)")
    parser.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson", help="arrival process (default poisson)")
    parser.add_argument("--json", type=Path, help="write every run (with HDR percentiles, CDF and timeline) here")
    args = parser.parse_args(argv)
    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    try:
        mix = parse_mix(args.mix)
    except ValueError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    duration = args.duration if args.requests is None else 3600.0
    results = asyncio.run(sweep(
        args.target, image, [float(r) for r in args.rates.split(",")], duration=duration, warmup=args.warmup, mix=mix,
        deadline_s=args.deadline_ms / 1000, arrivals=args.arrivals, max_requests=args.requests,
    ))
    best = knee(results)
    print(f"knee: {best.offered_rps:.1f} requests/s (p99 {best.latency_ms['p99']:.1f} ms)" if best else "knee: not reached at the lowest rate")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in results], "knee_rps": best.offered_rps if best else None}, indent=1))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
