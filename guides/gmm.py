r"""Guides for the Gaussian mixture (:mod:`zoo.models.gmm`).

Both guides take the model's arguments, ``forward(x)`` with ``x: [N, D]``, and use the same site
name ``"z"`` in the plate ``"data"`` of size N at dim -1.

- :class:`EnumerateGuide` (``enumerate``): no sample sites and no parameters. The model's
  assignments z, marked for parallel enumeration, are summed out exactly by ``TraceEnum_ELBO``,
  whose loss is then -sum_n log p(x_n): the exact route, with the mixture's parameters point
  estimates. Every other objective needs a q(z | x) to draw z from and is refused.
- :class:`AmortizedGuide` (``amortized``): q(z_n | x_n) = Categorical(softmax(f(x_n))), an
  encoder shared by all rows. Its site is marked for parallel enumeration, so the two ELBO
  estimators of Pyro that accept a discrete guide give the same ELBO two ways:

  * ``TraceEnum_ELBO`` (``--loss enum``, the default for this guide) sums over the K values
    of z under q: the exact ELBO sum_k q_nk (log p(x_n, k) - log q_nk) and its exact gradient,
    at K times the cost of one draw;
  * ``TraceGraph_ELBO`` (``--loss tracegraph``) draws one z per row, as one would for a latent
    variable too large to enumerate. The draws are discrete, so the encoder's gradient needs
    the score function, grad E_q[c] = E_q[c grad log q(z | x)] (REINFORCE); it subtracts this
    guide's learned per-row baseline b(x_n) from the cost c (Mnih & Gregor, 2014), which keeps
    it unbiased and lowers its variance; with ``--particles P`` it draws P per row, each with
    the same b(x_n). The teaching contrast to the exact routes: its gradients are far noisier,
    and on overlapping clusters (standardized iris) that noise carries the fit into a worse
    local maximum of the likelihood, 0.24 nats per point below EM, which it does not leave.

The registry starts this guide at the exact responsibilities of the model as built
(:func:`zoo.entries.gmm.start_amortized`, EM's first E-step), not uniform: a uniform q gives every
row to every component alike, and the model's first steps would pull the components together,
away from their k-means++ start.

The encoder. The exact posterior is p(z_n = k | x_n) = softmax_k(a_nk) with

    a_nk = log pi_k - 1/2 log det Sigma_k - 1/2 (x_n - mu_k)^T Sigma_k^-1 (x_n - mu_k),

a quadratic function of x_n. The encoder is linear in the quadratic features

    phi(u) = [u_1, ..., u_D, u_i u_j for i <= j],    F = D + D (D + 1) / 2 features,

of the standardized input u = (x - shift) / scale_in (column means and standard deviations of
the training data), f(x) = W phi(u) + b with ``W: [K, F]``, ``b: [K]``: a family that contains
the exact posterior of every mixture with full or diagonal covariances, so
KL(q(z | x) || p(z | x)) can reach 0 (``best_for(model)`` builds that member). The baseline is
linear in the same features. Both start at zero: q uniform over the components.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.poutine.runtime import get_plates
from torch import Tensor, nn

from zoo import standardize
from zoo.conformance import under_enumeration
from zoo.contract import DISCRETE_POSTERIOR, ENUMERATED
from zoo.entries.gmm_checks import check_options, check_table
from zoo.errors import ZooError


class EnumerateGuide(PyroModule):
    """The guide of the exact route: no latent sites (z is enumerated in the model) and no
    parameters (the mixture's parameters are point estimates, held by the model)."""

    offers = frozenset({ENUMERATED})

    def __init__(self, data_dim: int, components: int = 3):
        super().__init__()
        check_options(components, "full")
        self.data_dim, self.components = data_dim, components

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, components={self.components}"

    def forward(self, x: Tensor) -> None:
        """Nothing to sample: the model's z is summed out by the enumeration that
        ``TraceEnum_ELBO`` (``--loss enum``) wraps around model and guide. Any other objective
        would need q(z | x) from this guide and is refused."""
        check_table(x, self.data_dim)
        if not under_enumeration():
            raise ZooError("the enumerate guide has no q(z | x) to draw z from: it leaves z to "
                           "be summed out in the model, which only --loss enum (TraceEnum_ELBO) "
                           "does. Use --loss enum with --guide enumerate, or --guide amortized "
                           "for the score-function objective (--loss tracegraph)")


def plate_shape() -> torch.Size:
    """The batch shape that the enclosing ``pyro.plate`` contexts give a sample site: each
    plate's size at its dim, 1 elsewhere (``[N]`` inside the data plate alone, ``[P, N]`` inside
    a particle plate of P at dim -2 too)."""
    frames = [frame for frame in get_plates() if frame.vectorized]
    shape = [1] * max((-frame.dim for frame in frames), default=0)
    for frame in frames:
        shape[frame.dim] = frame.size
    return torch.Size(shape)


def quadratic_features(u: Tensor) -> Tensor:
    """phi(u) = [u, u_i u_j for i <= j], ``[N, D]`` -> ``[N, D + D (D + 1) / 2]``; the products
    in the row-major order of the upper triangle (``torch.triu_indices``)."""
    i, j = torch.triu_indices(u.shape[-1], u.shape[-1], device=u.device)
    return torch.cat([u, u[..., i] * u[..., j]], -1)


class AmortizedGuide(PyroModule):
    """q(z_n | x_n) = Categorical(softmax(W phi(u_n) + b)) with a baseline
    b(x_n) = w^T phi(u_n) + c for score-function objectives (module docstring).

    ``encoder``: ``Linear(F, K)``; ``baseline_net``: ``Linear(F, 1)``; buffers ``shift`` and
    ``scale_in`` ``[D]`` standardize the input.
    """

    offers = frozenset({DISCRETE_POSTERIOR})

    def __init__(self, data_dim: int, components: int = 3):
        super().__init__()
        check_options(components, "full")
        self.data_dim, self.components = data_dim, components
        num_features = data_dim + data_dim * (data_dim + 1) // 2
        self.encoder = PyroModule[nn.Linear](num_features, components)
        self.baseline_net = PyroModule[nn.Linear](num_features, 1)
        for layer in (self.encoder, self.baseline_net):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        standardize.add_buffers(self, data_dim)

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, components={self.components}"

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Standardize the encoder's input with the column means and standard deviations of
        ``x: [N, D]`` (constant columns keep scale 1)."""
        check_table(x, self.data_dim)
        standardize.fit(self, x)

    def features(self, x: Tensor) -> Tensor:
        """phi((x - shift) / scale_in), ``[N, F]``."""
        return quadratic_features(standardize.standardized(self, check_table(x, self.data_dim)))

    def log_responsibilities(self, x: Tensor) -> Tensor:
        """log q(z_n = k | x_n), ``[N, K]``."""
        return torch.log_softmax(self.encoder(self.features(x)), -1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """q(z_n = k | x_n), ``[N, K]``; each row sums to 1."""
        return self.log_responsibilities(x).exp()

    def baseline(self, phi: Tensor) -> Tensor:
        """The score-function baseline b(x_n) from the features ``phi: [..., N, F]``,
        ``[..., N]``."""
        return self.baseline_net(phi).squeeze(-1)

    def forward(self, x: Tensor) -> None:
        """z_n ~ q(z | x_n) in the plate ``"data"``. The baseline b(x_n) is given the batch
        shape of the site's cost: under a particle plate of P draws per row (``--particles P``
        with ``tracegraph``) each of the P draws of z_n gets the same b(x_n), which depends on
        x_n alone and so leaves the score-function gradient unbiased."""
        phi = self.features(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            phi_per_draw = phi.expand(*plate_shape(), phi.shape[-1])    # [..., N, F]
            pyro.sample("z", dist.Categorical(logits=self.encoder(phi)),
                        infer={"enumerate": "parallel",
                               "baseline": {"nn_baseline": self.baseline,
                                            "nn_baseline_input": phi_per_draw}})

    @classmethod
    def best_for(cls, model: nn.Module) -> AmortizedGuide:
        """The exact posterior p(z | x) of a :class:`~zoo.models.gmm.GMM` at its current
        parameters, as a guide.

        In the model's standardized units u (which this guide then shares), with
        P_k = (L_k L_k^T)^-1 and m_k the standardized mean, a_nk equals, up to a constant in k,

            -1/2 u^T P_k u + u^T P_k m_k + log pi_k - 1/2 m_k^T P_k m_k - sum_d log (L_k)_dd,

        so the weight of u_i u_j is -(P_k)_ij for i < j and -(P_k)_ii / 2 for i = j, the weight
        of u is P_k m_k, and the rest is the bias. Built in the model's dtype and device;
        torch's global RNG is untouched.
        """
        with torch.random.fork_rng(devices=[]):
            guide = cls(model.data_dim, model.components)
        guide = guide.to(model.locs)
        with torch.no_grad():
            guide.shift.copy_(model.shift)
            guide.scale_in.copy_(model.scale_in)
            L = model.standardized_scale_tril                           # [K, D, D]
            P = torch.cholesky_inverse(L)                               # [K, D, D]
            m = model.locs
            i, j = torch.triu_indices(model.data_dim, model.data_dim, device=L.device)
            quadratic = torch.where(i == j, -0.5, -1.0) * P[:, i, j]    # [K, D (D + 1) / 2]
            linear = (P @ m.unsqueeze(-1)).squeeze(-1)                  # [K, D]
            bias = (model.weights.log() - 0.5 * (linear * m).sum(-1)
                    - L.diagonal(dim1=-2, dim2=-1).log().sum(-1))
            guide.encoder.weight.copy_(torch.cat([linear, quadratic], -1))
            guide.encoder.bias.copy_(bias)
        return guide
