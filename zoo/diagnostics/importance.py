r"""The guide as an importance proposal for the posterior: Pareto-smoothed importance sampling
(PSIS) and the effective sample size of the log weights log w_s = log p(x, z_s) - log q(z_s | x),
z_s ~ q(z | x), of each data point.

``khat`` is the Pareto shape of the right tail of the weights (PSIS; Vehtari et al. 2024, used
for variational inference by Yao et al. 2018), fitted by ArviZ's ``psislw`` to the largest
min(S/5, 3 sqrt(S)) weights. k-hat < 0.5: the importance-sampling estimate of anything under p
converges fast (q is good); 0.5-0.7: usable; > 0.7: unreliable, q misses mass that p has. With
the exact posterior every weight equals p(x) and there is no tail to fit (ArviZ returns inf);
we report k-hat = -inf there and count the point as exact (``exact``), never as a failure. A
point that is not exact but has fewer than five weights above the tail's cutoff (weights that
take only a few values, or a few weights that dwarf all others) has no tail to fit either: its
k-hat is inf, as in ArviZ. k-hat measures the shape of the tail, not its size: weights that
barely vary (ESS close to S, a nearly exact guide) can still have a large k-hat, so read it
together with the ESS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import arviz as az
import numpy as np
import torch
from torch import Tensor

from zoo.evaluate import effective_sample_size

EQUAL_WEIGHTS_ULPS = 100
"""Log weights that differ by less than this many units in the last place of their magnitude
count as equal: the guide is the exact posterior there."""

KHAT_GOOD, KHAT_USABLE = 0.5, 0.7


def pareto_smooth(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalized log weights ``[S]`` and k-hat for one data point's raw log
    weights ``[S]``: ArviZ's ``psislw`` with relative efficiency 1 (independent draws)."""
    smoothed, khat = az.psislw(np.asarray(log_w, dtype=float))
    return smoothed, float(khat)


@dataclass
class ImportanceDiagnostics:
    """Per data point, ``[N]``: ``khat`` (-inf where every weight is equal), ``exact`` (those
    points) and ``ess`` (out of S draws)."""

    khat: Tensor
    exact: Tensor
    ess: Tensor


def importance_diagnostics(log_w: Tensor) -> ImportanceDiagnostics:
    """PSIS k-hat and effective sample size of log weights ``[S, N]``, computed on the CPU (the
    Pareto fit runs in NumPy)."""
    log_w = log_w.detach().cpu()
    tolerance = EQUAL_WEIGHTS_ULPS * torch.finfo(log_w.dtype).eps * log_w.abs().amax(0).clamp(min=1)
    exact = log_w.amax(0) - log_w.amin(0) <= tolerance
    khat = torch.full(exact.shape, -math.inf, dtype=torch.float64)
    if not exact.all():
        _, fitted = az.psislw(log_w.T[~exact].double().numpy())
        khat[~exact] = torch.from_numpy(np.asarray(fitted, dtype=float))
    return ImportanceDiagnostics(khat, exact, effective_sample_size(log_w))
