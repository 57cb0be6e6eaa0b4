"""`vision`: the server and its command-line clients.

    vision serve                         # embedded default: all services on 127.0.0.1:50051
    vision classify coffee.jpg --top-k 5 # client: classify images through a running server
    vision features coffee.jpg --recipe gem          # client: global descriptors (Features service)
    vision eval-retrieval --images DB --gt GT --recipe rmac  # client: retrieval mAP (Oxford/Revisited)
    vision fit-whitening --images DIR --out w/pca.npz        # client: fit a descriptor whitening
    vision delf-extract a.jpg --show 5                   # client: DELF keypoints + descriptors (Delf service)
    vision delf-match a.jpg b.jpg --out matches.png      # client: RANSAC-verified DELF matches, drawn (alias: match)
    vision fit-delf-pca --images DIR --out pca.npz       # client: fit the DELF descriptor PCA (40-d)
    vision tag coffee.jpg                # client: tag images (multi-label + hierarchy) through a running server
    vision eval-tags DATASET             # client: multi-label metrics of the Tagging service on labelled images
    vision models                        # client: list served models
    vision sample-photos --split held-out --count 500 --out held-out/   # augmented real photos, known split
    vision quantize --model efficientnet_lite0 --calibration DIR --held-out DIR --out int8.onnx  # int8 + report
    vision export-triton --model efficientnet_lite0 --repository repo  # ONNX model + config.pbtxt for Triton
    vision triton --repository repo      # local tritonserver on 127.0.0.1 (sets its runtime up on first use)
    vision loadtest --help               # closed-loop load generator and raw-model baseline
    vision registry --help               # model registry (MLflow): register, promote, rollback, show ...
    vision jobs --help                   # jobs: submit-download / submit-finetune, status, list, cancel, watch, wait
    vision worker --queues download,train  # Celery worker for the jobs (Redis at 127.0.0.1:6379)
    vision serve --model models:/lite@production   # serve a registry alias and follow it
    vision serve --runner ray              # the same services on Ray Serve (gRPC proxy, @serve.batch; docs/ray.md)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Where each command's code lives: `serve` in vision.runners.serve, the commands that call a running server
# in vision.client.commands (the DELF ones in vision.client.delf, `jobs` in vision.client.jobs), the offline
# tools in vision.tools.commands; `registry`, `triton`, `worker` and `loadtest` parse their own arguments.


def build_parser() -> argparse.ArgumentParser:
    from vision.client.commands import add_commands as add_client_commands
    from vision.runners.serve import add_parser as add_serve_parser
    from vision.tools.commands import add_commands as add_tool_commands

    parser = argparse.ArgumentParser(
        prog="vision",
        description=__doc__,
        epilog="Security: `vision serve --tls-cert/--tls-key` (TLS), --tls-client-ca (mutual), --auth-tokens/--auth-allow\n"
        "(who may submit and cancel jobs); client commands take --tls-ca, --tls-cert/--tls-key, --token-file\n"
        "(docs/security.md).\n\n"
        "Where the code lives: services/vision/, one folder per layer (README \"Layout\"):\n"
        "`serve` in runners/serve.py, the commands that call a running server in client/, offline tools in tools/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_client_commands(sub)
    add_tool_commands(sub)
    # Listed for `vision --help`; main() hands their arguments on before this parser sees them.
    sub.add_parser("triton", help="run the local Triton server; `vision triton --help`", add_help=False)
    sub.add_parser("loadtest", help="load generator; `vision loadtest --help` for its options", add_help=False)
    sub.add_parser("registry", help="model registry (MLflow): register, list, show, promote, rollback, verify, "
                   "delete-version; `vision registry --help`", add_help=False)
    sub.add_parser("jobs", help="download and fine-tune jobs through the Jobs service: submit-download, "
                   "submit-finetune, status, list, cancel, watch, wait; `vision jobs --help`", add_help=False)
    sub.add_parser("worker", help="Celery worker for the job queues (download, train); `vision worker --help`",
                   add_help=False)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["loadtest"]:
        from loadtest.__main__ import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv[:1] == ["registry"]:
        from vision.registry.cli import main as registry_main

        return registry_main(argv[1:])
    if argv[:1] == ["jobs"]:
        from vision.client.jobs import main as jobs_main

        return jobs_main(argv[1:])
    if argv[:1] == ["worker"]:
        from vision.runners.worker import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["triton"]:
        from vision.triton.cli import main as triton_main

        return int(triton_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from vision.client.channel import resolve_target

    if not resolve_target(args, f"vision {args.command}"):
        return 2
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _dispatch(argv)
        finally:
            # Inside the try: output still buffered when the reader has gone fails here, not at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe broke (a socket, a child's pipe): that is an error with its own traceback
        # The reader closed our stdout (`vision tag a.jpg | head`): end quietly, as Unix tools do. Python's
        # recipe (library/signal.html, "Note on SIGPIPE"): devnull under stdout, so the flush at exit cannot
        # fail again, and status 1.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout closed or replaced by a caller: not a pipe we can judge
        return False


if __name__ == "__main__":
    sys.exit(main())
