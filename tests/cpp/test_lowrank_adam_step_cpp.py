"""The C++ kernel of lowrank_adam_step (csrc/cpu/lowrank_adam_step*.cpp), every
instruction-set path this CPU runs, against the reference backend: both sides,
float32 and int4 bases, float32 and bfloat16 weights (rounded to nearest and
stochastically), weight decay, fresh and carried moments, odd shapes that leave
remainders in every register tile; bit-identity with the reference where every
product is exact (the stochastic rounding stream included); thread-count
independence; the public op's dispatch and the internal op's contract.

Skipped when svdkernels._C is not built, unless SVDKERNELS_REQUIRE_EXTENSION=1.
"""

import pytest
import torch

import svdkernels
from svdkernels.backends import use_backend
from svdkernels.ops import lowrank_adam_step_cpp as cpp
from svdkernels.reference import lowrank_adam_step as ref
from svdkernels.testing.errors import assert_raises_naming

from cpp_support import ISA_NAMES, isas, require_extension  # noqa: E402 (tests/cpp on sys.path)

require_extension()

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = torch.ops.svdkernels
ISAS = isas()
# (m, n, r): remainders in the 6-row and 16/32-column tiles; n < one column tile with
# r = n; fewer rows than one tile; k > 256 (two int4 groups on either side).
SHAPES = [(37, 53, 5), (70, 9, 9), (3, 40, 2), (300, 260, 17)]
STEP = dict(beta1=0.9, beta2=0.99, eps=1e-8, step_size=1e-2, decay=1e-3)


