"""The registry entry of the Gaussian mixture (:mod:`zoo.models.gmm`)."""

from __future__ import annotations

import torch

from zoo import mixture_plots
from zoo.data import Data
from zoo.entry import ModelEntry
from zoo.guides import gmm as guides
from zoo.models.gmm import GMM


def build_model(data: Data, *, components: int = 3, covariance: str = "full",
                restarts: int = 10, prior: str = "none") -> GMM:
    """The model for ``data``, initialized from its training rows with ``restarts`` candidate
    fits (:meth:`~zoo.models.gmm.GMM.initialize_from_data`)."""
    model = GMM(data.data_dim, components, covariance, prior)
    model.initialize_from_data(data.x_train, restarts=restarts)
    return model


@torch.no_grad()
def metrics(model: GMM, x: torch.Tensor) -> dict[str, float]:
    """``bic`` of the whole table ``x`` (not per point) for ``zoo evaluate``; warns when the
    variance floor binds."""
    model.warn_if_floor_binds()
    return {"bic": model.bic(x)}


ENTRY = ModelEntry(
    name="gmm",
    description="Gaussian mixture with full or diag covariances; assignments summed out "
                "exactly (enumerate, TraceEnum_ELBO) or inferred by an amortized "
                "categorical q(z | x) (amortized); exact log-likelihood, responsibilities "
                "and BIC",
    build_model=build_model,
    guides={"enumerate": guides.EnumerateGuide.for_data,
            "amortized": guides.AmortizedGuide.for_data},
    default_data="synthetic-gmm",
    options={"components": 3, "covariance": "full", "restarts": 10, "prior": "none"},
    train={"steps": 1000, "batch_size": 256, "lr": 0.1, "lr_schedule": "cosine",
           "threads": 1},
    demo={"steps": 500},
    objectives={"enumerate": {"name": "enum"}, "amortized": {"name": "enum"}},
    start_guide={"amortized": lambda model, guide: guide.initialize_from_model(model)},
    metrics=metrics,
    plots={"components": mixture_plots.plot_run_components},
    figures=("components",),
)
