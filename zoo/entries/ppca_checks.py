"""The check of probabilistic PCA's sizes (:mod:`zoo.models.ppca`), shared by the model, its
guides and its entry, refusing a bad latent size in one line that names the flag."""

from __future__ import annotations

from zoo.errors import ZooError


def check_dims(data_dim: int, latent_dim: int) -> None:
    """Raise :class:`ZooError` unless 1 <= latent_dim <= data_dim - 1 (so D >= 2)."""
    if data_dim < 2:
        raise ZooError(f"PPCA needs data with at least 2 columns so that 1 <= latent dim < D; "
                       f"got D = {data_dim}")
    if not 0 < latent_dim < data_dim:
        raise ZooError(f"--latent-dim must be between 1 and D-1 = {data_dim - 1} for data with "
                       f"D = {data_dim} columns; got {latent_dim}")
