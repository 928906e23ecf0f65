"""Draws from the guide and from the reference posterior: exact where the model knows p(z | x)
in closed form, else NUTS on the model's own program (``pyro.infer.MCMC``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value
from torch import Tensor, nn
from torch.distributions import Distribution

from zoo.contract import EXACT_POSTERIOR, LATENT, offers
from zoo.diagnostics.settings import DiagnosticSettings
from zoo.objectives import draw
from zoo.progress import progress_bar


@dataclass
class GuideDraws:
    """S draws per data point from the guide: ``z: [S, N, M]``, ``log_joint`` = log p(x, z) and
    ``log_q`` = log q(z | x), each ``[S, N]``.

    The stored, plain-tensor form of the objectives' :class:`~zoo.objectives.Draws`, which
    :func:`guide_draws` scores: ``Draws`` keeps the Pyro traces of one pass and computes each
    density only when an objective asks for it, while the diagnostics need every density of
    thousands of draws, joined over memory-bounded chunks, without keeping their traces."""

    z: Tensor
    log_joint: Tensor
    log_q: Tensor

    @property
    def log_weights(self) -> Tensor:
        return self.log_joint - self.log_q


@torch.no_grad()
def guide_draws(model, guide, *inputs: Tensor, num_draws: int, chunk: int = 250) -> GuideDraws:
    """``num_draws`` draws from q(z | x_n) for every point, scored by model and guide, in chunks
    of ``chunk`` particles (see :func:`zoo.objectives.draw`)."""
    parts = []
    for done in range(0, num_draws, chunk):
        num_particles = min(chunk, num_draws - done)
        draws = draw(model, guide, *inputs, num_particles=num_particles)
        z = draws.guide_trace.nodes[LATENT]["value"]        # [N, M] for a single particle
        parts.append((z.reshape(num_particles, *z.shape[-2:]),
                      draws.log_likelihood + draws.log_prior, draws.log_q))
    return GuideDraws(*(torch.cat(column) for column in zip(*parts, strict=True)))


@dataclass
class Reference:
    """Draws from the exact posterior of some of the points: ``z: [C, S, n, M]`` for the points
    ``points`` (``[n]``, indices into the diagnosed points), how they were drawn (``method``),
    the closed-form posterior of all N points when there is one, and ``stats`` (NUTS's)."""

    z: Tensor
    points: Tensor
    method: str
    distribution: Distribution | None = None
    stats: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Hold a module's parameters fixed (no gradient) inside the block."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def nuts_posterior(model, *inputs: Tensor, num_chains: int = 2, num_samples: int = 500,
                   warmup_steps: int = 300, init: Tensor | None = None, quiet: bool = False
                   ) -> tuple[Tensor, dict[str, float]]:
    """Draws from p(z | x) for every point of ``inputs`` by NUTS on the model's own program, in
    which x is observed: ``z: [C, S, N, M]`` and the stats ``divergences`` (in all) and
    ``acceptance`` (mean acceptance probability).

    The N points' latents form one vector of N M dimensions sampled jointly (the points are
    independent given the model's parameters, and NUTS adapts one step size to the diagonal
    mass matrix it learns). The chains run one after another, each started at ``init[c]``
    (``[C, N, M]``, for example guide draws), else at a prior draw. The model's parameters are
    held fixed. One progress bar counts the iterations of all chains, unless ``quiet``.
    """
    chains, divergences, acceptance = [], 0, []
    bar = progress_bar(num_chains * (warmup_steps + num_samples),
                       f"NUTS reference, {inputs[0].shape[0]} points", quiet=quiet)
    with frozen(model), bar:
        for chain in range(num_chains):
            strategy = (init_to_value(values={LATENT: init[chain]}) if init is not None
                        else init_to_sample)
            kernel = NUTS(model, init_strategy=strategy, max_plate_nesting=1)
            bar.set_postfix_str(f"chain {chain + 1} of {num_chains}")
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        disable_progbar=True, hook_fn=lambda *_: bar.update())
            mcmc.run(*inputs)
            chains.append(mcmc.get_samples()[LATENT])
            diagnostics = mcmc.diagnostics()
            divergences += sum(len(value) for value in diagnostics["divergences"].values())
            acceptance += list(diagnostics["acceptance rate"].values())
    return torch.stack(chains).detach(), {"divergences": float(divergences),
                                          "acceptance": float(np.mean(acceptance))}


def reference_posterior(model, *inputs: Tensor, draws: GuideDraws,
                        settings: DiagnosticSettings) -> Reference:
    """Exact draws for every point where the model has ``posterior``, else NUTS on the first
    ``settings.nuts_points`` points, started at guide draws."""
    C, S = settings.num_chains, settings.num_draws
    if offers(model, EXACT_POSTERIOR):
        with torch.no_grad():
            posterior = model.posterior(*inputs)
            z = posterior.sample((C * S,))
        return Reference(z.reshape(C, S, *z.shape[1:]), torch.arange(z.shape[1], device=z.device),
                         "closed form", distribution=posterior)
    n = min(settings.nuts_points, inputs[0].shape[0])
    points = torch.arange(n, device=inputs[0].device)
    z, stats = nuts_posterior(model, *(tensor[:n] for tensor in inputs),
                              num_chains=settings.nuts_chains, num_samples=settings.nuts_samples,
                              warmup_steps=settings.nuts_warmup,
                              init=draws.z[:settings.nuts_chains, :n], quiet=settings.quiet)
    return Reference(z, points, "NUTS", stats=stats)

