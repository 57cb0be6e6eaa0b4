"""The committed generated code must be what `python scripts/gen_protos.py` produces from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed_dir = ROOT / "services"
    assert fresh, "codegen produced nothing"
    stale = [str(rel) for rel, data in fresh.items() if (committed_dir / rel).read_bytes() != data]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_protos.py` and commit"
    generated = {p.relative_to(committed_dir) for p in (committed_dir / "vision" / "v1").glob("*_pb2*")}
    assert generated == set(fresh), "generated files without a .proto (or missing ones): regenerate"
