"""The checks of the Gaussian mixture's options and tables (:mod:`zoo.models.gmm`), shared by
the model, its guides and its start, each refusing bad input in one line that names the
command-line flag to change."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.errors import ZooError

COVARIANCES = ("full", "diag")
PRIORS = ("none", "weak")


def check_options(components: int, covariance: str, prior: str = "none") -> None:
    """Raise :class:`ZooError` unless K >= 1 and the covariance and prior are known."""
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ZooError(f"--components must be a positive integer (the number K of mixture "
                       f"components); got {components!r}")
    if covariance not in COVARIANCES:
        raise ZooError(f"--covariance must be one of: {', '.join(COVARIANCES)}; "
                       f"got {covariance!r}")
    if prior not in PRIORS:
        raise ZooError(f"the gmm option prior must be one of: {', '.join(PRIORS)}; got {prior!r}")


def check_table(x: Tensor, data_dim: int | None = None) -> Tensor:
    """Raise :class:`ZooError` unless ``x`` is a finite table ``[N, D]`` (with D = ``data_dim``
    when given); return it."""
    if not isinstance(x, Tensor):
        raise ZooError(f"GMM data must be a torch tensor of shape [N, D]; got {type(x).__name__}")
    if x.dim() != 2:
        fix = " (for one column use x[:, None])" if x.dim() == 1 else ""
        raise ZooError(f"GMM data must be a table of shape [N, D]; got shape {list(x.shape)}"
                       f"{fix}")
    if data_dim is not None and x.shape[1] != data_dim:
        raise ZooError(f"GMM data must have shape [N, D = {data_dim}] to match the model; got "
                       f"shape {list(x.shape)}")
    return x


def check_training_table(x: Tensor, components: int) -> None:
    """The checks a table must pass to fit K components: finite, K <= N, no constant column."""
    N, _ = check_table(x).shape
    if not torch.isfinite(x).all():
        raise ZooError("the data contain NaN or infinite values; remove or impute them first")
    if components > N:
        raise ZooError(f"--components K = {components} is more than the N = {N} training rows; "
                       f"use at most {N} components (far fewer in practice)")
    constant = (x.std(0) == 0).nonzero().flatten().tolist() if N > 1 else list(range(x.shape[1]))
    if constant:
        columns = ", ".join(str(j) for j in constant)
        raise ZooError(f"column(s) {columns} (0-based) of the data are constant, so every "
                       f"component's variance there collapses to 0 and the likelihood is "
                       f"unbounded; pass --drop-constant to leave them out")