def problem(m, n, r, right, dtype, packed, carried, seed=0):
    """(W, G, P, P_scale, P_zero, exp_avg, exp_avg_sq): an orthonormal basis (or its int4
    packing), moments fresh (zeros, the first step) or carried from earlier steps."""
    g = torch.Generator().manual_seed(seed)
    k = n if right else m
    W, G = torch.randn(m, n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    P = torch.linalg.qr(torch.randn(k, r, generator=g))[0].T.contiguous()
    Ps = Pz = None
    if packed:
        P, Ps, Pz = ref.quantize_basis(P)
    shape = (m, r) if right else (r, n)
    if carried:
        m0, v0 = torch.randn(shape, generator=g) * 0.1, torch.rand(shape, generator=g) * 0.01
    else:
        m0, v0 = torch.zeros(shape), torch.zeros(shape)
    return W, G, P, Ps, Pz, m0, v0


def run(step, prob, right, sr_seed, **kw):
    W, G, P, Ps, Pz, m0, v0 = prob
    w, m, v = W.clone(), m0.clone(), v0.clone()
    args = (w, G, P, Ps, Pz, m, v, right, STEP["beta1"], STEP["beta2"], STEP["eps"], STEP["step_size"],
            STEP["decay"], sr_seed)
    step(*args, **kw)
    return w, m, v


def assert_bf16_close(got, want):
    """bfloat16 weights: the float32 values before rounding differ by float32 rounding
    (GEMM order), so an element may land on the neighbouring bfloat16 value; at most
    0.5% of them, and never further than one bfloat16 step."""
    diff = got != want
    assert diff.float().mean() <= 0.005, f"{int(diff.sum())} of {diff.numel()} bfloat16 values differ"
    gi, wi = got.view(torch.int16).int(), want.view(torch.int16).int()
    assert ((gi - wi).abs() <= 1).all()


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("packed", [False, True], ids=["f32basis", "int4"])
def test_matches_reference(isa, shape, right, packed):
    for dtype, sr_seed, carried in ((torch.float32, None, True), (torch.float32, None, False),
                                    (torch.bfloat16, None, True), (torch.bfloat16, 11, True)):
        prob = problem(*shape, right, dtype, packed, carried, seed=shape[0])
        want = run(ref.lowrank_adam_step, prob, right, sr_seed)
        got = run(cpp.lowrank_adam_step, prob, right, sr_seed, isa=isa)
        # Moments: float32 of the same GEMM, elementwise ops in the reference's order.
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[0], prob[0])  # the step did something
        if dtype == torch.float32:
            # Back-projection sums of r float32 products in another order than MKL's.
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        else:
            assert_bf16_close(got[0], want[0])


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_bit_identical_when_products_are_exact(isa, right):
    # Basis rows from the identity and β1 = β2 = 0: R, the moments, N and U = N·P are
    # exact in both backends, so W must come out bit for bit the same, including the
    # rounding to nearest and the stochastic rounding stream (seed, flat index).
    m, n, r = 29, 45, 7
    k = n if right else m
    g = torch.Generator().manual_seed(5)
    W, G = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    P = torch.eye(k)[torch.randperm(k, generator=g)[:r]].contiguous()
    shape = (m, r) if right else (r, n)
    for dtype, seed in ((torch.bfloat16, None), (torch.bfloat16, 3), (torch.bfloat16, -(2**40) + 7)):
        outs = []
        for step, kw in ((ref.lowrank_adam_step, {}), (cpp.lowrank_adam_step, {"isa": isa})):
            w, mm, vv = W.to(dtype), torch.zeros(shape), torch.zeros(shape)
            step(w, G.to(dtype), P, None, None, mm, vv, right, 0.0, 0.0, 1e-8, 0.37, 0.01, seed, **kw)
            outs.append((w, mm, vv))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    # Stochastic rounding really is in play: another seed rounds some elements differently.
    w3, w4 = W.bfloat16(), W.bfloat16()
    for w, seed in ((w3, 3), (w4, 4)):
        cpp.lowrank_adam_step(w, G.bfloat16(), P, None, None, torch.zeros(shape), torch.zeros(shape), right,
                              0.0, 0.0, 1e-8, 0.37, 0.01, seed, isa=isa)
    assert not torch.equal(w3, w4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_independent_of_thread_count(dtype, right):
    # 1200 rows: the W pass splits into several work items with two threads.
    prob = problem(1200, 64, 8, right, dtype, packed=not right, carried=True, seed=9)
    sr = 5 if dtype == torch.bfloat16 else None
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(run(cpp.lowrank_adam_step, prob, right, sr))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_public_op_dispatches_float32_and_bfloat16_to_cpp(monkeypatch):
    calls = []
    real = cpp.lowrank_adam_step
    monkeypatch.setattr(cpp, "lowrank_adam_step", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W, G, P, _, _, m, v = problem(12, 20, 3, True, dtype, packed=False, carried=True)
        svdkernels.lowrank_adam_step(W, G, P, m, v, step_size=1e-2, decay=1e-3)
    assert calls == [torch.float32, torch.bfloat16]  # float16 ran the reference
    # Non-contiguous moments run the reference by default; a forced cpp backend refuses.
    W, G, P, _, _, m, v = problem(12, 20, 3, False, torch.float32, packed=False, carried=True)
    m_t = m.T.contiguous().T
    svdkernels.lowrank_adam_step(W, G, P, m_t, v, step_size=1e-2, side="left")
    assert len(calls) == 2
    with use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend takes contiguous"):
        svdkernels.lowrank_adam_step(W, G, P, m_t, v, step_size=1e-2, side="left")
    with use_backend("cpp"), pytest.raises(RuntimeError, match="float16"):
        W16, G16 = W.half(), G.half()
        svdkernels.lowrank_adam_step(W16, G16, P, m, v, step_size=1e-2, side="left")


def test_public_op_on_cpp_matches_reference_backend():
    prob = problem(40, 24, 4, False, torch.float32, packed=True, carried=True)
    res = {}
    for backend in ("reference", "cpp"):
        W, G, P, Ps, Pz, m0, v0 = prob
        w, m, v = W.clone(), m0.clone(), v0.clone()
        with use_backend(backend):
            svdkernels.lowrank_adam_step(w, G, P, m, v, step_size=1e-2, side="left", decay=1e-3, P_scale=Ps,
                                         P_zero=Pz)
        res[backend] = (w, m, v)
    for a, b in zip(res["cpp"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_internal_op_rejects_bad_input():
    W, G, P, _, _, m, v = problem(8, 6, 2, True, torch.float32, packed=False, carried=True)
    base = (W, G, P, None, None, m, v, True, 0.9, 0.99, 1e-8, 1e-3, 0.0, None)

    def call(*over, isa=-1):
        args = list(base)
        for i, x in over:
            args[i] = x
        return lambda: OPS._cpp_lowrank_adam_step(*args, isa)

    best = OPS._cpp_best_isa()
    assert_raises_naming(call(isa=best + 1), ValueError, ["isa", str(best + 1)])
    assert_raises_naming(call((0, W.T.contiguous().T)), ValueError, ["W", "contiguous"])
    assert_raises_naming(call((0, W.double()), (1, G.double())), TypeError, ["W", "Double"])
    assert_raises_naming(call((5, m.T.contiguous().T)), ValueError, ["exp_avg", "contiguous"])
    assert_raises_naming(call((2, P[:, :5])), ValueError, ["P", "[2, 6]"])
    packed, s, z = ref.quantize_basis(P)
    assert_raises_naming(call((2, packed)), ValueError, ["P_scale", "None"])
    assert_raises_naming(call((2, packed), (3, s), (4, z[:, :0])), ValueError, ["P_zero", "[2, 1]"])


def test_random_shapes_against_reference():
    # Shapes down to a single row or column (r = 1), on the best path this CPU runs.
    g = torch.Generator().manual_seed(13)
    for case in range(24):
        m, n = (int(x) for x in torch.randint(1, 70, (2,), generator=g))
        r = int(torch.randint(1, min(m, n) + 1, (1,), generator=g))
        right, packed = case % 2 == 0, case % 3 == 0
        dtype, sr = ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, case))[case % 3]
        prob = problem(m, n, r, right, dtype, packed, carried=case % 4 != 1, seed=case)
        want = run(ref.lowrank_adam_step, prob, right, sr)
        got = run(cpp.lowrank_adam_step, prob, right, sr)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda s: f"{(m, n, r, right)}: {s}")
        if dtype == torch.float32:
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        else:
            assert_bf16_close(got[0], want[0])


# --- The projected entry (rank-space accumulation: train/layerwise) ---------------


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES.get)
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("dtype,sr_seed", [(torch.float32, None), (torch.bfloat16, 7)], ids=["f32", "bf16-sr"])
def test_projected_entry_is_the_fused_step_after_its_projection(isa, right, dtype, sr_seed):
    """From ``R = G·Pᵀ`` (or ``P·G``) the projected entry gives the fused step's bits."""
    prob = problem(37, 53, 5, right, dtype, packed=False, carried=True)
    W, G, P, _, _, m0, v0 = prob
    want = run(cpp.lowrank_adam_step, prob, right, sr_seed, isa=isa)
    R = G.float() @ P.T if right else P @ G.float()
    w, m, v = W.clone(), m0.clone(), v0.clone()
    cpp.projected_adam_step(w, R, P, m, v, right, STEP["beta1"], STEP["beta2"], STEP["eps"], STEP["step_size"],
                            STEP["decay"], sr_seed, isa=isa)
    for got, exp in zip((w, m, v), want):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_projected_entry_against_the_reference(right):
    prob = problem(70, 9, 4, right, torch.float32, packed=False, carried=True)
    W, G, P, _, _, m0, v0 = prob
    R = G @ P.T if right else P @ G
    outs = []
    for step in (cpp.projected_adam_step, ref.projected_adam_step):
        w, m, v = W.clone(), m0.clone(), v0.clone()
        step(w, R, P, m, v, right, STEP["beta1"], STEP["beta2"], STEP["eps"], STEP["step_size"], STEP["decay"], None)
        outs.append((w, m, v))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_projected_entry_rejects_bad_projections():
    W, G, P, _, _, m0, v0 = problem(37, 53, 5, True, torch.float32, packed=False, carried=False)
    R = G @ P.T
    call = lambda R_, P_: OPS._cpp_lowrank_adam_step_projected(  # noqa: E731
        W.clone(), R_, P_, m0.clone(), v0.clone(), True, 0.9, 0.99, 1e-8, 1e-2, 0.0, None)
    assert_raises_naming(lambda: call(R.T.contiguous(), P), ValueError, ["R:", "[37, 5]", "[5, 37]"])
    assert_raises_naming(lambda: call(R.double(), P), TypeError, ["R:", "float32", "Double"])
    packed, _, _ = ref.quantize_basis(P)
    assert_raises_naming(lambda: call(R, packed), TypeError, ["P:", "float32", "Byte"])
