"""What the file-loader tests share: rewriting a safetensors file with edits, and the
check that a corrupted file is a FormatError that names the file and leaves the model
exactly as it was (issue 12's file discipline)."""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from svdkernels.errors import FormatError


def rewrite_safetensors(
    src: str | os.PathLike, dst: str | os.PathLike, *,
    tensors: Optional[Callable[[dict[str, torch.Tensor]], None]] = None,
    meta: Optional[Callable[[dict[str, str]], None]] = None,
) -> Path:
    """Copy the safetensors file ``src`` to ``dst``, after ``tensors(dict)`` and
    ``meta(dict)`` edited its tensors and metadata in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata() or {})
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, str(dst), metadata=m)
    return Path(dst)


def assert_rejected_file(load: Callable[[nn.Module, Any], Any], model: nn.Module, path: str | os.PathLike,
                         words: Sequence[str] = ()) -> str:
    """``load(model, path)`` raises :class:`FormatError` whose message starts with
    ``path:``, names ``path`` and contains every one of ``words``; every tensor of
    ``model``'s state is unchanged. Returns the message (for checks of its own)."""
    import pytest  # imported on use: importing svdkernels.testing never needs pytest

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError) as info:
        load(model, path)
    msg = str(info.value)
    assert msg.startswith("path: ") and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    after = model.state_dict()
    assert set(after) == set(before), sorted(set(after) ^ set(before))
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
    return msg
