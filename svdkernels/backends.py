"""Backend selection shared by every op.

An op runs on one of these backends (plain functions with the op's signature):

- ``reference``: pure PyTorch (``svdkernels/reference``), any device, always present;
- ``triton``: Triton kernels (``svdkernels/triton``), CUDA tensors, or CPU tensors
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported);
- ``cpp``: the optional C++ extension ``svdkernels._C`` (CPU), when it is built.

Default: CUDA tensors use ``triton``; CPU tensors use ``cpp`` when the op has a C++
kernel and the extension is built, else ``reference``. The default is overridden,
in this order of precedence, by :func:`use_backend` (a context manager) and by the
environment variable ``SVDKERNELS_BACKEND``. Nothing here probes hardware at
import time: the choice is made per call from the tensor's device.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import os
from collections.abc import Iterator
from typing import Optional

import torch

BACKENDS = ("reference", "triton", "cpp")
ENV_VAR = "SVDKERNELS_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "svdkernels_backend", default=None
)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every svdkernels op inside the block on backend ``name``.

    Example::

        with svdkernels.use_backend("reference"):
            U, S, Vh = svdkernels.rsvd(A, 16)
    """
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``SVDKERNELS_BACKEND``, if any."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"environment variable {ENV_VAR}") if env else None


@functools.cache  # asked on every op call: the answer does not change within a process
def triton_available() -> bool:
    """True when the triton package can be imported (it is never imported at import time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache  # as triton_available
def cpp_available() -> bool:
    """True when the optional C++ extension ``svdkernels._C`` is built."""
    try:
        from svdkernels import _C  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(
    op: str,
    device: torch.device,
    *,
    has_cpp: bool = False,
    dtype: Optional[torch.dtype] = None,
    triton_dtypes: Optional[tuple[torch.dtype, ...]] = None,
) -> str:
    """The backend op ``op`` runs on for tensors on ``device``: the one place that decides.

    ``triton_dtypes``: the dtypes the family's Triton kernels support; a call with
    another ``dtype`` (float64, say) runs on the reference by default. Raises
    ``RuntimeError`` when a forced backend cannot run the call (for example
    ``triton`` for CPU tensors without the interpreter, or for an unsupported dtype),
    rather than silently falling back to another one.
    """
    triton_ok = triton_dtypes is None or dtype is None or dtype in triton_dtypes
    name = requested_backend()
    if name is None:
        if device.type == "cuda" and triton_ok and triton_available():
            return "triton"
        if device.type == "cpu" and has_cpp and cpp_available():
            return "cpp"
        return "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                f"before triton is imported to run on {device.type}"
            )
        if not triton_ok:
            names = ", ".join(str(d).removeprefix("torch.") for d in triton_dtypes or ())
            raise RuntimeError(f"{op}: the triton backend supports {names}, got {dtype}")
    if name == "cpp" and not (has_cpp and cpp_available()):
        raise RuntimeError(f"{op}: backend 'cpp' requested but {op} has no built C++ kernel")
    return name


def traced_triton(op: str, device: torch.device, **kwargs: object) -> bool:
    """Whether a call of ``op`` on ``device`` runs compiled Triton kernels, whose launches
    (``torch.library.wrap_triton``) torch.compile can trace. The interpreter's kernels
    are plain Python that reads tensor memory, so they run inside the op's opaque
    dispatch op instead. ``kwargs`` go to :func:`select_backend`."""
    return select_backend(op, device, **kwargs) == "triton" and not triton_interpreted()
