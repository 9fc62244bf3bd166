"""The oracle and the strategies the fuzz suite shares (issue 12, "nothing silent").

Every fuzz case ends in one of two acceptable ways:

- a result: every tensor in it is finite when every input was finite (unless the
  exact result itself leaves the dtype's range, which the test's reference decides),
  and, where the test has a reference, equal to it within the dtype's tolerance;
- a ``ValueError`` or ``TypeError`` whose message starts with the name of an argument
  of the entry point (``"rank: expected ..."``, ``"keys[2]: ..."``, ``"a_shape,
  b_shape: ..."``; :class:`svdkernels.errors.FormatError` starts with ``"path:"``).

Anything else — another exception type, an error that names no argument, a NaN
out of finite inputs — fails the case. :data:`COUNTS` counts the cases run per entry
point; ``tests/fuzz/conftest.py`` prints the counts at the end of the run.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

COUNTS: Counter[str] = Counter()
"""Fuzz cases run, per entry point (printed by the conftest's terminal summary)."""

RESULTS: Counter[str] = Counter()
"""Of those, the cases that returned a result (the rest raised a named error)."""

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure reproduces, CI never flakes
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
"""Base settings; each test takes its own small ``max_examples`` through :func:`fuzz`."""


def fuzz(max_examples: int) -> settings:
    """:data:`FUZZ` with ``max_examples`` cases (the whole suite's budget is two minutes)."""
    return settings(FUZZ, max_examples=max_examples)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_DTYPES = (torch.float64, torch.int32, torch.uint8, torch.bool, torch.complex64)

# "name: ...", "name[3]: ...", "a_shape, b_shape: ...", "rope.theta: ...", "calib_batches: ..."
_ARG = re.compile(r"^(?P<names>[A-Za-z_][\w.]*(?:\[[^\]]*\])?(?:, ?[A-Za-z_][\w.]*(?:\[[^\]]*\])?)*):\s")


def named_arguments(message: str) -> Optional[set[str]]:
    """The argument names a library error message starts with, or ``None``
    (``"use_backend(name): ..."`` names ``name``)."""
    call = re.match(r"^[A-Za-z_][\w.]*\((?P<arg>[A-Za-z_]\w*)\):\s", message)
    if call:
        return {call["arg"]}
    m = _ARG.match(message)
    if m is None:
        return None
    return {re.sub(r"\[.*\]$", "", n.strip()).split(".")[0] for n in m["names"].split(",")}


def tensors_in(out: Any) -> Iterable[torch.Tensor]:
    """Every tensor in a (nested) result."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from tensors_in(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from tensors_in(o)
    elif hasattr(out, "__dataclass_fields__"):
        for name in out.__dataclass_fields__:
            yield from tensors_in(getattr(out, name))
    elif isinstance(out, torch.nn.Module):
        yield from (t.detach() for t in out.parameters())
        yield from out.buffers()


def all_finite(out: Any) -> bool:
    """Every tensor with data in ``out`` is finite (meta tensors have none to check)."""
    return all(t.device.type == "meta" or not (t.is_floating_point() or t.is_complex())
               or bool(torch.isfinite(t).all()) for t in tensors_in(out))


class Outcome:
    """What one call did: ``value`` (its result) or ``error`` (the ValueError/TypeError)."""

    def __init__(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.value, self.error = value, error

    @property
    def ok(self) -> bool:
        return self.error is None


def run_case(entry: str, call: Callable[[], Any], args: Iterable[str], *, finite_input: bool,
             overflow_ok: bool = False) -> Outcome:
    """Run one fuzz case of ``entry`` and check the oracle of the module docstring.

    ``args``: the names an error message may start with (the entry point's
    arguments). ``finite_input``: every input value was finite, so the result must
    be too, unless ``overflow_ok`` (the test's reference showed the exact result
    leaves the dtype's range)."""
    COUNTS[entry] += 1
    args = set(args)
    try:
        value = call()
    except (ValueError, TypeError) as e:
        names = named_arguments(str(e))
        assert names is not None, f"{entry}: {type(e).__name__} that names no argument: {e}"
        assert names <= args, f"{entry}: {type(e).__name__} names {sorted(names - args)}, not among {sorted(args)}: {e}"
        return Outcome(error=e)
    except Exception as e:  # noqa: BLE001 - the point is to catch every other type
        raise AssertionError(f"{entry}: raised {type(e).__name__} (expected a result, ValueError or TypeError): "
                             f"{e}") from e
    if finite_input and not overflow_ok:
        assert all_finite(value), f"{entry}: a non-finite result from finite inputs"
    RESULTS[entry] += 1
    return Outcome(value=value)


# ---------------------------------------------------------------------------
# Strategies

SPECIAL = (math.nan, math.inf, -math.inf)
MAGNITUDES = (1.0, 1.0, 1.0, 1e-30, 1e30, 1e-5, 1e5)


@st.composite
def values(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *,
           magnitudes: tuple[float, ...] = MAGNITUDES, special: bool = True,
           device: str = "cpu") -> tuple[torch.Tensor, bool]:
    """``(tensor, finite)``: Gaussian entries times a drawn magnitude, sometimes with a
    NaN or an infinity at a drawn position, sometimes with non-contiguous strides;
    ``finite`` says whether every entry is finite."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mag = draw(st.sampled_from(magnitudes))
    if dtype == torch.float16:
        mag = min(mag, 1e3)  # finite magnitudes stay finite: 1e30 is not a float16
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * mag
    finite = True
    if special and t.numel() and draw(st.integers(0, 4)) == 0:
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
        finite = False
    if dtype.is_floating_point or dtype.is_complex:
        t = t.to(dtype)
        finite = finite and bool(torch.isfinite(t).all())  # a magnitude can overflow fp16
    else:
        t = t.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major strides
    if device == "meta":
        t = t.to("meta")
    return t, finite


def numbers(good: st.SearchStrategy) -> st.SearchStrategy:
    """A hyper-parameter: mostly ``good`` values, else NaN, ±inf, negatives, 0, huge,
    a bool or a string."""
    bad = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300, True, "1", None])
    return st.one_of(good, good, bad)
