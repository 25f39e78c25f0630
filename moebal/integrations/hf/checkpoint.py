"""Reading the balancer state back from a ``save_pretrained`` directory."""

from __future__ import annotations

import json
import os
from typing import Union

import torch


def read_checkpoint_keys(path: Union[str, os.PathLike], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` from the safetensors files of a checkpoint dir."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a save_pretrained directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors (or its index) in {path!r}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        for key, value in load_file(os.path.join(path, name)).items():
            if key.startswith(prefix):
                out[key] = value
    return out


__all__ = ["read_checkpoint_keys"]
