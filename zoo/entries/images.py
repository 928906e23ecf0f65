"""What the registry entries of the VAE and the CVAE share: their options checked against the
data and turned into constructor arguments, the decoder's start from the data, and their
training settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from zoo.data import Data
from zoo.errors import ZooError
from zoo.models.vae import LIKELIHOODS, MIN_SCALE, VAE
from zoo.networks import ARCHITECTURES

PIXEL_EPS = 1e-3
"""Mean pixel values are clamped to [PIXEL_EPS, 1 - PIXEL_EPS] before their logit."""


def default_sizes(data_dim: int) -> tuple[int, tuple[int, ...]]:
    """The default latent size M and hidden sizes for data of D columns.

    D >= 784 (28 x 28 images): Burda et al. (2015), M = 50 and two hidden layers of 200.
    Smaller inputs (the 8 x 8 digits): M = min(8, D // 2) and two hidden layers of 64.
    """
    if data_dim >= 784:
        return 50, (200, 200)
    return max(1, min(8, data_dim // 2)), (64, 64)


def check_options(data_dim: int, latent_dim: int, likelihood: str, architecture: str,
                  image_shape: Sequence[int] | None) -> None:
    """Raise :class:`ZooError` for an option out of range, naming the flag and the fix."""
    if likelihood not in LIKELIHOODS:
        raise ZooError(f"unknown --likelihood '{likelihood}'; choose one of: "
                       f"{', '.join(LIKELIHOODS)}")
    if architecture not in ARCHITECTURES:
        raise ZooError(f"unknown --architecture '{architecture}'; choose one of: "
                       f"{', '.join(ARCHITECTURES)}")
    if latent_dim < 1:
        raise ZooError(f"--latent-dim must be at least 1; got {latent_dim}")
    if architecture == "conv":
        if image_shape is None or len(image_shape) != 2:
            raise ZooError("--architecture conv needs image data (digits, mnist, "
                           "fashion-mnist); use --architecture mlp for tables")
        if any(side % 4 for side in image_shape):
            raise ZooError(f"--architecture conv needs image sides that are multiples of 4; "
                           f"got {tuple(image_shape)}: use --architecture mlp")
        if image_shape[0] * image_shape[1] != data_dim:
            raise ZooError(f"images of shape {tuple(image_shape)} do not have D = {data_dim} "
                           f"pixels")


def resolve_options(data: Data, latent_dim: int | None = None, likelihood: str = "bernoulli",
                    architecture: str = "mlp") -> dict[str, Any]:
    """The constructor arguments of model and guide for ``data``: the defaults of
    :func:`default_sizes` where ``latent_dim`` is None, checked against the data (the Bernoulli
    likelihoods need values in [0, 1])."""
    default_latent_dim, hidden_dims = default_sizes(data.data_dim)
    latent_dim = default_latent_dim if latent_dim is None else latent_dim
    check_options(data.data_dim, latent_dim, likelihood, architecture, data.image_shape)
    x = data.x_train
    if likelihood != "gaussian" and (x.min() < 0 or x.max() > 1):
        raise ZooError(f"--likelihood {likelihood} needs data in [0, 1]; {data.name} ranges over "
                       f"[{x.min():.3g}, {x.max():.3g}]: use --likelihood gaussian")
    return {"data_dim": data.data_dim, "latent_dim": latent_dim, "likelihood": likelihood,
            "architecture": architecture, "hidden_dims": hidden_dims,
            "image_shape": data.image_shape}


def guide_options(data: Data, **options) -> dict[str, Any]:
    """The constructor arguments of the guide: those of the model without the likelihood,
    which is the model's alone."""
    arguments = resolve_options(data, **options)
    del arguments["likelihood"]
    return arguments


@torch.no_grad()
def initialize_from_data(model: VAE, x: Tensor) -> None:
    """Set the decoder's pixel bias b to the logit of the mean training image x_bar (to x_bar
    itself for ``gaussian``, whose scale s starts at the pixels' overall standard deviation),
    so that the decoder starts at the best fit that ignores z. ``x: [N, D]``."""
    x_bar = x.mean(0)
    if model.likelihood == "gaussian":
        model.generation_net.bias.copy_(x_bar)
        model.scale = x.std().clamp(min=2 * MIN_SCALE)
    else:
        model.generation_net.bias.copy_(torch.logit(x_bar.clamp(PIXEL_EPS, 1 - PIXEL_EPS)))


IMAGE_MODEL_SETTINGS: dict[str, Any] = dict(
    default_data="digits",
    options={"latent_dim": None, "likelihood": "bernoulli", "architecture": "mlp"},
    train={"epochs": 10, "batch_size": 20, "lr": 1e-3},  # Burda et al. (2015): batch 20, Adam
    demo={"epochs": 40, "batch_size": 50, "lr": 3e-3},
    binarized=lambda options: options["likelihood"] == "bernoulli",
    images=True,
)
"""Digits by default, the Bernoulli likelihood on dynamically binarized images, the training
settings of Burda et al. (2015)."""
