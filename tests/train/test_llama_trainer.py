"""The small-Llama workload (svdkernels.testing.llama) and the optimisers inside
transformers.Trainer."""
import pytest
import torch

from svdkernels.testing import llama
from svdkernels.train import GaLoreAdamW, LowRankAdamW, lowrank_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_docstring_corpus_is_fixed_and_split_by_module():
    train, heldout = llama.split_modules("train"), llama.split_modules("heldout")
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(llama.STDLIB_MODULES)
    assert heldout == llama.STDLIB_MODULES[6::7]
    json_docs = llama._module_docstrings("json")
    assert json_docs[0].startswith("JSON (JavaScript Object Notation)")
    split = "heldout" if "json" in heldout else "train"
    texts = llama.docstring_texts(split)
    start = texts.index(json_docs[0])
    assert list(texts[start: start + len(json_docs)]) == json_docs  # in order, whole
    with pytest.raises(ValueError, match="split"):
        llama.docstring_texts("test")


def test_token_blocks():
    blocks = llama.token_blocks("heldout", 32, max_blocks=5)
    assert blocks.shape == (5, 32) and blocks.dtype == torch.long
    tok = llama.tokenizer()
    assert tok.vocab_size == 30522 and int(blocks.max()) < 30522
    assert torch.equal(blocks, llama.token_blocks("heldout", 32, max_blocks=5))
    with pytest.raises(ValueError, match="seq_len"):
        llama.token_blocks("train", 1)


def test_small_llama_is_the_20m_model():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = llama.small_llama()
    n = sum(p.numel() for p in model.parameters())
    assert 18e6 < n < 21e6, n
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (256, 688, 4, 4)
    groups = lowrank_param_groups(model, llama.LLAMA_TARGETS, rank=64)
    assert len(groups[0]["params"]) == 28  # q, k, v, o, gate, up, down in 4 layers


def test_a_few_trainer_steps():
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    model = llama.small_llama(hidden=32, intermediate=64, layers=1, heads=2)
    blocks = llama.token_blocks("train", 16, max_blocks=8)

    class Blocks(Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    opt = GaLoreAdamW(lowrank_param_groups(model, llama.LLAMA_TARGETS, rank=4, update_gap=2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    args = transformers.TrainingArguments(output_dir="/tmp/svdkernels-trainer-test", max_steps=3,
                                          per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Blocks(), optimizers=(opt, sched))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      LowRankAdamW)
    state = opt.state[model.model.layers[0].mlp.up_proj.weight]
    assert state["step"] == 3 and state["refreshes"] == 2  # refreshed at steps 0 and 2
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 / 4)
