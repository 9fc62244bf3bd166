"""examples/fsdp_llama.py: a couple of FSDP2 + LowRankAdamW steps of a tiny Llama on 2
gloo processes, through the function its torchrun entry point calls."""
import importlib.util
from pathlib import Path

from svdkernels.testing.distributed import run_distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_llama.py"


def _example(rank, world, argv):
    spec = importlib.util.spec_from_file_location("fsdp_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(rank, world, module.parse_args(argv))


def test_example_trains_on_two_ranks(tmp_path):
    argv = ["--steps", "3", "--batch", "4", "--seq-len", "16", "--hidden", "32", "--intermediate", "64",
            "--layers", "1", "--heads", "2", "--rank", "8", "--update-gap", "2",
            "--checkpoint", str(tmp_path / "ckpt")]
    out = run_distributed(_example, 2, argv, timeout=240)
    assert out[0]["losses"] == out[1]["losses"]  # the all-reduced mean, the same everywhere
    assert len(out[0]["losses"]) == 3 and all(0 < x < 20 for x in out[0]["losses"])
    # Seven projections per layer, each refreshed at steps 0 and 2.
    assert out[0]["refreshes"] == [2] * 7
    assert (tmp_path / "ckpt" / ".metadata").is_file()
