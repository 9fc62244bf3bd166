"""torch.compile sees the Triton kernels: the ops are ``torch.library.triton_op``s, so
AOTAutograd (what torch.compile runs before Inductor) decomposes a CUDA call into
its kernel launches instead of keeping an opaque op.

No GPU is needed to show it: a child Python without ``TRITON_INTERPRET`` (real
``JITFunction`` kernels) traces each op with ``aot_function`` on fake CUDA tensors
and prints the forward graph; running the graph would need CUDA, tracing does not.
The graph must contain ``triton_kernel_wrapper_functional`` and no call of the op
itself or of its opaque dispatch op. CPU calls keep the opaque dispatch op (their
backends are the reference or C++, which Inductor could not improve on).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = r'''
import json, sys
import torch
import svdkernels
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

device = sys.argv[1]
graphs = {}
mode = FakeTensorMode(allow_non_fake_inputs=True)

def trace(name, fn, make_args):
    codes = []
    def capture(gm, _inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)
    with mode:
        args = make_args()
    try:
        with mode:
            aot_function(fn, fw_compiler=capture)(*args)
    except Exception as e:  # running the captured graph needs CUDA; the graph is the point
        if not codes:
            raise
    graphs[name] = codes[0]

def t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=device)

ops = torch.ops.svdkernels
K, N, r, M = 128, 64, 16, 8
trace("lowrank_w4a16_linear",
      lambda x, qw, s, ld, lu, b: ops.lowrank_w4a16_linear(x, qw, s, ld, lu, b),
      lambda: (t(M, K, dtype=torch.bfloat16), t(N, K // 2, dtype=torch.uint8), t(N, K // 64, dtype=torch.bfloat16),
               t(r, K, dtype=torch.bfloat16), t(N, r, dtype=torch.bfloat16), t(N, dtype=torch.bfloat16)))
trace("lowrank_quantize_act",
      lambda x, sm, ld: ops.lowrank_quantize_act(x, sm, ld, False),
      lambda: (t(M, K, dtype=torch.bfloat16), t(K), t(r, K, dtype=torch.bfloat16)))
trace("lowrank_w4a4_gemm",
      lambda xq, xs, qw, s, la, lu, b: ops.lowrank_w4a4_gemm(xq, xs, qw, s, la, lu, b, False),
      lambda: (t(M, K // 2, dtype=torch.uint8), t(M, K // 64), t(N, K // 2, dtype=torch.uint8),
               t(N, K // 64, dtype=torch.bfloat16), t(M, r), t(N, r, dtype=torch.bfloat16), t(N, dtype=torch.bfloat16)))
trace("kron_linear",
      lambda x, A, B: ops.kron_linear(x, [A], [B], 0.5),
      lambda: (t(M, 8 * 16), t(4, 6, 8), t(4, 10, 16)))
trace("lowrank_attention",
      lambda q, ck, cv, wk, wv: ops.lowrank_attention(q, ck, cv, wk, wv, None, True, 0.125, False, 1e4, 1.0, 0, 64)[0],
      lambda: (t(1, 4, 1, 64), t(1, 32, 16), t(1, 32, 16), t(1, 16, 4 * 64), t(1, 16, 4 * 64)))
def adam_step(W, G, P, m, v):
    W, m, v = W.clone(), m.clone(), v.clone()  # a compiled step mutates its own buffers
    ops.lowrank_adam_step(W, G, P, None, None, m, v, True, 0.9, 0.999, 1e-8, 1e-3, 0.0, None)
    return W, m, v
trace("lowrank_adam_step", adam_step,
      lambda: (t(64, 128), t(64, 128), t(r, 128), t(64, r), t(64, r)))
print(json.dumps(graphs))
'''

OPS = ["lowrank_w4a16_linear", "lowrank_quantize_act", "lowrank_w4a4_gemm", "kron_linear", "lowrank_attention",
       "lowrank_adam_step"]


def traced_graphs(device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHILD, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cuda_graphs() -> dict[str, str]:
    return traced_graphs("cuda")


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_contains_the_kernel_launch(cuda_graphs, op):
    code = cuda_graphs[op]
    assert "triton_kernel_wrapper_functional" in code, code
    assert f"svdkernels.{op}" not in code and f"_{op}_dispatch" not in code, code


def test_cpu_graph_keeps_the_opaque_dispatch_op():
    graphs = traced_graphs("cpu")
    for op in OPS:
        assert "triton_kernel_wrapper" not in graphs[op], graphs[op]
        assert f"svdkernels._{op}_dispatch" in graphs[op], graphs[op]
