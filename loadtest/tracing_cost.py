"""What tracing costs: 16-client (and 1-client) Classify with tracing off, with tracing on, and optionally
with an older tree, in alternating rounds on one machine.

    python -m loadtest.tracing_cost --image coffee.jpg --rounds 6 --duration 10
    python -m loadtest.tracing_cost --image coffee.jpg --old-tree /tmp/old   # + a `git worktree` of an older commit
    python -m loadtest.tracing_cost --image coffee.jpg --on-env OTEL_TRACES_SAMPLER=parentbased_traceidratio \
        --on-env OTEL_TRACES_SAMPLER_ARG=0.05                                 # the chart's default sampling

Starts one `vision serve` per variant with the same settings: `off` (no OTEL_* variables), `on` (an OTLP/gRPC
endpoint and the default sampler, parentbased_always_on: the clients send no context, so every request is
a sampled root, the worst case), and `old` (the older tree's code through PYTHONPATH, tracing off). The `on`
server exports to a receiver in this process that acknowledges without parsing, so the cost measured is the
server's: spans made, batched and sent. Rounds alternate the variants, so a noisy neighbour hits all alike;
prints each round's ratios to `off` and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from concurrent import futures
from pathlib import Path

import grpc

from loadtest.harness import SpawnedServer, add_round_flags, read_image, service_run


class DiscardingReceiver:
    """An OTLP/gRPC TraceService that answers every Export with an empty response, unparsed."""

    def __init__(self) -> None:
        self.exports = 0

        def export(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.exports += 1
            return b""  # an empty ExportTraceServiceResponse

        handler = grpc.unary_unary_rpc_method_handler(export)  # bytes in, bytes out: no (de)serializers
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}),))
        self.endpoint = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tracing_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_flags(parser)
    parser.add_argument("--old-tree", type=Path, help="an older checkout (git worktree) to run as a third variant")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vision serve` argument for every server")
    parser.add_argument("--on-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra variable for the traced server, e.g. OTEL_TRACES_SAMPLER=parentbased_traceidratio")
    args = parser.parse_args(argv)
    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    if args.old_tree is not None and not (args.old_tree / "services" / "vision").is_dir():
        print(f"{parser.prog}: {args.old_tree} is not a checkout of this project (no services/vision)", file=sys.stderr)
        return 2
    receiver = DiscardingReceiver()
    servers: dict[str, SpawnedServer] = {}
    throughput: dict[str, list[float]] = {}
    p50: dict[str, list[float]] = {}
    errors = 0
    try:
        servers["off"] = SpawnedServer(args.serve_arg)
        extra = dict(item.split("=", 1) for item in args.on_env)
        servers["on"] = SpawnedServer(args.serve_arg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **extra})
        if args.old_tree is not None:
            old = args.old_tree.resolve()
            servers["old"] = SpawnedServer(args.serve_arg, env={"PYTHONPATH": f"{old / 'services'}:{old}"})
        names = list(servers)
        for round_no in range(1, args.rounds + 1):
            # Each round starts with the next variant, so none always runs first (or last) in a round.
            order = names[(round_no - 1) % len(names):] + names[:(round_no - 1) % len(names)]
            for name in order:
                many = asyncio.run(service_run(servers[name].target, image, args.concurrency, args.duration, args.warmup, 1, ""))
                one = asyncio.run(service_run(servers[name].target, image, 1, args.duration / 2, args.warmup / 2, 1, ""))
                errors += sum(many.errors.values()) + sum(one.errors.values())
                throughput.setdefault(name, []).append(many.images_per_second)
                p50.setdefault(name, []).append(one.p50_ms)
                print(f"round {round_no} {name:>3}: c={args.concurrency} {many.images_per_second:7.1f} img/s "
                      f"p99 {many.p99_ms:6.1f} ms; c=1 p50 {one.p50_ms:6.2f} ms", flush=True)
    finally:
        for server in servers.values():
            server.close()
        receiver.close()
    print(f"spans exported by the traced server: {receiver.exports} OTLP requests")
    for name in [n for n in throughput if n != "off"]:
        ratios = [a / b for a, b in zip(throughput[name], throughput["off"], strict=True)]
        deltas = [a - b for a, b in zip(p50[name], p50["off"], strict=True)]
        print(f"{name}/off c={args.concurrency} throughput: median {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}); c=1 p50 {name} - off: median "
              f"{statistics.median(deltas):+.2f} ms (rounds {', '.join(f'{d:+.2f}' for d in deltas)})")
    if receiver.exports == 0:
        print(f"{parser.prog}: the traced server exported nothing: tracing did not turn on", file=sys.stderr)
        return 1
    if errors:
        print(f"{parser.prog}: {errors} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
