"""lowrank_adam_step: the reference against GaLore's step in float64, the int4 basis,
stochastic rounding, the op contract and bad input."""
import pytest
import torch

import svdkernels
from svdkernels.ops.lowrank_adam_step import (
    bias_corrected_step_size,
    dequantize_basis,
    lowrank_adam_step,
    quantize_basis,
    stochastic_round,
)
from svdkernels.reference import lowrank_adam_step as ref
from svdkernels.testing.errors import assert_raises_naming

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(m, n, r, right, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = n if right else m
    W = torch.randn(m, n, generator=g).to(dtype)
    G = torch.randn(m, n, generator=g).to(dtype)
    P = torch.linalg.qr(torch.randn(k, r, generator=g))[0].T.contiguous()
    shape = (m, r) if right else (r, n)
    return W, G, P, torch.randn(shape, generator=g), torch.rand(shape, generator=g)


def galore_step64(W, G, P, m, v, right, b1, b2, eps, lr, t, scale, wd):
    """galore-torch's AdamW step for one projected matrix, in float64 (the oracle)."""
    W, G, P, m, v = (x.double() for x in (W, G, P, m, v))
    R = G @ P.T if right else P @ G
    m = b1 * m + (1 - b1) * R
    v = b2 * v + (1 - b2) * R * R
    N = m / (v.sqrt() + eps)
    step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
    W = W - step * scale * (N @ P if right else P.T @ N)
    return W - lr * wd * W, m, v


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_reference_is_galores_step(right):
    W, G, P, m, v = problem(23, 17, 4, right)
    want = galore_step64(W, G, P, m, v, right, 0.9, 0.99, 1e-6, 1e-2, 3, 0.25, 0.1)
    lowrank_adam_step(W, G, P, m, v, step_size=bias_corrected_step_size(1e-2, 0.9, 0.99, 3) * 0.25,
                      side="right" if right else "left", betas=(0.9, 0.99), eps=1e-6, decay=1e-2 * 0.1)
    for got, exp in zip((W, m, v), want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)  # fp32 products of ~20 terms


def test_int4_basis_roundtrip_and_layout():
    torch.manual_seed(1)
    P = torch.linalg.qr(torch.randn(301, 3))[0].T.contiguous()  # k odd, two groups (256 + 45)
    packed, scale, zero = quantize_basis(P)
    assert packed.shape == (3, 151) and packed.dtype == torch.uint8 and scale.shape == (3, 2)
    D = dequantize_basis(packed, scale, zero, 301)
    # Round to nearest on a 16-level grid per group: error at most half a step.
    group = torch.arange(301) // 256
    assert ((D - P).abs() <= scale[:, group] / 2 + 1e-7).all()
    # Low nibble = even k (the nibble order of svdkernels.formats.int4).
    q0 = torch.round((P[0, 0] - zero[0, 0]) / scale[0, 0])
    assert (packed[0, 0] & 0xF) == int(q0)
    # A constant group dequantises exactly.
    c = torch.full((1, 10), 0.125)
    torch.testing.assert_close(dequantize_basis(*quantize_basis(c), 10), c, rtol=0, atol=0)


def test_packed_basis_step_equals_the_dequantised_float_step():
    W, G, P, m, v = problem(20, 12, 3, True, seed=2)
    packed, s, z = quantize_basis(P)
    a = [t.clone() for t in (W, m, v)]
    b = [t.clone() for t in (W, m, v)]
    lowrank_adam_step(a[0], G, packed, a[1], a[2], step_size=1e-2, P_scale=s, P_zero=z)
    lowrank_adam_step(b[0], G, dequantize_basis(packed, s, z, 12), b[1], b[2], step_size=1e-2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.randn(4096) * 3
    r1, r2 = stochastic_round(x, 7), stochastic_round(x, 7)
    assert torch.equal(r1, r2) and not torch.equal(r1, stochastic_round(x, 8))
    # Each value goes to one of its two bfloat16 neighbours: truncated toward zero, or
    # one bfloat16 step further from zero...
    bits = x.view(torch.int32)
    toward = (bits & -65536).view(torch.float32)
    away = ((bits & -65536) + 65536).view(torch.float32)
    assert ((r1.float() == toward) | (r1.float() == away)).all()
    # ... and the mean over seeds is x (rounding to nearest is biased by up to half a step):
    # 256 draws put the mean within 0.25 steps with 8 standard deviations to spare.
    mean = torch.stack([stochastic_round(x, s).float() for s in range(256)]).mean(0)
    assert ((mean - x).abs() <= 0.25 * (away - toward).abs()).all()


def test_bf16_weights_round_stochastically_when_seeded():
    W, G, P, m, v = problem(16, 8, 2, True, seed=3, dtype=torch.bfloat16)
    outs = []
    for seed in (None, 1, 1, 2):
        w = W.clone()
        lowrank_adam_step(w, G, P, m.clone(), v.clone(), step_size=1e-3, sr_seed=seed)
        outs.append(w)
    assert torch.equal(outs[1], outs[2]) and not torch.equal(outs[1], outs[3])
    assert not torch.equal(outs[0], outs[1])


def test_opcheck_and_compile():
    W, G, P, m, v = problem(9, 6, 2, False)
    torch.library.opcheck(torch.ops.svdkernels.lowrank_adam_step.default,
                          (W, G, P, None, None, m, v, False, 0.9, 0.999, 1e-8, 1e-3, 0.0, None))
    packed, s, z = quantize_basis(P)
    torch.library.opcheck(torch.ops.svdkernels.lowrank_adam_step.default,
                          (W.bfloat16(), G.bfloat16(), packed, s, z, m, v, False, 0.9, 0.999, 1e-8, 1e-3, 1e-4, 3))

    def step(W, G, P, m, v):
        lowrank_adam_step(W, G, P, m, v, step_size=1e-3, side="left")
        return W.sum()

    a = [t.clone() for t in (W, m, v)]
    want = step(a[0], G, P, a[1], a[2])
    b = [t.clone() for t in (W, m, v)]
    got = torch.compile(step, fullgraph=True)(b[0], G, P, b[1], b[2])
    torch.testing.assert_close(got, want)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("packed", [False, True], ids=["f32basis", "int4"])
def test_triton_backend_through_the_op(right, packed):
    pytest.importorskip("triton")
    W, G, P, m, v = problem(19, 13, 3, right, seed=4)
    Ps = Pz = None
    if packed:
        P, Ps, Pz = quantize_basis(P)
    res = {}
    for backend in ("reference", "triton"):
        w, mm, vv = W.clone(), m.clone(), v.clone()
        with svdkernels.use_backend(backend):
            lowrank_adam_step(w, G, P, mm, vv, step_size=1e-2, side="right" if right else "left", decay=1e-3,
                              P_scale=Ps, P_zero=Pz)
        res[backend] = (w, mm, vv)
    for got, want in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # 3xTF32 against fp32 GEMMs


def _args(**over):
    W, G, P, m, v = problem(8, 6, 2, True)
    kw = dict(W=W, G=G, P=P, exp_avg=m, exp_avg_sq=v, step_size=1e-3)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,exc,words",
    [
        (dict(W=torch.randn(8, 6, 2)), ValueError, ["W", "2-D", "[8, 6, 2]"]),
        (dict(W=torch.ones(8, 6, dtype=torch.int32)), TypeError, ["W", "torch.int32"]),
        (dict(G=torch.randn(8, 5)), ValueError, ["G", "[8, 6]", "[8, 5]"]),
        (dict(G=torch.randn(8, 6).double()), TypeError, ["G", "torch.float32", "torch.float64"]),
        (dict(P=torch.randn(2, 8)), ValueError, ["P", "[2, 6]", "[2, 8]"]),
        (dict(P=torch.randn(7, 6)), ValueError, ["P", "r = 7", "6"]),
        (dict(P=torch.randn(2, 6).half()), TypeError, ["P", "torch.float16"]),
        (dict(P=torch.zeros(2, 3, dtype=torch.uint8)), ValueError, ["P_scale", "None"]),
        (dict(exp_avg=torch.zeros(2, 6)), ValueError, ["exp_avg", "[8, 2]", "[2, 6]"]),
        (dict(exp_avg_sq=torch.zeros(8, 2).bfloat16()), TypeError, ["exp_avg_sq", "torch.bfloat16"]),
        (dict(side="up"), ValueError, ["side", "'up'"]),
        (dict(betas=(1.0, 0.9)), ValueError, ["betas[0]", "1.0"]),
        (dict(step_size="big"), TypeError, ["step_size", "str"]),
        (dict(sr_seed=1.5), TypeError, ["sr_seed", "float"]),
    ],
    ids=["W-3d", "W-int", "G-shape", "G-dtype", "P-shape", "P-rank", "P-dtype", "packed-no-scale",
         "m-shape", "v-dtype", "side", "beta1", "step_size", "sr_seed"],
)
def test_bad_input_names_the_argument(over, exc, words):
    kw = _args(**over)
    W, G, P, m, v = kw.pop("W"), kw.pop("G"), kw.pop("P"), kw.pop("exp_avg"), kw.pop("exp_avg_sq")
    assert_raises_naming(lambda: lowrank_adam_step(W, G, P, m, v, **kw), exc, words)


def test_reference_never_changes_inputs_it_does_not_own():
    W, G, P, m, v = problem(10, 7, 2, True)
    G0, P0 = G.clone(), P.clone()
    ref.lowrank_adam_step(W, G, P, None, None, m, v, True, 0.9, 0.999, 1e-8, 1e-3, 0.0, None)
    assert torch.equal(G, G0) and torch.equal(P, P0)
