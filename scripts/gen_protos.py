"""Regenerate the Python code for protos/ into services/vision/ (the one codegen command).

    python scripts/gen_protos.py            # rewrite services/vision/v1/*_pb2*.py{,i}
    python scripts/gen_protos.py --out DIR  # write elsewhere (the staleness test compares the two)
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with .pyi stubs for every .proto under protos/; return the inputs."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return protos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "services", help="output root (default: services/)")
    args = parser.parse_args()
    protos = generate(args.out)
    print(f"generated {len(protos)} protos into {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
