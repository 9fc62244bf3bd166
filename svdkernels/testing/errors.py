"""The bad-input check every op's tests share."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def assert_raises_naming(call: Callable[[], object], exc: type[Exception], words: Sequence[str]) -> None:
    """``call()`` raises ``exc`` and its message contains every one of ``words``
    (the argument's name, what was expected, what was given)."""
    import pytest  # imported on use: importing svdkernels.testing never needs pytest

    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
