"""Draws from probabilistic PCA and from a Gaussian mixture with the parameters the caller
gives, with their ground truth, from a private random stream: the same seed gives the same data
and the global torch seed is neither used nor changed. The named data sets ``synthetic-ppca``
and ``synthetic-gmm`` (:func:`zoo.data.load_data`) are drawn by these with fixed parameters.
"""

from __future__ import annotations

import math
import numbers

import torch

from zoo.errors import ZooError


def synthetic_ppca(num_data: int, W: torch.Tensor, b: torch.Tensor, sigma: float, *,
                   seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw ``num_data`` points from probabilistic PCA: ``x = W z + b + eps``.

    ``z ~ N(0, I_M)``, ``eps ~ N(0, sigma^2 I_D)``, ``W: [D, M]``, ``b: [D]``, ``sigma > 0``.
    Returns ``x: [N, D]`` and the truth ``{"W": [D, M], "b": [D], "sigma": [], "z": [N, M]}``,
    all float32, drawn from a private generator seeded with ``seed``.
    """
    num_data = _check_count(num_data)
    W = _as_float_tensor(W, "W")
    b = _as_float_tensor(b, "b")
    if W.dim() != 2:
        raise ZooError(f"W must be a matrix [D, M], got shape {tuple(W.shape)}")
    if b.shape != W.shape[:1]:
        raise ZooError(f"b must have shape [D] = ({W.shape[0]},) to match W {tuple(W.shape)}, "
                       f"got {tuple(b.shape)}")
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ZooError(f"sigma is the noise standard deviation and must be positive, got {sigma}")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_data, W.shape[1], generator=generator)
    eps = torch.randn(num_data, W.shape[0], generator=generator)
    x = z @ W.T + b + sigma * eps
    return x.contiguous(), {"W": W, "b": b, "sigma": torch.tensor(sigma), "z": z}


def synthetic_gmm(num_data: int, weights: torch.Tensor, means: torch.Tensor,
                  covariances: torch.Tensor, *,
                  seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw ``num_data`` points from a Gaussian mixture.

    ``z_n ~ Categorical(weights)``, ``x_n ~ N(means[z_n], covariances[z_n])`` with
    ``weights: [K]`` on the simplex, ``means: [K, D]``, ``covariances: [K, D, D]`` symmetric
    positive definite. Returns ``x: [N, D]`` float32 and the truth ``{"weights", "means",
    "covariances"}`` (float32) with ``"z": [N]`` int64, drawn from a private generator seeded
    with ``seed``.
    """
    num_data = _check_count(num_data)
    weights = _as_float_tensor(weights, "weights")
    means = _as_float_tensor(means, "means")
    covariances = _as_float_tensor(covariances, "covariances")
    if weights.dim() != 1 or weights.shape[0] == 0:
        raise ZooError(f"weights must be a vector [K], got shape {tuple(weights.shape)}")
    num_components = weights.shape[0]
    if means.dim() != 2 or means.shape[0] != num_components:
        raise ZooError(f"means must have shape [K, D] with K = {num_components} (the length of "
                       f"weights), got {tuple(means.shape)}")
    dim = means.shape[1]
    if covariances.shape != (num_components, dim, dim):
        raise ZooError(f"covariances must have shape [K, D, D] = {(num_components, dim, dim)} "
                       f"to match means {tuple(means.shape)}, got {tuple(covariances.shape)}")
    if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-4:
        raise ZooError(f"weights must be non-negative and sum to 1, got {weights.tolist()}: "
                       "divide them by their sum")
    cov64 = covariances.double()
    for k in range(num_components):
        if not torch.allclose(cov64[k], cov64[k].T, rtol=1e-5, atol=1e-6):
            raise ZooError(f"covariances[{k}] is not symmetric: use (C + C.T) / 2")
    cholesky, info = torch.linalg.cholesky_ex(cov64)
    if (info != 0).any():
        k = int(torch.nonzero(info)[0])
        raise ZooError(f"covariances[{k}] is not positive definite: add a small multiple of the "
                       "identity to it")
    generator = torch.Generator().manual_seed(seed)
    z = torch.multinomial(weights, num_data, replacement=True, generator=generator)
    eps = torch.randn(num_data, dim, generator=generator, dtype=torch.float64)
    x = means.double()[z] + (cholesky[z] @ eps.unsqueeze(-1)).squeeze(-1)
    truth = {"weights": weights, "means": means, "covariances": covariances, "z": z}
    return x.float().contiguous(), truth


def _check_count(num_data: int) -> int:
    if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1:
        raise ZooError(f"num_data must be a positive integer, got {num_data!r}")
    return int(num_data)


def _as_float_tensor(value, label: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32).clone().contiguous()
    if not torch.isfinite(tensor).all():
        raise ZooError(f"{label} has nan or inf entries: give finite numbers")
    return tensor
