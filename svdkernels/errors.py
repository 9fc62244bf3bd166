"""The library's own error type and the argument checks shared by its layers.

Every bad input raises a ``ValueError`` or ``TypeError`` whose message starts with
the argument's name, then what was expected and what was given. Files are the one
exception to "name the argument": a file that does not follow its format raises
:class:`FormatError` (a ``ValueError``), whose message names the ``path`` argument,
the file and what was wrong with it.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["FormatError", "check_finite_number", "check_kwargs", "strict_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])


class FormatError(ValueError):
    """A file that a loader was given does not follow its format.

    Raised by :func:`svdkernels.adapters.load_adapter`,
    :func:`svdkernels.adapters.load_lokr` and :func:`svdkernels.quant.load_quantized`
    for a truncated or non-safetensors file, malformed JSON, a missing or unknown
    metadata key, a missing, extra, wrong-shaped, wrong-dtype or non-finite tensor,
    or metadata of the wrong type or out of range. The model is left untouched:
    every loader checks the whole file before it changes anything.

    Attributes:
        path: the file (or adapter directory) that was read.
        problem: what was wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"path: {self.path!r} is not a valid file: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (pytest-xdist, multiprocessing)
        return (type(self), (self.path, self.problem))


def check_kwargs(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """``TypeError`` for the first name in ``given`` that is not in ``valid``, naming
    the closest valid one (a typo such as ``gama`` for ``gamma`` must not be ignored).

    ``where`` is the function or method the arguments were passed to."""
    valid = sorted(set(valid))
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{name}: unexpected keyword argument to {where} (expected one of {valid}){hint}")


def strict_kwargs(fn: F) -> F:
    """Decorator: an unknown keyword argument to ``fn`` raises :func:`check_kwargs`'s
    ``TypeError`` (naming the nearest valid one) instead of Python's bare one."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise TypeError(f"strict_kwargs: {fn.__qualname__} takes **kwargs; check them with check_kwargs instead")
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in ("self", "cls")]
    known = frozenset(names)
    where = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not known.issuperset(kwargs):
            check_kwargs(kwargs, names, where)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def all_finite(t: Any) -> bool:
    """Whether every entry of the tensor ``t`` is finite (NaN and inf are not).

    A finite float64 sum proves it in one read-only pass with one host sync and no
    temporary; only a non-finite sum (which huge finite entries can also give) needs
    the entrywise check. Shared by the layers' checks of weights before an SVD.
    """
    import torch  # on use: importing svdkernels.errors stays free of torch

    return bool(torch.isfinite(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


def check_finite_number(name: str, value: object, *, low: float | None = None, low_inclusive: bool = True,
                        high: float | None = None, allow_none: bool = False) -> float | None:
    """``float(value)`` if ``value`` is a finite real number (not a bool) in the given
    range; else ``TypeError`` (not a number) or ``ValueError`` (NaN, inf or out of
    range) naming ``name``, the expected and the given value."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    rng = []
    if low is not None:
        rng.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        rng.append(f"<= {high:g}")
    want = "a finite number" + (" " + " and ".join(rng) if rng else "")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return v
