#!/usr/bin/env bash
# Builds the TorchServe peer's own virtualenv for `python -m loadtest.modes --modes ...,torchserve`.
#
# A separate venv because TorchServe pins its own dependency set and must not change the serving stack's
# resolver (it is a benchmark peer, not a dependency: CI's install in .ci/run does not run this).
# Recipe from ../shared/ENVIRONMENT.md: torchserve 0.12.0 + torch-model-archiver with the registry's torch
# 2.14.1 / torchvision 0.29.1 (the pair that works here; the machine's pip constraints cap them there),
# pyyaml (its worker crash-loops without it) and captum (its built-in handlers import it), plus grpcio-tools
# and googleapis-common-protos so the harness can compile TorchServe's inference.proto at run time.
# timm: the handler builds EfficientNet-Lite0 with the project's own builder (vision.models.zoo), which uses it.
# The machine's default pip config is used: the versions are pinned, so the local CPU wheel of torch 2.13
# in find-links cannot be picked.
#
#   loadtest/torchserve_setup.sh [VENV]        # default: .venv-torchserve next to this repository's .venv
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv-torchserve}"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet \
    "torchserve==0.12.0" torch-model-archiver \
    "torch==2.14.1" "torchvision==0.29.1" \
    pyyaml captum pillow numpy timm grpcio grpcio-tools googleapis-common-protos
command -v java >/dev/null || echo "warning: no java on PATH; TorchServe's frontend needs Java 11+" >&2
"$venv/bin/torchserve" --version 2>/dev/null || "$venv/bin/python" -c "import ts; print('torchserve', ts.__version__)"
echo "TorchServe peer venv ready: $venv"
