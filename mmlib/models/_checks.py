"""Argument checks shared by the network modules (error messages name the owner, the argument and its shape)."""

from __future__ import annotations

import torch

from mmlib.core import positive_int

__all__ = ["dtype_suffix", "positive_ints", "shape_of"]


def shape_of(x: object) -> object:
    """A tensor's shape, or the type name of anything else (for error messages)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def dtype_suffix(x: object) -> str:
    """``" <dtype>"`` of a tensor, empty for anything else (for error messages)."""
    return f" {x.dtype}" if isinstance(x, torch.Tensor) else ""


def positive_ints(owner: str, **values: object) -> tuple[int, ...]:
    """The values as positive ints, or a ValueError naming the first bad one."""
    out = []
    for name, v in values.items():
        n = positive_int(v)
        if n is None:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {v!r}")
        out.append(n)
    return tuple(out)
