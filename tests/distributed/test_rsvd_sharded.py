"""rsvd_sharded: every placement on meshes of 1, 2 and 4 ranks (sub-meshes of one
4-process run, so the processes start once) equals the single-process reference for
the same seed to fp32 rounding, including uneven and empty shards and shards with
fewer rows than the sketch width; exactly one l×l all-reduce per orthonormalisation;
bad input answered with an error naming it, on every rank (none left hanging)."""
import pytest
import torch
import torch.distributed as dist

from svdkernels.ops.rsvd_sharded import allreduce_bytes, rsvd_sharded
from svdkernels.reference.rsvd import rsvd as reference_rsvd
from svdkernels.testing.distributed import run_distributed
from svdkernels.testing.errors import assert_raises_naming

M, N, K, OVERSAMPLE, SEED = 13, 9, 3, 4, 5  # l = 7: more than every shard's 4, 3, 1 or 0 rows
PLACEMENTS = ("rows", "cols", "replicate")
# fp32 rounding: the sharded and reference computations differ only in summation order
# and the Gram precision; 84 float32 ulps of ‖A‖ (measured differences are about 2 ulps).
TOL = 1e-5


def _matrix(*batch):
    """``[*batch, M, N]`` with singular values 0.6^i: well separated, so the rank-K
    approximation is well defined and rounding is not amplified."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(*batch, M, N, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return ((U * 0.6 ** torch.arange(N, dtype=torch.float64)) @ Vh).float()


def _placement(kind):
    from torch.distributed.tensor import Replicate, Shard

    return {"rows": Shard(-2), "cols": Shard(-1), "replicate": Replicate()}[kind]


def _count_allreduces(calls):
    real = dist.all_reduce

    def counting(t, *args, **kwargs):
        calls.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return real(t, *args, **kwargs)

    return counting


def _errors(rank, mesh4):
    """Each bad input's error message (the same on every rank, raised before any collective
    except the non-finite case, which every rank detects from the reduced Gram)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    A = _matrix()
    cases = {
        "mesh2d": lambda: rsvd_sharded(distribute_tensor(A, DeviceMesh("cpu", [[0, 1], [2, 3]]), [Shard(0), Replicate()]), K),
        "partial": lambda: rsvd_sharded(DTensor.from_local(A, mesh4, [Partial()]), K),
        "batch_shard": lambda: rsvd_sharded(distribute_tensor(_matrix(4), mesh4, [Shard(0)]), K),
        "rank": lambda: rsvd_sharded(distribute_tensor(A, mesh4, [Shard(0)]), N + 1),
        "method": lambda: rsvd_sharded(distribute_tensor(A, mesh4, [Shard(0)]), K, method="krylov"),
        "complex": lambda: rsvd_sharded(distribute_tensor(A.to(torch.complex64), mesh4, [Shard(0)]), K),
    }
    Anan = A.clone()
    Anan[12, 0] = float("nan")  # on rank 3's shard only
    cases["nonfinite"] = lambda: rsvd_sharded(distribute_tensor(Anan, mesh4, [Shard(0)]), K, seed=SEED)
    out = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = None
        except (ValueError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _worker(rank, world_size):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import distribute_tensor

    original = dist.all_reduce
    meshes = {size: DeviceMesh("cpu", list(range(size))) for size in (1, 2, 4)}
    out = {"results": {}, "errors": _errors(rank, meshes[4])}
    for size, mesh in meshes.items():
        if rank >= size:
            continue
        for kind in PLACEMENTS:
            for batch in ((), (2,)):
                D = distribute_tensor(_matrix(*batch), mesh, [_placement(kind)])
                calls = []
                dist.all_reduce = _count_allreduces(calls)
                try:
                    U, S, Vh = rsvd_sharded(D, K, oversample=OVERSAMPLE, seed=SEED)
                finally:
                    dist.all_reduce = original
                out["results"][size, kind, batch] = {
                    "U": U.full_tensor(), "S": S.full_tensor(), "Vh": Vh.full_tensor(),
                    "placements": (U.placements, S.placements, Vh.placements), "calls": calls,
                    "local_rows": D.to_local().shape[-2], "local_S": S.to_local()}
    # 16-bit input: each shard upcast to float32 (the result is float32).
    if rank < 2:
        U, S, Vh = rsvd_sharded(distribute_tensor(_matrix().bfloat16(), meshes[2], [_placement("rows")]), K,
                                oversample=OVERSAMPLE, seed=SEED)
        out["bf16"] = (U.full_tensor(), S.full_tensor(), Vh.full_tensor())
    # seed=None: drawn on the mesh's first rank and broadcast, so every rank agrees.
    U, S, Vh = rsvd_sharded(distribute_tensor(_matrix(), meshes[4], [_placement("rows")]), K)
    out["seedless_S"] = S.to_local()
    # The public entry point routes a DTensor here (same result as the direct call).
    import svdkernels

    D = distribute_tensor(_matrix(), meshes[4], [_placement("rows")])
    U, S, Vh = svdkernels.rsvd(D, K, oversample=OVERSAMPLE, seed=SEED)
    U2, S2, Vh2 = rsvd_sharded(D, K, oversample=OVERSAMPLE, seed=SEED)
    out["via_rsvd"] = (type(U).__name__, type(S).__name__, type(Vh).__name__,
                       all(torch.equal(a.to_local(), b.to_local()) for a, b in ((U, U2), (S, S2), (Vh, Vh2))))
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 4, timeout=240)


