"""Fuzz: corrupted files for the three loaders (load_adapter, load_lokr, load_quantized).

Each case starts from a valid file and breaks it: truncation, a corrupted header
length, garbage, a metadata/config value replaced by a value of the wrong type or
range, a key deleted or added, a tensor replaced by one of the wrong shape or dtype,
with a NaN, removed, or an extra one added. The loader must then either raise
:class:`~svdkernels.errors.FormatError` naming the file (and leave the model
untouched) or load a model whose outputs are bit-identical to the saved one's (the
mutation was harmless). Flipped bytes inside tensor data are not drawn: without a
checksum no loader can tell them from real values.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fuzz_support import COUNTS, RESULTS, fuzz
from svdkernels.adapters import KronLinear, adapt, load_adapter, load_lokr, save_adapter, save_lokr
from svdkernels.errors import FormatError
from svdkernels.quant import load_quantized, quantize_model, save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_VALUES = [None, -1, math.nan, math.inf, -math.inf, True, "x", "", [], {}, [1, 2], {"a": 1}]
"""Values of the wrong type or range for every key of the three formats. (A value of the
right type and range, e.g. another scaling, changes the outputs of a valid file: no
schema can tell, so none is drawn.)"""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _paths(tree, prefix=()):
    """Every path to a value in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def json_mutation(draw, tree):
    """A mutated deep copy of a JSON tree: one value replaced by a bad one, deleted, or a key added."""
    tree = copy.deepcopy(tree)
    paths = list(_paths(tree))
    path = draw(st.sampled_from(paths))
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if kind == "replace":
        parent[path[-1]] = draw(st.sampled_from(BAD_VALUES))
    elif kind == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["colour", "extra", "version2"]))] = draw(st.sampled_from(BAD_VALUES))
    return tree


@st.composite
def tensor_mutation(draw, tensors, lossy_dtypes=True):
    """One tensor broken. ``lossy_dtypes=False`` (peft LoKr, whose files may hold any
    float dtype, cast on load as peft does) draws no half-precision dtype."""
    tensors = dict(tensors)
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    kind = draw(st.sampled_from(["shape", "dtype", "nan", "remove", "extra", "empty"]))
    if kind == "shape":
        tensors[key] = torch.zeros(*[s + draw(st.sampled_from([-1, 1])) if s > 0 else 1 for s in t.shape] or [2],
                                   dtype=t.dtype)
    elif kind == "dtype":
        lossy = [torch.float16, torch.bfloat16] if lossy_dtypes else []
        tensors[key] = t.to(draw(st.sampled_from([torch.float64, *lossy, torch.int32, torch.uint8, torch.bool])))
    elif kind == "nan" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf]))
        tensors[key] = t
    elif kind == "remove":
        del tensors[key]
    elif kind == "extra":
        tensors[key + draw(st.sampled_from(["_x", ".extra", "2"]))] = torch.zeros(3)
    else:
        tensors[key] = t.new_zeros(0)
    return tensors


