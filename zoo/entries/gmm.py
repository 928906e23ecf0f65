"""The registry entry of the Gaussian mixture (:mod:`zoo.models.gmm`): building model and guides
from data, the amortized guide's start, ``zoo evaluate``'s BIC, and the components figure. The
initialization is in :mod:`zoo.entries.gmm_start`, the checks of options and tables (shared by
model, guides and entry) in :mod:`zoo.entries.gmm_checks`."""

from __future__ import annotations

import torch

from zoo.data import Data
from zoo.entries.gmm_start import initialize_from_data, warn_if_floor_binds
from zoo.entry import ModelEntry, from_data
from zoo.figures import gmm as figures
from zoo.guides import gmm as guides
from zoo.models.gmm import GMM


def build_model(data: Data, *, components: int = 3, covariance: str = "full",
                restarts: int = 10, prior: str = "none") -> GMM:
    """The model for ``data``, initialized from its training rows with ``restarts`` candidate
    fits (:func:`~zoo.entries.gmm_start.initialize_from_data`)."""
    model = GMM(data.data_dim, components, covariance, prior)
    initialize_from_data(model, data.x_train, restarts=restarts)
    return model


def build_enumerate_guide(data: Data, *, components: int = 3, **model_options
                          ) -> guides.EnumerateGuide:
    """The enumerate guide for ``data`` (the options of the model alone are ignored)."""
    return guides.EnumerateGuide(data.data_dim, components)


def build_amortized_guide(data: Data, *, components: int = 3, **model_options
                          ) -> guides.AmortizedGuide:
    """The amortized guide for ``data``, its input standardized with the training rows (the
    options of the model alone are ignored)."""
    return from_data(guides.AmortizedGuide, data, components=components)


@torch.no_grad()
def start_amortized(model: GMM, guide: guides.AmortizedGuide, **options) -> None:
    """Start q(z | x) at the model's exact responsibilities as the model starts (EM's first
    E-step; :meth:`~zoo.guides.gmm.AmortizedGuide.best_for`), the baseline at zero (see
    :mod:`zoo.guides.gmm` for why)."""
    exact = guides.AmortizedGuide.best_for(model)
    guide.shift.copy_(exact.shift)
    guide.scale_in.copy_(exact.scale_in)
    guide.encoder.load_state_dict(exact.encoder.state_dict())


@torch.no_grad()
def metrics(model: GMM, x: torch.Tensor) -> dict[str, float]:
    """``bic`` of the whole table ``x`` (not per point) for ``zoo evaluate``; warns when the
    variance floor binds."""
    warn_if_floor_binds(model)
    return {"bic": model.bic(x)}


ENTRY = ModelEntry(
    name="gmm",
    description="Gaussian mixture with full or diag covariances; assignments summed out "
                "exactly (enumerate, TraceEnum_ELBO) or inferred by an amortized "
                "categorical q(z | x) (amortized); exact log-likelihood, responsibilities "
                "and BIC",
    build_model=build_model,
    guides={"enumerate": build_enumerate_guide, "amortized": build_amortized_guide},
    default_data="synthetic-gmm",
    options={"components": 3, "covariance": "full", "restarts": 10, "prior": "none"},
    train={"steps": 1000, "batch_size": 256, "lr": 0.1, "lr_schedule": "cosine",
           "threads": 1},
    demo={"steps": 500},
    objectives={"enumerate": {"name": "enum"}, "amortized": {"name": "enum"}},
    start_guide={"amortized": start_amortized},
    metrics=metrics,
    plots={"components": figures.plot_run_components},
    figures=("components",),
)
