"""What every Triton kernel module shares (imported only with triton itself): the
interpreter probe, device checks, the SM count, pointer-type names for the compile
check, and the jit helpers every family's inner loops use (``dot_acc``,
``round_mantissa``). No kernel module imports another family's private names."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _probe() -> None:
    pass


def interpreted() -> bool:
    """Whether kernels are built by the Triton interpreter (``TRITON_INTERPRET=1`` when
    triton was imported): ``@triton.jit`` then returns an interpreter function instead
    of a ``JITFunction``. Decides whether CPU tensors are allowed and whether bf16 must
    be emulated (the interpreter mishandles it, triton#11584)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_device(name: str, t: torch.Tensor) -> None:
    """``ValueError`` naming ``name`` unless ``t`` is on CUDA or the interpreter runs."""
    if t.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"{name}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 set "
            f"before triton is imported), got device {t.device}"
        )


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


NOMINAL_SM_COUNT = 132
"""An H100 SXM's SM count: what :func:`sm_count` says where no CUDA device exists."""


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (cached per device index).

    Without a CUDA device a launch is impossible, but tracing with fake CUDA tensors
    (the traced-graph test) still plans one: it gets :data:`NOMINAL_SM_COUNT`."""
    if not torch.cuda.is_available():
        return NOMINAL_SM_COUNT
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


PTR = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16"}
"""Triton signature strings of pointers to each storage dtype (the compile check's cases)."""


@triton.jit
def round_mantissa(x, DROP: tl.constexpr):
    """float32 ``x`` rounded to nearest (ties to even) with its ``DROP`` low mantissa
    bits cleared, kept in float32: DROP=16 gives bfloat16 values, 13 TF32 values."""
    bits = x.to(tl.uint32, bitcast=True)
    half: tl.constexpr = (1 << (DROP - 1)) - 1
    keep: tl.constexpr = 0xFFFFFFFF ^ ((1 << DROP) - 1)
    bits = (bits + (half + ((bits >> DROP) & 1))) & keep
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_acc(a, x, acc, COMPUTE: tl.constexpr, BF16_EMULATED: tl.constexpr, X_IS_TF32: tl.constexpr):
    """``acc + a·x`` with ``a``, ``x`` rounded to ``COMPUTE``, float32 accumulation.

    float32 is 3xTF32: ``a = a_hi + a_lo``, ``x = x_hi + x_lo`` with TF32 ``hi``
    parts, and ``a_lo·x_hi + a_hi·x_lo + a_hi·x_hi`` on the tensor cores, smallest
    first. It is what ``input_precision="tf32x3"`` computes, written out because
    triton's version sums the two small products in a second, zero-initialised
    accumulator, a whole extra BLOCK_M x BLOCK_N float32 tile of registers (on
    sm_80 the w64 matmul then spills at 255 registers and w128 needs 255; written
    out, 185 and 178). ``X_IS_TF32``: ``x`` holds TF32 values already (the sketch's
    Ω), so ``x_lo = 0`` and two products do.
    """
    if BF16_EMULATED:
        # Interpreter only: its tl.dot multiplies bfloat16 bit patterns (triton issue
        # #11584) and its float32->bfloat16 cast truncates where the GPU rounds to
        # nearest even. Round in float32 instead; a product of two bfloat16 values is
        # exact in float32, so an IEEE float32 dot gives what the tensor cores give.
        a = round_mantissa(a.to(tl.float32), 16)
        x = round_mantissa(x.to(tl.float32), 16)
        acc = tl.dot(a, x, acc, input_precision="ieee")
    elif COMPUTE == tl.float32:
        a = a.to(tl.float32)
        x = x.to(tl.float32)
        a_hi = round_mantissa(a, 13)
        if X_IS_TF32:
            acc = tl.dot(a - a_hi, x, acc, input_precision="tf32")  # small term first
        else:
            x_hi = round_mantissa(x, 13)
            acc = tl.dot(a - a_hi, x_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, x - x_hi, acc, input_precision="tf32")
            x = x_hi
        acc = tl.dot(a_hi, x, acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(COMPUTE), x.to(COMPUTE), acc)
    return acc


@dataclass(frozen=True)
class CompileCase:
    """One kernel build to check, as a kernel module's ``compile_cases()`` yields it.

    ``signature`` maps every argument name to a triton type (``"*fp32"``, ``"i32"``,
    ``"constexpr"``...), ``constexprs`` the constexpr ones to values; ``options`` holds
    ``num_warps``, ``num_stages`` and optionally ``maxnreg``. ``divisible_by_16``
    names the arguments the JIT would find multiples of 16 (16-byte aligned
    pointers, strides of aligned rows): the variant a launch with such tensors gets.
    """

    id: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int]
    expects_tensor_cores: bool
    divisible_by_16: tuple[str, ...] = ()
