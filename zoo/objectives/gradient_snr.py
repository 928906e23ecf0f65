"""The signal-to-noise ratio of an objective's gradient (Rainforth et al. 2018): how well one
stochastic estimate of the gradient of an objective in :mod:`zoo.objectives` points where the
expected gradient points, separately for the encoder's (guide's) and the decoder's (model's)
parameters. ``examples/gradient_snr.py`` compares the objectives with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zoo.errors import ZooError


@dataclass(frozen=True)
class GradientSNR:
    """Signal-to-noise ratios of a stochastic gradient, one per scalar parameter.

    ``encoder``: the guide's parameters, ``decoder``: the model's, each a flat tensor of
    SNR_i = |mean_r g_ri| / sd_r g_ri over R repeated estimates g_r on the same minibatch.
    Parameters whose gradient has no spread (always zero, or exact) are left out.
    """

    encoder: torch.Tensor
    decoder: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Mean and median SNR of each group (NaN for a group without parameters)."""
        result = {}
        for group in ("encoder", "decoder"):
            snr = getattr(self, group)
            empty = snr.numel() == 0
            result[f"{group}_snr_mean"] = float("nan") if empty else snr.mean().item()
            result[f"{group}_snr_median"] = float("nan") if empty else snr.median().item()
        return result


def gradient_snr(model, guide, objective, data: Sequence[torch.Tensor], repeats: int = 100
                 ) -> GradientSNR:
    """The gradient's signal-to-noise ratio per parameter (Rainforth et al. 2018),

        SNR_i = |E[g_i]| / sd(g_i),

    estimated from ``repeats`` independent draws of ``objective``'s gradient on the same
    minibatch ``data`` (the tensors model and guide are called with). For IWAE the encoder's
    SNR falls like 1 / sqrt(K) as K grows while the decoder's rises like sqrt(K); MIWAE,
    CIWAE, PIWAE and DReG keep the encoder's up. Parameters are left where they are.
    """
    if repeats < 2:
        raise ZooError(f"gradient SNR needs at least 2 repeats to estimate a spread; got {repeats}")
    groups = {"encoder": list(guide.parameters()), "decoder": list(model.parameters())}
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(repeats):
        loss = objective.differentiable_loss(model, guide, *data)
        parameters = groups["encoder"] + groups["decoder"]
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        start = 0
        for name, members in groups.items():
            flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gradients[start:start + len(members)], members, strict=True)]
            draws[name].append(torch.cat(flat) if flat else torch.zeros(0))
            start += len(members)
    result = {}
    for name, rows in draws.items():
        stacked = torch.stack(rows)
        mean, sd = stacked.mean(0), stacked.std(0)
        keep = sd > 0
        result[name] = mean[keep].abs() / sd[keep]
    return GradientSNR(**result)
