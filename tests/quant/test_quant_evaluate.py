"""svdkernels.quant.evaluate.sqnr_hooks (per-layer SQNR while the float model runs
for another purpose) and the bench's MiniLM evaluation that uses it: the float model
run once gives exactly the cosine and SQNR of running it twice."""
import copy

import pytest
import torch
from torch import nn

from svdkernels.quant import layer_sqnr, quantize_model_rtn
from svdkernels.quant.evaluate import sqnr_hooks
from svdkernels.testing.errors import assert_raises_naming

D = 128


class MLP(nn.Module):
    """fc1 -> GELU -> fc2 -> head, and a layer never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)
        self.head, self.unused = nn.Linear(D, 64), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))))


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, D, generator=g) for _ in range(n)]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sqnr_hooks_match_layer_sqnr_and_return_outputs():
    base, model = make_model(), quantize_model_rtn(make_model(), acts="int4")
    test = batches(2, seed=5)
    with torch.no_grad(), sqnr_hooks(base, model) as db:
        outs = [base(x) for x in test]
        assert db == {}  # filled on exit
    assert no_hooks(base)
    assert db == layer_sqnr(base, model, test)  # the same sums, bit for bit
    with torch.no_grad():
        assert all(torch.equal(o, base(x)) for o, x in zip(outs, test))  # the hooks change no output


def test_sqnr_hooks_accumulate_over_runs_and_skip_unused_layers():
    base, model = make_model(), quantize_model_rtn(make_model(), acts="int4")
    test = batches(3, seed=6)
    with torch.no_grad(), sqnr_hooks(base, model) as db:
        base(test[0])
        base(torch.cat(test[1:]))
    assert db == pytest.approx(layer_sqnr(base, model, test), rel=1e-6)  # float32 sums, other batching
    assert "unused" not in db and {"fc1", "fc2", "head"} <= set(db)


def test_sqnr_hooks_errors():
    assert_raises_naming(lambda: sqnr_hooks(make_model(), make_model()).__enter__(), ValueError, ["quantized"])
    base, model = make_model(), quantize_model_rtn(make_model(), acts="int4")
    with pytest.raises(RuntimeError, match="boom"):
        with sqnr_hooks(base, model):
            raise RuntimeError("boom")
    assert no_hooks(base)  # removed on an exception too


def test_minilm_evaluation_once_equals_twice():
    # The bench's evaluation (the float model once) against the one it replaced
    # (twice): the same cosine and per-layer SQNR exactly, W4A4 layers on MiniLM.
    from svdkernels.bench import quantize_model as qm
    from svdkernels.testing.models import minilm_model

    base, tokenizer = minilm_model()
    model = quantize_model_rtn(copy.deepcopy(base), acts="int4", targets=r"encoder\.layer\.[01]\..*")
    evals = qm.sentence_batches(tokenizer, qm.EVAL_SENTENCES[:2])
    cos, sqnr = qm.evaluate(base, model, evals)
    cos2, sqnr2 = qm.evaluate_twice(base, model, evals)
    assert torch.equal(cos, cos2) and sqnr == sqnr2
    assert len(sqnr) == 12 and 0.5 < float(cos.min()) < 1
    assert no_hooks(base)
