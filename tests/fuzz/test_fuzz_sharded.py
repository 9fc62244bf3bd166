"""Fuzz: rsvd_sharded's argument checks and results on a 2-rank gloo mesh (issue 13).

One ``run_distributed(_worker, 2)`` spawn runs every case inside each rank (a spawn per
case would cost seconds each): the cases are drawn here from seeded ``random.Random``
(hypothesis draws one example at a time, which a shared spawn cannot), as plain specs
(shapes, placement, dtype, arguments, where a NaN goes) that each rank turns into the
same DTensor. A case must end on *every* rank in the fuzz oracle's way (a result equal
to the single-process reference rsvd, or a ValueError/TypeError naming an argument),
with the same outcome on both ranks; a rank that raised while the other waited in a
collective would hang, which run_distributed's timeout reports."""
from __future__ import annotations

import math
import random

import pytest
import torch
from fuzz_support import run_case
from svdkernels.reference.rsvd import rsvd as reference_rsvd
from svdkernels.testing.distributed import run_distributed

ARGS = ["A", "rank", "oversample", "n_iter", "seed", "sketch_dtype", "center", "method", "tol"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "complex64": torch.complex64, "int32": torch.int32}


BADS = ("rank", "oversample", "n_iter", "seed", "option", "dtype", "placement", "plain", "nan")
N_CASES = 100  # every other case good; the bad kinds in turn


def spec(i: int) -> dict:
    """Case ``i``: drawn from ``random.Random(i)`` (the same cases on every run and rank)."""
    rng = random.Random(i)
    bad = None if i % 2 == 0 else BADS[(i // 2) % len(BADS)]
    m, n = rng.randint(1, 7), rng.randint(1, 7)
    kw: dict = {"rank": rng.randint(1, min(m, n)), "oversample": rng.randint(0, 3), "n_iter": rng.randint(0, 2),
                "seed": rng.choice([0, 5, 2**40, None])}
    if bad in ("rank", "oversample", "n_iter"):
        kw[bad] = rng.choice([-1, 1.5, True, None] + ([0, min(m, n) + 1] if bad == "rank" else []))
    if bad == "seed":
        kw["seed"] = rng.choice([-1, 2**64, 1.5, "1", True])
    if bad == "option":
        name = rng.choice(["sketch_dtype", "center", "method", "tol"])
        kw[name] = {"sketch_dtype": rng.choice(["float64", "int32"]), "center": rng.choice([True, "columns", "x"]),
                    "method": rng.choice(["krylov", "nope"]), "tol": rng.choice([0.1, "x", math.nan])}[name]
    dtype = rng.choice(["float32", "float32", "float64", "bfloat16", "float16"])
    if bad == "dtype":
        dtype = rng.choice(["complex64", "int32"])
    placement = rng.choice(["rows", "cols", "replicate"])
    if bad == "placement":
        placement = rng.choice(["batch", "partial"])
    return {"bad": bad, "m": m, "n": n, "batch": (2,) if bad == "placement" else rng.choice([(), (), (2,)]),
            "dtype": dtype, "placement": placement, "plain": bad == "plain", "kw": kw,
            "magnitude": rng.choice([1.0, 1.0, 1e-3, 1e3, 1e-30]),
            "nan": rng.randint(0, 10**6) if bad == "nan" else None,
            "data_seed": rng.randint(0, 2**16), "entry": rng.choice(["rsvd_sharded", "rsvd"])}


def _matrix(s: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(s["data_seed"])
    A = torch.randn(*s["batch"], s["m"], s["n"], generator=g, dtype=torch.float64) * s["magnitude"]
    if s["nan"] is not None:
        A.view(-1)[s["nan"] % A.numel()] = math.nan
    return A.to(DTYPES[s["dtype"]]) if DTYPES[s["dtype"]] != torch.int32 else A.round().to(torch.int32)


def _worker(rank: int, world_size: int, cases: list[dict]) -> list[tuple]:
    import svdkernels
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from svdkernels.ops.rsvd_sharded import rsvd_sharded

    mesh = DeviceMesh("cpu", list(range(world_size)))
    out = []
    for s in cases:
        A = _matrix(s)
        kw = dict(s["kw"])
        if isinstance(kw.get("sketch_dtype"), str):
            kw["sketch_dtype"] = DTYPES[kw["sketch_dtype"]]
        try:
            if s["plain"]:
                D = A
            elif s["placement"] == "partial":
                D = DTensor.from_local(A, mesh, [Partial()])
            else:
                place = {"rows": Shard(A.dim() - 2), "cols": Shard(A.dim() - 1), "replicate": Replicate(),
                         "batch": Shard(0)}[s["placement"]]
                D = distribute_tensor(A, mesh, [place])
            entry = rsvd_sharded if s["entry"] == "rsvd_sharded" or s["plain"] else svdkernels.rsvd
            U, S, Vh = entry(D, **kw)
            out.append(("ok", U.full_tensor(), S.full_tensor(), Vh.full_tensor()))
        except (ValueError, TypeError) as e:
            out.append((type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - the oracle decides, in the parent
            out.append(("other", f"{type(e).__name__}: {e}"))
    return out


@pytest.fixture(scope="module")
def runs():
    cases = [spec(i) for i in range(N_CASES)]
    return cases, run_distributed(_worker, 2, cases, timeout=240)


def _replay(result: tuple):
    def call():
        if result[0] == "ok":
            return result[1:]
        if result[0] in ("ValueError", "TypeError"):
            raise {"ValueError": ValueError, "TypeError": TypeError}[result[0]](result[1])
        raise RuntimeError(result[1])
    return call


def test_rsvd_sharded_cases(runs):
    cases, (rank0, rank1) = runs
    for s, r0, r1 in zip(cases, rank0, rank1):
        # Both ranks end the same way (an error on one rank alone would leave the other waiting).
        assert r0[0] == r1[0] and (r0[0] == "ok" or r0[1] == r1[1]), (s, r0[:2], r1[:2])
        finite = s["nan"] is None
        out = run_case(f"{s['entry']} (2 ranks)", _replay(r0), ARGS, finite_input=finite)
        if s["bad"] is None:
            assert out.ok, (s, out.error)
        if not out.ok or not finite:
            continue
        U, S, Vh = out.value
        A = _matrix(s)
        k, kw = s["kw"]["rank"], s["kw"]
        seed = kw["seed"]
        if seed is None:  # drawn on rank 0 and broadcast: both ranks agree, nothing to replay
            assert torch.equal(r0[2], r1[2])
            continue
        work = A.float() if A.dtype != torch.float64 else A
        if s["placement"] == "cols":
            Ur, Sr, Vhr = reference_rsvd(work.mT.contiguous(), k, oversample=kw["oversample"], n_iter=kw["n_iter"],
                                         seed=seed, sketch_dtype=work.dtype)
        else:
            Ur, Sr, Vhr = reference_rsvd(work, k, oversample=kw["oversample"], n_iter=kw["n_iter"], seed=seed,
                                         sketch_dtype=work.dtype)
        # Singular values: fp32 rounding of the same algorithm (Grams in float64 here).
        scale = float(Sr.abs().max()) + 1e-300
        tol = 1e-4 if work.dtype == torch.float32 else 1e-10
        assert float((S.double() - Sr.double()).abs().max()) <= tol * scale, (s, S, Sr)
        if k == min(s["m"], s["n"]):  # the full rank: U·S·Vh is A itself
            err = float(((U * S.unsqueeze(-2)) @ Vh).double().sub(work.double()).abs().max())
            assert err <= tol * 10 * (float(work.abs().max()) + 1e-300), (s, err)
