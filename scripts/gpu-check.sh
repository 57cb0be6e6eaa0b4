#!/usr/bin/env bash
# The GPU check: serve the embedded default on CUDA (top-5 and logits against the CPU's), 16-client throughput
# on CUDA against CPU torch, a DELF pyramid on CUDA, one tagging fine-tune epoch on CUDA, peak GPU memory.
# One command, no network, about 5 minutes (scripts/gpu_check.py has the steps).
#
#   scripts/gpu-check.sh                  # --device cuda
#   scripts/gpu-check.sh --device cpu     # the dry run of the same steps (CI runs it)
#   scripts/gpu-check.sh --prepare-wheels DIR   # on a machine with network: the wheels a GPU box lacks
#
# Python: $PYTHON, else .venv/bin/python when it imports vision, else python3. When that python cannot import
# vision, a venv with the system's packages (PyTorch with CUDA, timm, grpcio, numpy, onnxruntime are expected
# there) is made under $TMPDIR and the rest is installed offline from --wheels DIR (default scripts/gpu-wheels).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICE=cuda
WHEELS="$ROOT/scripts/gpu-wheels"
JSON=""
PREPARE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --json) JSON="$2"; shift 2 ;;
        --prepare-wheels) PREPARE="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# What a GPU box is expected to have already; everything else of the runtime comes from the wheels.
PRESENT='^(torch|torchvision|timm|grpcio|numpy|onnxruntime|onnx)[=<> ]'
if [ -n "$PREPARE" ]; then
    mkdir -p "$PREPARE"
    python3 "$ROOT/scripts/requirements.py" full | grep -Ev "$PRESENT" > "$PREPARE/requirements.txt"
    python3 -m pip download --quiet --dest "$PREPARE" --only-binary=:all: -r "$PREPARE/requirements.txt"
    echo "wheels in $PREPARE: $(du -sm "$PREPARE" | cut -f1) MiB"
    exit 0
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import vision" 2>/dev/null; then
        PY="$ROOT/.venv/bin/python"
    else
        PY=python3
    fi
fi
if ! "$PY" -c "import vision, torch" 2>/dev/null; then
    [ -d "$WHEELS" ] || { echo "gpu-check.sh: $PY cannot import vision and there is no wheel folder $WHEELS (--prepare-wheels)" >&2; exit 2; }
    venv="${TMPDIR:-/tmp}/vision-gpu-check-venv"
    "$PY" -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
    "$venv/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e "$ROOT"
    PY="$venv/bin/python"
fi
args=(--device "$DEVICE")
[ -n "$JSON" ] && args+=(--json "$JSON")
cd "$ROOT"
exec timeout 480 "$PY" "$ROOT/scripts/gpu_check.py" "${args[@]}"
