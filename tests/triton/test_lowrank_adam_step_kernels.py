"""Triton kernels of lowrank_adam_step (levels 2 and 3 of DESIGN.md's verification plan).

Level 2: the two kernels (projection + Adam, back-projection + update) against the
reference step, through the Triton interpreter on CPU tensors when there is no GPU:
both sides, float and packed int4 bases, every weight dtype, shapes that are not
multiples of the tiles, ranks across several rank tiles, stochastic rounding.

Level 3: every kernel × config × dtype × basis (``compile_cases()``, covered here) is
built for sm_80 and sm_90 by tests/triton/test_compile.py: zero spills, shared memory
within the limit, tensor cores.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from svdkernels.backends import triton_interpreted  # noqa: E402
from svdkernels.reference import lowrank_adam_step as ref  # noqa: E402
from svdkernels.triton import lowrank_adam_step as tk  # noqa: E402

RUNS = torch.cuda.is_available() or triton_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

# Moments (float32 in both): the projection R differs by the basis rounded to the compute
# dtype in registers (16-bit: one rounding of P, 2^-8 / 2^-10 relative per term) or by
# 3xTF32 (~21 bits per product) against the reference's float32 GEMM.
MOMENT_TOL = {"fp32": 1e-5, "bf16": 2**-6, "fp16": 2**-8}
# Weights: the same relative error on the update, plus one unit in the last place of W's
# dtype (both backends round W once; a tiny difference may round it the other way).
UPDATE_TOL = {"fp32": 1e-5, "bf16": 2**-6, "fp16": 2**-8}
ULP = {"fp32": 2**-23, "bf16": 2**-7, "fp16": 2**-10}

SMALL = tk.Config("small", 1 << 30, BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, UPDATE_M=16, UPDATE_K=16, UPDATE_R=16)


def _problem(m, n, r, right, dtype, packed, seed):
    g = torch.Generator().manual_seed(seed)
    k = n if right else m
    W = torch.randn(m, n, generator=g).to(dtype)
    G = torch.randn(m, n, generator=g).to(dtype)
    P = torch.linalg.qr(torch.randn(k, r, generator=g))[0].T.contiguous()
    Ps = Pz = None
    if packed:
        P, Ps, Pz = ref.quantize_basis(P)
    shape = (m, r) if right else (r, n)
    exp_avg, exp_avg_sq = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [to(t) for t in (W, G, P, Ps, Pz, exp_avg, exp_avg_sq)]


def _run(fn, args, right, sr_seed=None, **kw):
    W, G, P, Ps, Pz, m, v = [None if t is None else t.clone() for t in args]
    fn(W, G, P, Ps, Pz, m, v, right, 0.9, 0.99, 1e-8, 0.02, 1e-3, sr_seed, **kw)
    return W, m, v


def _check(args, right, dtype, sr_seed=None, **kw):
    W0 = args[0]
    w_t, m_t, v_t = _run(tk.lowrank_adam_step, args, right, sr_seed, **kw)
    w_r, m_r, v_r = _run(ref.lowrank_adam_step, [t.cpu() if t is not None else None for t in args], right, sr_seed)
    for got, want in ((m_t, m_r), (v_t, v_r)):
        rms = want.pow(2).mean().sqrt().item()
        torch.testing.assert_close(got.cpu(), want, rtol=MOMENT_TOL[dtype], atol=MOMENT_TOL[dtype] * rms)
    upd = (w_r.double() - W0.cpu().double()).abs().max().item()
    err = (w_t.cpu().double() - w_r.double()).abs()
    bound = UPDATE_TOL[dtype] * upd + ULP[dtype] * w_r.double().abs() * (2 if sr_seed is not None else 1)
    assert (err <= bound).all(), (err - bound).max()
    assert w_t.dtype == W0.dtype


# m, n, r: not multiples of any tile, r = 1, r spanning several 16-wide rank tiles.
SHAPES = [(37, 21, 5), (9, 40, 1), (50, 33, 20)]


@needs_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["f32basis", "int4"])
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-n{}-r{}".format(*s))
def test_step_matches_reference(shape, dtype, right, packed):
    args = _problem(*shape, right, DTYPES[dtype], packed, seed=sum(shape))
    _check(args, right, dtype)


@needs_kernels
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_many_tiles_small_config(right):
    # 16-wide tiles: 3 row tiles, 3 K chunks and 2 rank tiles with ragged last ones.
    args = _problem(40, 35, 20, right, torch.float32, True, seed=11)
    _check(args, right, "fp32", config=SMALL)


@needs_kernels
@pytest.mark.parametrize("config", tk.CONFIGS, ids=lambda c: c.name)
def test_each_config(config):
    args = _problem(30, 70, 9, True, torch.float32, False, seed=12)
    _check(args, True, "fp32", config=config)


@needs_kernels
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_stochastic_rounding_matches_reference_bitwise(right):
    # With no update (step_size 0), both backends round the same float32 values
    # (w − decay·w): the kernel's hash must give the reference's bits exactly.
    W, G, P, Ps, Pz, m, v = _problem(23, 19, 3, right, torch.bfloat16, False, seed=13)
    outs = []
    for fn, dev in ((tk.lowrank_adam_step, DEVICE), (ref.lowrank_adam_step, "cpu")):
        w = W.clone().to(dev)
        fn(w, G.to(dev), P.to(dev), None, None, m.clone().to(dev), v.clone().to(dev), right,
           0.9, 0.99, 1e-8, 0.0, 0.3, 12345)
        outs.append(w.cpu())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[1], (W.float() * 0.7).bfloat16())  # not round-to-nearest


@needs_kernels
def test_bf16_stochastic_step_close_to_reference():
    args = _problem(37, 21, 5, True, torch.bfloat16, False, seed=14)
    _check(args, True, "bf16", sr_seed=3)


@needs_kernels
def test_pick_config():
    assert tk.pick_config(1).name == "r32" and tk.pick_config(32).name == "r32"
    assert tk.pick_config(33).name == "r64" and tk.pick_config(1024).name == "r64"


# ------------------------------------------- compile cases (built by tests/triton/test_compile.py)


CASES = list(tk.compile_cases())


def test_compile_cases_cover_every_kernel_config_dtype_and_basis():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES)
    for kernel in ("project", "update"):
        for cfg in tk.CONFIGS:
            for dtype in ("bf16", "fp16", "fp32"):
                for basis in ("f32basis", "int4"):
                    assert f"{kernel}-{cfg.name}-{dtype}-{basis}" in ids
    assert {i for i in ids if i.endswith("-sr")} == {f"update-{c.name}-bf16-{b}-sr" for c in tk.CONFIGS
                                                    for b in ("f32basis", "int4")}
    # Built with the launchers' tiles and options.
    for case in CASES:
        cfg = next(c for c in tk.CONFIGS if c.name == case.id.split("-")[1])
        assert case.options == dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), case.id
        blocks = ((cfg.BLOCK_M, cfg.BLOCK_R, cfg.BLOCK_K) if case.id.startswith("project")
                  else (cfg.UPDATE_M, cfg.UPDATE_R, cfg.UPDATE_K))
        assert (case.constexprs["BLOCK_M"], case.constexprs["BLOCK_R"], case.constexprs["BLOCK_K"]) == blocks