@st.composite
def corrupted_bytes(draw, data: bytes):
    kind = draw(st.sampled_from(["truncate", "header-length", "garbage", "empty", "prefix"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "header-length":
        b = bytearray(data)
        b[draw(st.integers(0, 7))] = draw(st.integers(0, 255))
        return bytes(b) if bytes(b) != data else data[:4]
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "empty":
        return b""
    return b"\x00" * 8 + data


def _check(entry, load, model_factory, saved_model, x, bad_path):
    """One loader case: FormatError naming the file with the model unchanged, or
    outputs bit-identical to ``saved_model``'s."""
    COUNTS[entry] += 1
    model = model_factory()
    before = copy.deepcopy(model.state_dict())
    try:
        loaded = load(model, bad_path)
    except (FormatError, ValueError) as e:
        msg = str(e)
        if isinstance(e, FormatError):
            assert msg.startswith("path: ") and os.fspath(bad_path) in msg, msg
        else:  # the file names a layer the model does not have (or of another size): the model is blamed
            assert msg.startswith("model: "), f"{entry}: ValueError that is neither a FormatError nor names model: {msg}"
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{entry}: a failed load changed {k}"
        assert all(type(m) in (nn.Linear, nn.GELU, nn.Sequential) for m in model.modules())
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{entry}: raised {type(e).__name__} instead of FormatError: {e}") from e
    RESULTS[entry] += 1
    with torch.no_grad():
        assert torch.equal(loaded(x), saved_model(x)), f"{entry}: a changed file loaded with changed outputs"


# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    model = adapt(_net(), "pissa", rank=4)
    with torch.no_grad():
        model[0].lora_B.add_(0.01)
    path = tmp_path_factory.mktemp("fuzz_adapter") / "a.safetensors"
    save_adapter(model, path)
    return model, path


@fuzz(40)
@given(data=st.data())
def test_load_adapter(adapter_file, tmp_path_factory, data):
    model, path = adapter_file
    tensors, meta = _read(path)
    bad = tmp_path_factory.mktemp("bad") / "a.safetensors"
    kind = data.draw(st.sampled_from(["bytes", "metadata", "layers", "tensors"]))
    if kind == "bytes":
        bad.write_bytes(data.draw(corrupted_bytes(path.read_bytes())))
    elif kind == "metadata":
        save_file(tensors, str(bad), metadata={k: str(v) for k, v in data.draw(json_mutation(meta)).items()})
    elif kind == "layers":
        layers = data.draw(json_mutation(json.loads(meta["layers"])))
        save_file(tensors, str(bad), metadata={**meta, "layers": json.dumps(layers)})
    else:
        save_file(data.draw(tensor_mutation(tensors)), str(bad), metadata=meta)
    _check("load_adapter", load_adapter, _net, model, torch.randn(3, 64), bad)


@pytest.fixture(scope="module")
def lokr_dir(tmp_path_factory):
    model = _net()
    model[0] = KronLinear(model[0], init="lokr", rank=1, b_rank=2, seed=0)
    model[2] = KronLinear(model[2], init="lokr", rank=1, seed=1)
    with torch.no_grad():
        model[0].A.add_(0.1)
        model[2].A.add_(0.1)
    path = tmp_path_factory.mktemp("fuzz_lokr") / "lokr"
    save_lokr(model, path)
    return model, path


@fuzz(40)
@given(data=st.data())
def test_load_lokr(lokr_dir, tmp_path_factory, data):
    model, path = lokr_dir
    config = json.loads((path / "adapter_config.json").read_text())
    tensors, meta = _read(path / "adapter_model.safetensors")
    bad = tmp_path_factory.mktemp("bad_lokr")
    kind = data.draw(st.sampled_from(["bytes", "config", "config-text", "tensors"]))
    cfg_text, weights = json.dumps(config), None
    if kind == "bytes":
        weights = data.draw(corrupted_bytes((path / "adapter_model.safetensors").read_bytes()))
    elif kind == "config":
        cfg_text = json.dumps(data.draw(json_mutation(config)))
    elif kind == "config-text":
        cfg_text = cfg_text[: data.draw(st.integers(0, len(cfg_text) - 1))]
    else:
        save_file(data.draw(tensor_mutation(tensors, lossy_dtypes=False)), str(bad / "adapter_model.safetensors"),
                  metadata=meta)
    (bad / "adapter_config.json").write_text(cfg_text)
    if weights is not None:
        (bad / "adapter_model.safetensors").write_bytes(weights)
    elif kind != "tensors":
        save_file(tensors, str(bad / "adapter_model.safetensors"), metadata=meta)
    _check("load_lokr", load_lokr, _net, model, torch.randn(3, 64), bad)


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    model = quantize_model(_net(), [torch.randn(16, 64)], rank=16, alphas=[0.5], refine_iters=0)
    path = tmp_path_factory.mktemp("fuzz_quant") / "q.safetensors"
    save_quantized(model, path)
    return model, path


@fuzz(40)
@given(data=st.data())
def test_load_quantized(quant_file, tmp_path_factory, data):
    model, path = quant_file
    tensors, meta = _read(path)
    bad = tmp_path_factory.mktemp("bad_q") / "q.safetensors"
    kind = data.draw(st.sampled_from(["bytes", "metadata", "layers", "config", "tensors"]))
    if kind == "bytes":
        bad.write_bytes(data.draw(corrupted_bytes(path.read_bytes())))
    elif kind == "metadata":
        save_file(tensors, str(bad), metadata={k: str(v) for k, v in data.draw(json_mutation(meta)).items()})
    elif kind in ("layers", "config"):
        key = "svdkernels.layers" if kind == "layers" else "svdkernels.quant_config"
        tree = data.draw(json_mutation(json.loads(meta[key])))
        save_file(tensors, str(bad), metadata={**meta, key: json.dumps(tree)})
    else:
        save_file(data.draw(tensor_mutation(tensors)), str(bad), metadata=meta)
    _check("load_quantized", load_quantized, _net, model, torch.randn(3, 64), bad)
