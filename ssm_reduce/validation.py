"""Argument checks shared by the public entry points: every integer or real type numpy and torch offer is
accepted where a number is asked, and anything else is refused with the argument's name."""

from __future__ import annotations

import math
import numbers


def integer(name: str, value, minimum: int, meaning: str = "") -> int:
    """``value`` as a Python int >= ``minimum`` (any integral type: int, numpy or 0-d torch integers);
    ``ValueError`` naming ``name`` otherwise. ``meaning`` is said in the error."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")
    return int(value)


def real(name: str, value) -> float:
    """``value`` as a Python float, not NaN (any real type); ``ValueError`` naming ``name`` otherwise."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def boolean(name: str, value) -> bool:
    """``value`` as a Python bool (``True`` / ``False`` or a numpy / 0-d torch bool)."""
    value = _unwrap(value)
    if type(value).__name__ not in ("bool", "bool_"):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _unwrap(value):
    """A 0-d torch tensor as its Python scalar; everything else unchanged."""
    if type(value).__name__ == "Tensor" and getattr(value, "dim", lambda: 1)() == 0:
        return value.item()
    return value
