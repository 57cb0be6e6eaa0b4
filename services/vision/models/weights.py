"""Loading weights from local files: plain state dicts and model-registry checkpoints.

Always `weights_only=True` (no pickle code execution). Every failure is a `ConfigurationError` naming the
file, raised at start-up so a bad file never reaches the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision.core.errors import ConfigurationError
from vision.core.files import sha256_file

__all__ = ["load_weights", "read_state_dict", "sha256_file"]

# Keys under which checkpoints written by training code (ours and common trainers) keep the weights.
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "ema_state_dict")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file or of a checkpoint dict that wraps one."""
    if not path.is_file():
        raise ConfigurationError(f"weights file {path} does not exist")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise ConfigurationError(f"weights file {path} is not a readable torch file: {exc}") from None
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigurationError(
            f"weights file {path} holds no state dict (expected a dict of tensors, or a checkpoint with one of "
            f"the keys {list(_CHECKPOINT_KEYS)})"
        )
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(module: nn.Module, path: Path, *, key_mapping: str = "strict") -> None:
    """Load `path` into `module`; shapes and key sets must match exactly."""
    state = read_state_dict(path)
    target = module.state_dict()
    if key_mapping == "by_order" and set(state) != set(target):
        state = _map_by_order(state, target, path)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ConfigurationError(
            f"weights file {path} does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if state[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise ConfigurationError(
            f"weights file {path} does not fit {type(module).__name__}: {len(wrong)} tensors have the wrong "
            f"shape, e.g. {key} is {got}, expected {want} (wrong num_classes or architecture?)"
        )
    module.load_state_dict(state, strict=True)


def _map_by_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    if len(state) != len(target):
        raise ConfigurationError(
            f"weights file {path} has {len(state)} tensors, the architecture {len(target)}; cannot map by order"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ConfigurationError(
                f"weights file {path}: tensor {src_key} {tuple(tensor.shape)} does not match {dst_key} "
                f"{tuple(ref.shape)} when mapping by order"
            )
        mapped[dst_key] = tensor
    return mapped
