"""Generic argument checks that any module of the repository may import (torch-free, no state).

Counts, sizes and seeds are ints that are not bools (``True`` is an ``int`` to Python); options
such as weights and temperatures are reals that are not bools. Kernel-specific checks (shapes,
dtypes, devices of an op's tensors) live in ``triton_kernels.checks``.
"""
from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a count or a seed)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """ValueError naming ``value`` unless it is an int (not a bool) in ``[low, high]``."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
