"""``svdkernels.ops.lowrank_quant.lowrank_w4a4_linear`` (SVDQuant W4A4 layer in one
call): bit-identical to ``lowrank_quantize_act`` then ``lowrank_w4a4_gemm`` on every CPU
backend present (reference, and cpp when svdkernels._C is built), through the eager
fast path and the custom op alike; bad input named as the pair names it (the eager C++
fast path included); opcheck and torch.compile.
"""
import pytest
import torch

import svdkernels
from svdkernels.backends import cpp_available
from svdkernels.ops.lowrank_quant import lowrank_quantize_act, lowrank_w4a4_gemm, lowrank_w4a4_linear
from svdkernels.quant import quantize_weight

BACKENDS = ["reference"] + (["cpp"] if cpp_available() else [])


def layer(N, K, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qweight, scales = quantize_weight(torch.randn(N, K, generator=g), dtype=dtype)
    L_down = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    return (torch.rand(K, generator=g) + 0.5, L_down, qweight, scales, torch.randn(N, r, generator=g).to(dtype),
            torch.randn(N, generator=g).to(dtype))


def pair(x, smooth, L_down, qweight, scales, L_up, bias, unsigned):
    xq, xs, la = lowrank_quantize_act(x, smooth, L_down, unsigned=unsigned)
    return lowrank_w4a4_gemm(xq, xs, qweight, scales, lowrank_act=la, L_up=L_up, bias=bias, unsigned=unsigned)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equals_the_pair(backend, dtype):
    smooth, L_down, qweight, scales, L_up, bias = layer(40, 192, 16, dtype)
    for unsigned in (False, True):
        for lead in ((5,), (2, 3), (0,)):
            x = torch.randn(*lead, 192).clamp(min=-0.171875 if unsigned else -10).to(dtype)
            for b in (None, bias):
                with svdkernels.use_backend(backend):
                    y = lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, b, unsigned=unsigned)
                    y_op = torch.ops.svdkernels.lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, b,
                                                                    unsigned)
                    y_pair = pair(x, smooth, L_down, qweight, scales, L_up, b, unsigned)
                assert y.dtype == dtype and y.shape == (*lead, 40)
                assert torch.equal(y, y_pair) and torch.equal(y_op, y_pair), (unsigned, lead, b is None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    smooth, L_down, qweight, scales, L_up, bias = layer(32, 128, 16, torch.float32)
    x = torch.randn(3, 128)
    args = dict(x=x, smooth=smooth, L_down=L_down, qweight=qweight, scales=scales, L_up=L_up, bias=bias)

    def call(**kw):
        a = {**args, **kw}
        unsigned = a.pop("unsigned", False)
        return lowrank_w4a4_linear(*a.values(), unsigned=unsigned)

    cases = [
        (TypeError, "x: expected a torch.Tensor, got list", dict(x=[[1.0] * 128])),
        (TypeError, "x: expected dtype float32, float16 or bfloat16", dict(x=x.double())),
        (ValueError, "x: expected the last dim K to be a positive multiple of the group size 64", dict(x=x[:, :96])),
        (ValueError, r"smooth: expected shape \[K\] = \[128\], got \[64\]", dict(smooth=smooth[:64])),
        (ValueError, "smooth: expected finite factors > 0, got nan at index 7",
         dict(smooth=smooth.clone().index_fill_(0, torch.tensor([7]), float("nan")))),
        (ValueError, "L_down: expected the rank r = L_down.shape\\[0\\] to be a multiple of 16",
         dict(L_down=L_down[:8], L_up=L_up[:, :8].contiguous())),
        (TypeError, r"L_down: expected dtype torch.float32 \(the dtype of x\)", dict(L_down=L_down.half())),
        (TypeError, "qweight: expected dtype uint8", dict(qweight=qweight.to(torch.int8))),
        (ValueError, r"qweight: expected shape \[N, K/2\] with K = 128 = \[32, 64\]",
         dict(qweight=torch.zeros(32, 128, dtype=torch.uint8))),
        (TypeError, r"scales: expected dtype torch.float32 \(the dtype of x\)", dict(scales=scales.bfloat16())),
        (ValueError, "scales: expected a contiguous", dict(scales=scales.T.contiguous().T)),
        (ValueError, r"L_up: expected shape \[N, r\] with N = 32, r = 16", dict(L_up=L_up[:16])),
        (TypeError, r"bias: expected dtype torch.float32 \(the dtype of x\)", dict(bias=bias.half())),
        (ValueError, r"bias: expected shape \[N\]", dict(bias=bias[:31])),
        (TypeError, "unsigned: expected a bool, got int", dict(unsigned=1)),
    ]
    with svdkernels.use_backend(backend):
        for exc, msg, kw in cases:
            with pytest.raises(exc, match=msg):
                call(**kw)
            if "unsigned" not in kw and "smooth" not in kw and not isinstance(kw.get("x"), list):
                # The custom op (torch.compile's and torch.ops users' entry) alike.
                a = {**args, **kw}
                with pytest.raises(exc, match=msg):
                    torch.ops.svdkernels.lowrank_w4a4_linear(*a.values(), False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    smooth, L_down, qweight, scales, L_up, bias = layer(24, 128, 16, torch.bfloat16)
    x = torch.randn(2, 3, 128).bfloat16()
    with svdkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.svdkernels.lowrank_w4a4_linear.default,
                              (x, smooth, L_down, qweight, scales, L_up, bias, True))


def test_torch_compile_fullgraph():
    smooth, L_down, qweight, scales, L_up, bias = layer(32, 128, 16, torch.float32)

    def f(x: torch.Tensor) -> torch.Tensor:
        return lowrank_w4a4_linear(x, smooth, L_down, qweight, scales, L_up, bias)

    x = torch.randn(3, 128)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
