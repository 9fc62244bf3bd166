"""Regressions found by tests/fuzz/test_fuzz_train.py in Int8Linear, FedSVD and BA-LoRA
(each raised a bare torch error, or none, before its fix)."""
import math

import pytest
import torch
from torch import nn

import svdkernels
from svdkernels.testing.errors import assert_raises_naming
from svdkernels.train import FedSVD, Int8Linear, balora_loss, fedsvd_aggregate, svd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args, exc, words", [
    ((1.5, 3), ValueError, ["in_features", "int >= 1", "1.5"]),  # was zeros()'s TypeError
    ((4, 0), ValueError, ["out_features", "int >= 1", "0"]),
    ((4, -2), ValueError, ["out_features", "-2"]),  # was a RuntimeError from torch.zeros
    ((True, 3), ValueError, ["in_features", "True"]),
    ((4, 3, "yes"), TypeError, ["bias", "bool", "str"]),
])
def test_int8_linear_checks_its_arguments(args, exc, words):
    assert_raises_naming(lambda: Int8Linear(*args), exc, words)


@pytest.mark.parametrize("x, words", [
    (torch.randn(2, 5), ["x", "[..., 4]", "[2, 5]"]),  # was "mat1 and mat2 shapes cannot be multiplied"
    (torch.ones(2, 4, dtype=torch.int32), ["x", "floating-point", "torch.int32"]),
])
def test_int8_linear_forward_checks_x(x, words):
    layer = Int8Linear.from_linear(nn.Linear(4, 3))
    assert_raises_naming(lambda: layer(x), ValueError, words)
    assert layer(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("where", ["A", "B"])
def test_fedsvd_aggregate_names_a_non_finite_factor(where):
    A, Bs = torch.randn(2, 5), [torch.randn(4, 2), torch.randn(4, 2)]
    if where == "A":
        A[0, 1] = math.nan
    else:
        Bs[1][2, 0] = math.inf
    name = "A" if where == "A" else "B_clients[1]"  # was linalg.svd's LinAlgError
    assert_raises_naming(lambda: fedsvd_aggregate(Bs, A), ValueError, [name, "finite", "NaN or inf"])


def fed_model():
    torch.manual_seed(0)
    return svdkernels.adapt(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), "lora", rank=2)


def clients():
    return [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]


def test_fedsvd_a_diverging_client_names_lr_and_leaves_the_model():
    fed = FedSVD(fed_model(), clients(), local_steps=1, batch_size=4, lr=1e300)
    before = {k: v.clone() for k, v in fed.global_state().items()}
    # was LinAlgError from the server's SVD of the NaN factors
    assert_raises_naming(lambda: fed.fit(1), ValueError, ["lr", "diverged", "1e+300"])
    assert all(torch.equal(before[k], v) for k, v in fed.global_state().items())
    assert fed.rounds_done == 0


def test_fedsvd_aggregate_refuses_non_finite_updates():
    fed = FedSVD(fed_model(), clients(), local_steps=1, batch_size=4)
    updates = [fed.client_update(k) for k in range(2)]
    updates[1]["0.lora_B"][0, 0] = math.nan
    assert_raises_naming(lambda: fed.aggregate(updates), ValueError, ["updates[1]", "0.lora_B", "NaN or inf"])


