"""What TLS costs: 16-client Classify throughput over TLS against plaintext, and the handshake per new connection.

    python -m loadtest.tls --image coffee.jpg --rounds 6 --duration 10

Starts two `vision serve` processes with the same settings on free loopback ports, one plaintext and one with
a throwaway certificate (trustme), and drives them in alternating rounds (plaintext, TLS, plaintext, ...), one
at a time, so a noisy neighbour hits both alike; prints each round's TLS/plaintext ratio and their median.
Then opens --connections new channels to each, one after the other, timing connect + handshake + one health
Check: the difference of the medians is the handshake's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest.harness import SpawnedServer, add_round_flags, read_image, service_run
from vision.client.channel import Endpoint, open_channel


def _certificates(folder: Path) -> tuple[Path, Path, bytes]:
    import trustme  # a dev/loadtest dependency: throwaway CAs for benchmarks and tests

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = folder / "tls.crt", folder / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key, ca.cert_pem.bytes()


def connection_ms(target: str | Endpoint, connections: int) -> list[float]:
    """Milliseconds from a new channel to the answer of its first health Check, per connection."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    times = []
    for _ in range(connections):
        started = time.perf_counter()
        with open_channel(target) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            times.append((time.perf_counter() - started) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_flags(parser)
    parser.add_argument("--connections", type=int, default=200, help="new connections timed per side (default 200)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vision serve` argument for both servers")
    args = parser.parse_args(argv)
    image = read_image(parser.prog, args.image)
    if image is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca = _certificates(Path(tmp))
        plain = SpawnedServer(args.serve_arg)
        secure = SpawnedServer([*args.serve_arg, "--tls-cert", str(cert), "--tls-key", str(key)])
        tls_target = Endpoint(secure.target, tls_ca=ca, tls=True, server_name="localhost")
        ratios, errors = [], 0
        try:
            for round_no in range(1, args.rounds + 1):
                runs = {}
                for name, target in (("plaintext", plain.target), ("tls", tls_target)):
                    result = asyncio.run(service_run(target, image, args.concurrency, args.duration, args.warmup, 1, ""))
                    errors += sum(result.errors.values())
                    runs[name] = result
                    print(f"round {round_no} {name:>9}: {result.images_per_second:7.1f} img/s  p50 {result.p50_ms:6.1f} ms  "
                          f"p99 {result.p99_ms:6.1f} ms  errors {sum(result.errors.values())}", flush=True)
                ratio = runs["tls"].images_per_second / runs["plaintext"].images_per_second
                ratios.append(ratio)
                print(f"round {round_no} tls/plaintext throughput = {ratio:.3f}", flush=True)
            plain_ms = connection_ms(plain.target, args.connections)
            tls_ms = connection_ms(tls_target, args.connections)
        finally:
            plain.close()
            secure.close()
    print(f"median over {len(ratios)} rounds: c={args.concurrency} tls/plaintext throughput = "
          f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    p, t = statistics.median(plain_ms), statistics.median(tls_ms)
    print(f"new connection + first health Check, median of {args.connections}: plaintext {p:.2f} ms, TLS {t:.2f} ms, "
          f"handshake cost {t - p:+.2f} ms")
    if errors:
        print(f"{parser.prog}: {errors} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
