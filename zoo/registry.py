"""The registry: model name -> how to build the model and its guides, its default data and
settings. Scripts and the ``zoo`` command look models up here instead of dispatching on names.

Adding a model to the zoo means writing ``models/X.py`` and ``guides/X.py`` and one
:class:`ModelEntry` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from zoo import generation, mixture_plots, plots
from zoo.data import Data
from zoo.errors import ZooError
from zoo.guides import cvae as cvae_guides
from zoo.guides import expnormal as expnormal_guides
from zoo.guides import gmm as gmm_guides
from zoo.guides import ppca as ppca_guides
from zoo.guides import vae as vae_guides
from zoo.models import cvae, expnormal, gmm, ppca, vae


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model of the zoo and its guides.

    ``build_model(data, **options)`` and each ``guides[name](data, **options)`` receive the
    loaded :class:`~zoo.data.Data` and the model's options (``options`` holds their defaults);
    the first guide is the default. ``train`` holds default :class:`~zoo.train.TrainSettings`
    values and ``demo`` the overrides for the short runs of ``zoo demo``; ``objective`` the
    default objective configuration for each guide name (``{"name": "elbo"}`` for guides
    not listed). ``labels`` says whether
    model and guide take the labels ``y`` after ``x``. ``binarized(options)`` says whether the
    model sees binary images: training then draws them afresh each epoch from the grey levels,
    evaluation uses one seeded draw. ``plots`` maps each ``zoo plot --kind`` name to a function
    ``plot(experiment, path) -> path`` drawing that figure for a trained run; ``figures`` names
    the kinds drawn after every training run, beside the loss curves; ``images`` says that
    those figures show images, so that they are left out for data without an image shape.
    ``start_guide[name](model, guide)``, for the guides it names, starts the guide from the
    model as built (before any checkpoint is loaded over both).
    """

    name: str
    description: str
    build_model: Callable[..., torch.nn.Module]
    guides: dict[str, Callable[..., torch.nn.Module]]
    default_data: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: bool = False
    binarized: Callable[[dict[str, Any]], bool] = lambda options: False
    plots: dict[str, Callable[..., Any]] = field(default_factory=dict)
    figures: tuple[str, ...] = ()
    images: bool = False
    start_guide: dict[str, Callable[[torch.nn.Module, torch.nn.Module], None]] = field(
        default_factory=dict)

    @property
    def default_guide(self) -> str:
        return next(iter(self.guides))

    def inputs(self, data: Data, split: str = "train") -> tuple[torch.Tensor, ...] | None:
        """The tensors model and guide are called with: ``(x,)``, or ``(x, y)`` with labels."""
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        if x is None:
            return None
        return (x, y) if self.labels else (x,)


def _from_data(module_class: type, data: Data, **options) -> torch.nn.Module:
    """``module_class(D, **options)`` initialized from the training data."""
    module = module_class(data.data_dim, **options)
    module.initialize_from_data(data.x_train)
    return module


def _build_ppca(data: Data, *, latent_dim: int, init: str) -> ppca.PPCA:
    """PPCA(D, latent_dim) started as ``init`` says (:meth:`~zoo.models.ppca.PPCA.initialize`)."""
    model = ppca.PPCA(data.data_dim, latent_dim)
    model.initialize(data.x_train, init)
    return model


def _ppca_guide(guide_class: type, data: Data, *, init: str, **options) -> torch.nn.Module:
    """A PPCA guide initialized from the training data; ``init`` concerns the model alone."""
    return _from_data(guide_class, data, **options)


_IMAGE_MODEL_SETTINGS: dict[str, Any] = dict(
    default_data="digits",
    options={"latent_dim": None, "likelihood": "bernoulli", "architecture": "mlp"},
    train={"epochs": 10, "batch_size": 20, "lr": 1e-3},  # Burda et al. (2015): batch 20, Adam
    demo={"epochs": 40, "batch_size": 50, "lr": 3e-3},
    binarized=lambda options: options["likelihood"] == "bernoulli",
    images=True,
)
"""What the VAE and the CVAE share: digits by default, the Bernoulli likelihood on dynamically
binarized images, the training settings of Burda et al. (2015)."""

_TO_CONVERGENCE: dict[str, Any] = dict(
    steps=20000, batch_size=256, lr=0.01, lr_schedule="plateau", tolerance=1e-5, patience=25,
    threads=1)
"""Training to convergence, the default of the small models whose data fit in memory: Adam at
0.01 per step (in units of the data's scale where the model declares one), halved at each
plateau of the whole-data loss (an improvement below 1e-5 nats per point per epoch, averaged
over 25 epochs), stopping at the plateau at lr / 32 or after 20000 steps. One CPU thread: their
steps are too small for torch's threads to pay for themselves, and on a busy machine extra
threads only wait for cores (``benchmarks/threads.py``)."""