def test_fedsvd_refuses_non_finite_client_data():
    data = clients()
    data[1][0][0, 0] = math.nan
    assert_raises_naming(lambda: FedSVD(fed_model(), data), ValueError, ["clients[1]", "finite", "NaN or inf"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_svd_loss_in_half_precision_on_cpu(dtype):
    """Was NotImplementedError ("linalg_svd_cpu" not implemented for 'BFloat16'); the
    value equals the float32 loss of the same (rounded) logits, and it backpropagates."""
    logits = torch.randn(2, 4, 6).to(dtype).requires_grad_()
    got = svd_loss(logits, 3, route="exact")
    want = svd_loss(logits.detach().float(), 3, route="exact")
    assert got.dtype == dtype
    assert abs(float(got) - float(want)) <= 1e-2 * abs(float(want))
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
    assert torch.isfinite(balora_loss(logits.detach(), torch.randn(2, 4, 6).to(dtype), top_k=3).float())


@pytest.mark.parametrize("start_rank, every", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_rank_decay_finishes_at_total_steps(start_rank, every):
    """start_rank=1 claimed total_steps = every, but its Φ fades for another ``every``
    steps (the fuzz found it unfinished); now exact for every start rank."""
    from svdkernels.train import RankDecay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU())
    rd = RankDecay(model, start_rank, every)
    for _ in range(rd.total_steps):
        assert not rd.finished
        rd.step()
    assert rd.finished


def nan_model(width=64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
    return model


def test_lost_init_names_a_non_finite_weight():
    from svdkernels.train import lost_init

    model = nan_model(6)
    # was LinAlgError from the batched SVD
    assert_raises_naming(lambda: lost_init(model, 2, 1), ValueError, ["model", "finite", "0.weight"])
    assert isinstance(model[0], nn.Linear)  # nothing replaced


def test_rank_decay_names_a_non_finite_weight():
    from svdkernels.train import RankDecay

    # was "W: expected finite values" from quantize_weight (an argument RankDecay has not)
    assert_raises_naming(lambda: RankDecay(nan_model(), 2, 1), ValueError, ["model", "finite", "0.weight"])


def test_orthogonal_subspace_names_a_non_finite_weight_and_a_bad_calibration_batch():
    from svdkernels.train import OrthogonalSubspace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(4, 6)
    osf = OrthogonalSubspace(model)
    osf.begin_task([x])
    osf.end_task()
    # was RuntimeError "mat1 and mat2 shapes cannot be multiplied" / linear()'s TypeError
    for bad in ([torch.randn(4, 99)], [None]):
        assert_raises_naming(lambda: osf.begin_task(bad), ValueError, ["calib_batches", "inputs the model accepts"])
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    # was LinAlgError from the SVD of the weights
    assert_raises_naming(lambda: osf.begin_task([x]), ValueError, ["model", "finite", "0.weight"])


@pytest.mark.parametrize("weights", [3, "ab"])
def test_fedsvd_aggregate_weights_must_be_a_list(weights):
    # was "object of type 'int' has no len()"; a string was read as per-client characters
    assert_raises_naming(lambda: fedsvd_aggregate([torch.randn(4, 2)] * 2, torch.randn(2, 5), weights=weights),
                         TypeError, ["weights", "list of numbers"])


def test_svd_loss_of_non_finite_logits_is_nan_not_a_linalg_error():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    bad = logits.detach().clone()
    bad[1, 0, 0] = math.nan
    loss = svd_loss(bad, 3, route="exact")  # was LinAlgError from svdvals
    assert torch.isnan(loss)
    # The finite matrices' terms are unchanged: batch element 0 alone equals its own loss.
    from svdkernels.train.balora import _top_values

    top, S = _top_values(bad, 3, "exact", 0)
    assert torch.isfinite(S[0]).all() and torch.isnan(S[1]).all()
    assert torch.allclose(S[0], torch.linalg.svdvals(bad[0]))
    good = svd_loss(logits, 3, route="exact")
    good.backward()
    assert torch.isfinite(logits.grad).all()


def test_orthogonal_subspace_load_state_dict_checks_everything_first():
    from svdkernels.train import OrthogonalSubspace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    osf = OrthogonalSubspace(model, importance="uniform")
    for _ in range(2):
        osf.begin_task()
        osf.end_task()
    good = osf.state_dict()
    before = {k: v.clone() for k, v in good.items()}
    nan = {k: v.clone() for k, v in good.items()}
    nan["2.V"][0, 0] = math.nan  # the last layer: the first one used to be loaded before the error
    assert_raises_naming(lambda: osf.load_state_dict(nan), ValueError, ["state", "finite", "2.U and 2.V"])
    assert_raises_naming(lambda: osf.load_state_dict(3), TypeError, ["state", "dict", "int"])  # was "not iterable"
    assert_raises_naming(lambda: osf.load_state_dict({**good, "0.U": None}), TypeError,
                         ["state", "floating-point", "NoneType"])  # was AttributeError
    assert all(torch.equal(before[k], v) for k, v in osf.state_dict().items())
    osf.load_state_dict(good)


@pytest.mark.parametrize("field, value", [("decayed_at", "x"), ("decayed_at", 99), ("steps", -1), ("rank", 99)])
def test_rank_decay_load_checks_the_schedule(tmp_path, field, value):
    """Was accepted; the next step() failed with a bare TypeError or ran an impossible schedule."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from svdkernels.errors import FormatError
    from svdkernels.train import RankDecay

    torch.manual_seed(0)
    rd = RankDecay(nn.Sequential(nn.Linear(64, 4), nn.ReLU()), 4, 2)
    rd.step()
    rd.step()
    path = tmp_path / "rd.safetensors"
    rd.save(path)
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sched = json.loads(meta["schedule"])
    sched[field] = value
    save_file(state, str(path), metadata={**meta, "schedule": json.dumps(sched)})
    twin = RankDecay(nn.Sequential(nn.Linear(64, 4), nn.ReLU()), 4, 2)
    assert_raises_naming(lambda: twin.load(path), FormatError, ["malformed schedule", field])


def test_balora_weight_beyond_the_logits_dtype_is_refused():
    """consistency=1e300 with identical logits (KL = 0) returned NaN (inf·0 in float32)."""
    logits = torch.randn(2, 1, 1)
    assert_raises_naming(lambda: balora_loss(logits, logits, consistency=1e300, top_k=1), ValueError,
                         ["consistency", "representable", "torch.float32", "1e+300"])
    assert_raises_naming(lambda: balora_loss(logits.half(), logits.half(), svd=1e5, top_k=1), ValueError,
                         ["svd", "float16"])
    assert torch.isfinite(balora_loss(logits.double(), logits.double(), consistency=1e300, top_k=1))
