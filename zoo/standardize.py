"""Standardized inputs, the one copy shared by the models and guides that use them.

An encoder (or a model's parametrization) sees each column of ``x: [N, D]`` as
u = (x - shift) / scale_in, with the column means and standard deviations of the training data
kept in two buffers ``shift: [D]`` and ``scale_in: [D]``, so that one learning rate suits tables
in any units. A constant column (or a single row) keeps scale 1. An affine map of u is still an
affine map of x, so a family of guides is unchanged by standardizing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_buffers(module: torch.nn.Module, data_dim: int) -> None:
    """Register ``shift`` = 0 and ``scale_in`` = 1, both ``[D]``, on ``module``."""
    module.register_buffer("shift", torch.zeros(data_dim))
    module.register_buffer("scale_in", torch.ones(data_dim))


@torch.no_grad()
def fit(module: torch.nn.Module, x: Tensor) -> None:
    """Set ``module.shift`` and ``module.scale_in`` to the column means and standard deviations
    of ``x: [N, D]`` (scale 1 where a column is constant or N = 1)."""
    std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
    module.shift.copy_(x.mean(0))
    module.scale_in.copy_(torch.where(std > 0, std, torch.ones_like(std)))


def standardized(module: torch.nn.Module, x: Tensor) -> Tensor:
    """u = (x - shift) / scale_in, the shape of ``x``."""
    return (x - module.shift) / module.scale_in