def _reference(kind, batch):
    """The single-process rsvd for the same seed (float32 passes): of ``A``, or of ``Aᵀ``
    transposed back for ``Shard(-1)`` (which factors ``Aᵀ``, its rows being ``A``'s columns)."""
    A = _matrix(*batch)
    if kind == "cols":
        U, S, Vh = reference_rsvd(A.mT.contiguous(), K, oversample=OVERSAMPLE, seed=SEED, sketch_dtype=torch.float32)
        return Vh.mT, S, U.mT
    return reference_rsvd(A, K, oversample=OVERSAMPLE, seed=SEED, sketch_dtype=torch.float32)


def _lowrank(U, S, Vh):
    return (U * S.unsqueeze(-2)) @ Vh


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("kind", PLACEMENTS)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_equals_the_single_process_reference(runs, size, kind, batch):
    got = runs[0]["results"][size, kind, batch]
    U, S, Vh = _reference(kind, batch)
    A = _matrix(*batch)
    assert (S - got["S"]).abs().max() <= TOL * S.max()
    assert (_lowrank(U, S, Vh) - _lowrank(got["U"], got["S"], got["Vh"])).norm() <= TOL * A.norm()
    eye = torch.eye(K)
    assert (got["U"].mT @ got["U"] - eye).abs().max() <= TOL and (got["Vh"] @ got["Vh"].mT - eye).abs().max() <= TOL
    # Every rank of the mesh holds the same (replicated) S.
    for r in range(size):
        assert torch.equal(runs[r]["results"][size, kind, batch]["local_S"], got["S"])


def test_the_same_seed_gives_the_same_result_on_every_world_size(runs):
    for kind in PLACEMENTS:
        one = runs[0]["results"][1, kind, ()]
        for size in (2, 4):
            got = runs[0]["results"][size, kind, ()]
            diff = _lowrank(one["U"], one["S"], one["Vh"]) - _lowrank(got["U"], got["S"], got["Vh"])
            assert diff.norm() <= TOL * _matrix().norm(), (kind, size)


