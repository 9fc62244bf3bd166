"""Fine-tuning all-MiniLM-L6-v2 with every adapter method on a small built-in task:
the loss falls and only the declared parameters change."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from svdkernels.adapters import ALL_METHODS, adapt, mark_only_adapter_trainable, regularization_loss  # noqa: E402
from svdkernels.adapters.adalora import AdaLoRABudget  # noqa: E402
from svdkernels.testing.models import minilm_dir  # noqa: E402

# A tiny sentiment task: 12 sentences, labels 1 (positive) / 0 (negative).
SENTENCES = [
    ("The film was a delight from start to finish.", 1), ("I loved every minute of the concert.", 1),
    ("What a wonderful, generous host she was.", 1), ("The food was fresh and the staff were kind.", 1),
    ("This is the best book I have read this year.", 1), ("The new update made everything faster.", 1),
    ("The plot was dull and the acting was worse.", 0), ("I regret buying this broken blender.", 0),
    ("The service was rude and painfully slow.", 0), ("It rained all week and the hotel was dirty.", 0),
    ("The update crashed my phone twice today.", 0), ("A boring lecture that went on for hours.", 0),
]
STEPS = 20
LR = {"svfit": 1e-1, "clip_svd": 3e-2, "salt": 3e-2,  # only (some) singular values train, and SALT's small update
      "adalora": 1e-2}  # E starts at 0: the branch needs a few steps to open


@pytest.fixture(scope="module")
def task():
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tok([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    return batch, labels


def _model():
    torch.manual_seed(0)
    return transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()  # eval: no dropout noise


def _loss(model, head, batch, labels):
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.cross_entropy(head(pooled), labels)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_finetuning_lowers_the_loss_and_touches_only_the_adapter(method, task):
    batch, labels = task
    model = _model()
    calib = [batch] if method in ("corda", "eva") else None
    adapt(model, method, rank=8, targets=["query", "value"], calib_batches=calib, seed=0)
    mark_only_adapter_trainable(model)
    head = torch.nn.Linear(384, 2)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.weight, std=0.5)
    head.requires_grad_(False)  # a fixed random head: every improvement comes from the adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.Adam(params, lr=LR.get(method, 3e-3))
    budget = AdaLoRABudget(model, target_rank=4, total_steps=STEPS, tinit=5, tfinal=5) if method == "adalora" else None
    losses = []
    for step in range(1, STEPS + 1):
        loss = _loss(model, head, batch, labels)
        losses.append(loss.item())
        (loss + regularization_loss(model)).backward()
        opt.step()
        if budget is not None:
            budget.step(step)
        opt.zero_grad()
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], (method, losses[0], losses[-5:])
    modules = dict(model.named_modules())
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if not p.requires_grad:
            assert not changed, n
        elif not changed:  # only AdaLoRA may prune a layer's whole E back to its initial zeros
            assert method == "adalora" and n.endswith("lora_E"), n
            assert not modules[n.rpartition(".")[0]].rank_mask.any(), n
