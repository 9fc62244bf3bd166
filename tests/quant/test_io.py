"""save_quantized / load_quantized (svdkernels/quant/io.py): safetensors files
that load into the float model with bit-identical outputs, their metadata, and
the errors for files and models that do not fit."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from svdkernels.quant import LowRankQuantLinear, load_quantized, quantize_model, save_quantized
from svdkernels.quant.io import FORMAT, FORMAT_VERSION
from svdkernels.testing.errors import assert_raises_naming


class Net(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(128, hidden)
        self.down = nn.Linear(hidden, 128, bias=False)
        self.out = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.down(nn.functional.gelu(self.up(x))))


def base(hidden: int = 256) -> Net:
    torch.manual_seed(0)
    return Net(hidden).eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(24, 128, generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Net, str]:
    """W4A4 (signed ``up``, unsigned ``down`` after the GELU), a W4A16 bfloat16
    ``out``, and a LoRA merged into ``up``: every kind of layer in one file."""
    model = base()
    kw = dict(alphas=[0.25, 0.75], refine_iters=1)
    quantize_model(model, calib(), targets=["up", "down"], acts="int4", **kw)
    quantize_model(model, calib(), targets=["out"], acts=None, rank=16, dtype=torch.bfloat16, **kw)
    g = torch.Generator().manual_seed(2)
    model.up.merge_lora(torch.randn(8, 128, generator=g), torch.randn(256, 8, generator=g), 0.5)
    path = str(tmp_path_factory.mktemp("io") / "model.safetensors")
    save_quantized(model, path)
    return model, path


def test_load_gives_bit_identical_outputs(saved):
    model, path = saved
    loaded = load_quantized(base(), path)
    assert all(isinstance(getattr(loaded, n), LowRankQuantLinear) for n in ("up", "down", "out"))
    x = torch.randn(5, 7, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name in ("up", "down", "out"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert (a.rank, a.acts, a.unsigned, a.dtype) == (b.rank, b.acts, b.unsigned, b.dtype)
        for key, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[key]), (name, key)
    assert loaded.svdkernels_quant_config == model.svdkernels_quant_config


def test_metadata(saved):
    model, path = saved
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "pt"
    assert meta["svdkernels.format"] == FORMAT and meta["svdkernels.format_version"] == FORMAT_VERSION
    layers = json.loads(meta["svdkernels.layers"])
    assert layers["up"] == {"in_features": 128, "out_features": 256, "rank": 48, "acts": "int4",
                            "unsigned": False, "dtype": "float32", "bias": True}
    assert layers["down"]["unsigned"] is True and layers["down"]["bias"] is True  # the compensated bias
    assert layers["out"]["acts"] is None and layers["out"]["dtype"] == "bfloat16" and layers["out"]["rank"] == 16
    assert "out.bias" in keys and {"up.qweight", "up.scales", "up.L_down", "up.L_up", "up.smooth"} <= keys
    assert json.loads(meta["svdkernels.quant_config"])["layers"]["down"]["unsigned"] is True
    with open(path, "rb") as fh:  # a safetensors header, not a pickle
        head = fh.read(9)
    assert head[8:9] == b"{"


def test_wrong_files(saved, tmp_path):
    _, path = saved
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    assert_raises_naming(lambda: load_quantized(base(), garbage), ValueError, ["path", "safetensors", "garbage"])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    assert_raises_naming(lambda: load_quantized(base(), foreign), ValueError, ["path", FORMAT, "None"])
    with pytest.raises(FileNotFoundError):
        load_quantized(base(), tmp_path / "missing.safetensors")

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "svdkernels.format_version": "0"})
    assert_raises_naming(lambda: load_quantized(base(), old), ValueError, ["version", FORMAT_VERSION, "'0'"])
    for key, bad, words in [
        ("up.scales", tensors["up.scales"][:, :1].contiguous(), ["'up'", "scales", "[256, 1]"]),
        ("up.qweight", tensors["up.qweight"][:100].contiguous(), ["up.qweight", "[256, 64]", "[100, 64]"]),
        ("out.L_up", tensors["out.L_up"].float(), ["'out'", "L_up", "bfloat16", "float32"]),
    ]:
        broken = tmp_path / f"broken_{key}.safetensors"
        save_file({**tensors, key: bad}, str(broken), metadata=meta)
        assert_raises_naming(lambda: load_quantized(base(), broken), ValueError, words)
    missing = tmp_path / "missing_tensor.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "down.L_up"}, str(missing), metadata=meta)
    assert_raises_naming(lambda: load_quantized(base(), missing), ValueError, ["path", "down.L_up"])


def test_wrong_models(saved):
    _, path = saved
    assert_raises_naming(lambda: load_quantized(base(hidden=320), path), ValueError,
                         ["'up'", "[256, 128]", "[320, 128]"])
    other = nn.Sequential(nn.Linear(128, 256))
    assert_raises_naming(lambda: load_quantized(other, path), ValueError, ["model", "'up'"])
    model = base()
    model.out = nn.Linear(128, 32)  # "up" and "down" fit, "out" does not
    assert_raises_naming(lambda: load_quantized(model, path), ValueError, ["'out'", "[64, 128]", "[32, 128]"])
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)  # a failed load replaces nothing
    assert_raises_naming(lambda: save_quantized(base(), "x.safetensors"), ValueError, ["model", "LowRankQuantLinear"])
    assert_raises_naming(lambda: save_quantized({}, "x.safetensors"), TypeError, ["model", "Module", "dict"])
