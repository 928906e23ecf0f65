"""What the registry entries of the VAE and the CVAE share."""

from __future__ import annotations

from typing import Any

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
