"""Layer-input statistics for data-aware adapters (CorDA's covariance, EVA's inputs).

Forward pre-hooks on the target layers record what each one sees while the model
runs the calibration batches (:func:`svdkernels.batches.run_batches`: mappings such
as a tokenizer's output are keyword arguments); the hooks are removed afterwards,
also on errors.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from svdkernels.batches import run_batches


@torch.no_grad()
def collect_inputs(
    model: nn.Module, layers: dict[str, nn.Linear], calib_batches: Iterable[Any], *, kind: str, max_rows: int = 8192
) -> dict[str, torch.Tensor]:
    """Run ``calib_batches`` through ``model`` and return, per layer name:

    - ``kind="covariance"``: ``C = XᵀX/n [in, in]`` in float64 over every input row;
    - ``kind="inputs"``: the first ``max_rows`` input rows ``X [n, in]`` in float32.

    Raises ``ValueError`` when ``calib_batches`` is empty or a layer saw no input.
    """
    if calib_batches is None:
        raise ValueError("calib_batches: expected an iterable of model inputs, got None")
    sums: dict[str, Any] = {}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if kind == "covariance":
                xd = x.double()
                sums[name] = sums.get(name, 0) + xd.T @ xd
            elif counts[name] < max_rows:
                sums.setdefault(name, []).append(x[: max_rows - counts[name]].float().cpu())
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        run_batches(model, calib_batches)  # eval mode, no grad; ValueError when empty
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ValueError(f"calib_batches: layers {missing[:4]} saw no input while the batches ran")
    if kind == "covariance":
        return {n: sums[n] / counts[n] for n in layers}
    return {n: torch.cat(sums[n]) for n in layers}