_PPCA_TO_CONVERGENCE: dict[str, Any] = dict(
    _TO_CONVERGENCE, batch_size=4096, passes=50, lr=0.015, tolerance=1e-4, patience=3)
"""PPCA's tables are small enough for full-batch steps (up to 4096 rows a batch), whose
gradients carry no minibatch noise; an epoch of 50 passes is long enough to measure the
whole-data loss's improvement against a tolerance of 1e-4 nats per point per epoch, averaged
over 3 epochs. Adam starts at 0.015, so that its last rate, 0.015 / 32, leaves the full guide's
encoder within KL 0.01 of the exact posterior on a 64-column table; 0.03 reaches the optimum of
the model as well but ends at KL 0.012 there (``benchmarks/ppca_convergence.py``)."""

MODELS: dict[str, ModelEntry] = {
    entry.name: entry for entry in [
        ModelEntry(
            name="ppca",
            description="probabilistic PCA, x = W z + b + eps, with its closed-form marginal, "
                        "posterior and maximum-likelihood solution",
            build_model=_build_ppca,
            guides={"meanfield": partial(_ppca_guide, ppca_guides.MeanFieldGuide),
                    "full": partial(_ppca_guide, ppca_guides.FullGuide)},
            default_data="synthetic-ppca",
            options={"latent_dim": 2, "init": "data"},
            train=_PPCA_TO_CONVERGENCE,
            demo={"steps": 1500},
        ),
        ModelEntry(
            name="expnormal",
            description="teaching model z ~ Exponential(1), x | z ~ N(z, 1): exact posterior "
                        "N(x - 1, 1) truncated to z >= 0, exact marginal through the normal CDF",
            build_model=lambda data: expnormal.ExpNormal(data.data_dim),
            guides={"lognormal": partial(_from_data, expnormal_guides.LogNormalGuide),
                    "normal": partial(_from_data, expnormal_guides.NormalGuide)},
            default_data="synthetic-expnormal",
            train=_TO_CONVERGENCE,
            demo={"steps": 1500},
            plots={"posterior-fit": plots.plot_expnormal_fits},
            figures=("posterior-fit",),
        ),
        ModelEntry(
            name="vae",
            description="variational autoencoder, z ~ N(0, I), x ~ p(x | decoder(z)), with an "
                        "MLP or convolutional encoder q(z | x) = N(mu(x), diag sigma(x)^2)",
            build_model=vae.VAE.for_data,
            guides={"meanfield": vae_guides.MeanFieldGuide.for_data},
            plots=generation.VAE_PLOTS,
            figures=("samples", "reconstructions", "latents"),
            **_IMAGE_MODEL_SETTINGS,
        ),
        ModelEntry(
            name="cvae",
            description="label-conditioned VAE, x ~ p(x | z, y) with y one-hot, so that z "
                        "carries the style and y the content; q(z | x, y)",
            build_model=cvae.CVAE.for_data,
            guides={"meanfield": cvae_guides.MeanFieldGuide.for_data},
            labels=True,
            plots=generation.CVAE_PLOTS,
            figures=("samples", "analogies"),
            **_IMAGE_MODEL_SETTINGS,
        ),
        ModelEntry(
            name="gmm",
            description="Gaussian mixture with full or diag covariances; assignments summed out "
                        "exactly (enumerate, TraceEnum_ELBO) or inferred by an amortized "
                        "categorical q(z | x) (amortized); exact log-likelihood, responsibilities "
                        "and BIC",
            build_model=gmm.GMM.for_data,
            guides={"enumerate": gmm_guides.EnumerateGuide.for_data,
                    "amortized": gmm_guides.AmortizedGuide.for_data},
            default_data="synthetic-gmm",
            options={"components": 3, "covariance": "full", "restarts": 10, "prior": "none"},
            train={"steps": 1000, "batch_size": 256, "lr": 0.1, "lr_schedule": "cosine",
                   "threads": 1},
            demo={"steps": 500},
            objectives={"enumerate": {"name": "enum"}, "amortized": {"name": "enum"}},
            start_guide={"amortized": lambda model, guide: guide.initialize_from_model(model)},
            plots={"components": mixture_plots.plot_run_components},
            figures=("components",),
        ),
    ]
}


def get_model(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names list the valid ones."""
    if name not in MODELS:
        raise ZooError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build(entry: ModelEntry, guide: str | None, data: Data, options: dict[str, Any]
          ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the model and the named guide (the default when None) for ``data``."""
    guide = guide or entry.default_guide
    if guide not in entry.guides:
        raise ZooError(f"unknown guide '{guide}' for model {entry.name}; "
                       f"choose one of: {', '.join(entry.guides)}")
    unknown = set(options) - set(entry.options)
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(unknown))
        raise ZooError(f"{flags} does not apply to model {entry.name}")
    options = {**entry.options, **options}
    model, guide_module = entry.build_model(data, **options), entry.guides[guide](data, **options)
    if guide in entry.start_guide:
        entry.start_guide[guide](model, guide_module)
    return model, guide_module