def test_error_is_the_optimal_rank_k_error(runs):
    """Independent of the reference: on 4 ranks, ‖A − U·S·Vh‖ is Eckart–Young's optimal
    rank-K error (the tail of torch.linalg.svdvals) and S its leading singular values."""
    A = _matrix().double()
    exact = torch.linalg.svdvals(A)
    for kind in PLACEMENTS:
        got = runs[0]["results"][4, kind, ()]
        err = float((A - _lowrank(got["U"], got["S"], got["Vh"]).double()).norm())
        tail = float(exact[K:].square().sum().sqrt())
        assert tail <= err * (1 + TOL) and err <= tail * (1 + TOL), (kind, err, tail)
        assert (got["S"].double() - exact[:K]).abs().max() <= TOL * exact[0], kind


def test_placements_and_shard_shapes(runs):
    from torch.distributed.tensor import Replicate, Shard

    want = {"rows": (Shard(0), Replicate(), Replicate()), "cols": (Replicate(), Replicate(), Shard(1)),
            "replicate": (Replicate(), Replicate(), Replicate())}
    for kind in PLACEMENTS:
        got = runs[0]["results"][4, kind, ()]["placements"]
        assert tuple(p[0] for p in got) == want[kind]
    # Uneven rows 4, 4, 4, 1, every one fewer than the sketch width l = 7.
    assert [runs[r]["results"][4, "rows", ()]["local_rows"] for r in range(4)] == [4, 4, 4, 1]


def test_one_gram_allreduce_per_orthonormalisation(runs):
    """n_iter = 2: the sketch's basis, one per iteration's range pass, and CholeskyQR2's
    two passes on the final basis (n_iter + 2 Grams of l×l float64), plus one [n, l] sum
    per transposed product (n_iter + 1); nothing for Replicate."""
    l = K + OVERSAMPLE
    for batch in ((), (2,)):
        for kind, n in (("rows", N), ("cols", M)):
            calls = runs[1]["results"][4, kind, batch]["calls"]
            b = batch[0] if batch else 1
            grams = [c for c in calls if c[0] == (b, l, l)]
            sums = [c for c in calls if c[0] == (b, n, l)]
            assert len(grams) == 4 and all(c[1] == torch.float64 for c in grams), calls
            assert len(sums) == 3 and len(calls) == 7, calls
            assert sum(c[2] for c in calls) == allreduce_bytes(2 if batch else 1, n, l, 2)
        assert runs[1]["results"][4, "replicate", batch]["calls"] == []


def test_16bit_input_is_factored_in_float32(runs):
    U, S, Vh = runs[0]["bf16"]
    A = _matrix().bfloat16().float()
    Ur, Sr, Vr = reference_rsvd(A, K, oversample=OVERSAMPLE, seed=SEED, sketch_dtype=torch.float32)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert (_lowrank(U, S, Vh) - _lowrank(Ur, Sr, Vr)).norm() <= TOL * A.norm()


def test_svdkernels_rsvd_routes_a_dtensor(runs):
    for r in range(4):
        assert runs[r]["via_rsvd"] == ("DTensor", "DTensor", "DTensor", True)


def test_seed_none_agrees_on_every_rank(runs):
    for r in (1, 2, 3):
        assert torch.equal(runs[r]["seedless_S"], runs[0]["seedless_S"])


def test_bad_input_names_it_on_every_rank(runs):
    want = {"mesh2d": ["ValueError", "A", "1-D", "2-D"], "partial": ["ValueError", "A", "Partial(sum)", "Shard(-2)"],
            "batch_shard": ["ValueError", "Shard(dim=0)", "batch"], "rank": ["ValueError", "rank", str(N + 1)],
            "method": ["ValueError", "method", "krylov"],
            "complex": ["TypeError", "A", "complex64"], "nonfinite": ["ValueError", "A", "finite"]}
    for r in range(4):
        for case, words in want.items():
            msg = runs[r]["errors"][case]
            assert msg is not None and all(w in msg for w in words), (r, case, msg)


def test_a_plain_tensor_is_refused():
    assert_raises_naming(lambda: rsvd_sharded(torch.ones(4, 4), 2), TypeError, ["A", "DTensor", "Tensor"])
