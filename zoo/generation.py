r"""Codes of images and images of codes for the VAE and the CVAE, and ``zoo sample``.

:func:`encode` gives the guide's posterior means mu(x) = E_q[z | x], :func:`decode` the decoder
means E[x | z] (probabilities for a Bernoulli decoder), both with the labels y for the CVAE; the
figures of :mod:`zoo.figures.images` are drawn from them. :func:`sample_run` is ``zoo sample``:
n draws from the prior as an image grid (``.png``) or as the array of decoder means,
``[n, *image_shape]`` (``.npy``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from zoo import runs
from zoo.contract import DECODER, offers
from zoo.errors import ZooError
from zoo.train import seed_everything
from zoo.validation import check_memory

if TYPE_CHECKING:
    from zoo.experiment import Experiment

NUM_SAMPLES = 64


def _labelled(experiment: Experiment) -> bool:
    return experiment.entry.labels


def model_device(experiment: Experiment) -> torch.device:
    """Where the model's parameters are: the figures' tensors are made there."""
    return next(experiment.model.parameters()).device


def encode(experiment: Experiment, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Posterior means mu(x) of the guide, ``[N, M]`` (the CVAE's need the labels y)."""
    guide = experiment.guide
    return (guide.distribution(x, y) if _labelled(experiment) else guide.distribution(x)).mean


def decode(experiment: Experiment, z: Tensor, y: Tensor | None = None) -> Tensor:
    """Decoder means E[x | z] (the CVAE's E[x | z, y]), ``[..., D]``."""
    model = experiment.model
    return model.mean(z, y) if _labelled(experiment) else model.mean(z)


def image_shape(experiment: Experiment) -> tuple[int, ...]:
    """The shape (H, W) of the run's images; :class:`ZooError` for a table."""
    shape = experiment.data.image_shape
    if shape is None:
        raise ZooError(f"{experiment.data.name} is a table, not images, so there is nothing to "
                       f"draw; use zoo sample RUN --out FILE.npy for the decoder means")
    return tuple(shape)


def sample_labels(experiment: Experiment, num_samples: int, label: int | None) -> Tensor | None:
    """The labels to decode under: None for an unconditional model, ``label`` for every sample,
    or the classes in turn 0, 1, ..., C - 1, 0, ... when no label is given. A label for an
    unconditional model, or out of range, is a :class:`ZooError`."""
    name = experiment.entry.name
    if not _labelled(experiment):
        if label is not None:
            raise ZooError(f"--label applies to label-conditioned models (cvae); {name} is "
                           f"unconditional: drop --label")
        return None
    C, device = experiment.model.num_classes, model_device(experiment)
    if label is None:
        return torch.arange(num_samples, device=device) % C
    if not 0 <= label < C:
        raise ZooError(f"--label must be a class of {experiment.data.name}, from 0 to {C - 1}; "
                       f"got {label}")
    return torch.full((num_samples,), label, dtype=torch.long, device=device)


def sample(experiment: Experiment, num_samples: int = NUM_SAMPLES, label: int | None = None
           ) -> Tensor:
    """Decoder means E[x | z] of ``num_samples`` draws z ~ N(0, I), ``[n, D]`` (under labels
    from :func:`sample_labels` for the CVAE)."""
    if num_samples < 1:
        raise ZooError(f"--n must be at least 1; got {num_samples}")
    y = sample_labels(experiment, num_samples, label)
    z = torch.randn(num_samples, experiment.model.latent_dim, device=model_device(experiment))
    return decode(experiment, z, y)


SAMPLES = "samples"
"""The folder of a run that ``zoo sample`` writes into by default."""


def new_sample_path(run_dir: str | os.PathLike) -> Path:
    """``RUN/samples/samples-NNN.png`` with the first number not taken yet."""
    folder = Path(run_dir) / SAMPLES
    taken = {path.stem for path in folder.glob("samples-*.*")}
    number = next(n for n in range(1, len(taken) + 2) if f"samples-{n:03d}" not in taken)
    return folder / f"samples-{number:03d}.png"


def sample_run(run_dir: str | os.PathLike, *, num_samples: int = NUM_SAMPLES,
               label: int | None = None, out: str | os.PathLike | None = None) -> Path:
    """``zoo sample``: draw from a trained run's prior and decode, with the run's seed.

    ``out`` ending in ``.png`` (the default, a new ``RUN/samples/samples-NNN.png``, never a
    training figure) gets an image grid;
    ``.npy`` gets the decoder means as an array ``[n, *image_shape]`` (``[n, D]`` for tables).
    """
    # Imported here, not above: zoo.experiment imports the registry, whose entries import the
    # figures of zoo.figures.images, which draw with encode and decode from this module.
    from zoo.experiment import load_run
    from zoo.figures.images import plot_image_grid, square

    path = Path(out) if out is not None else new_sample_path(run_dir)
    if path.suffix.lower() not in (".png", ".npy"):
        raise ZooError(f"--out must end in .png (an image grid) or .npy (the decoder means); "
                       f"got {path.name}")
    if path.exists() and path.resolve().parent == (Path(run_dir) / runs.FIGURES).resolve():
        raise ZooError(f"{path} is a figure of the training run; choose another --out, or "
                       f"leave --out out for a new file in {Path(run_dir) / SAMPLES}")
    experiment = load_run(run_dir)
    if not offers(experiment.model, DECODER):
        raise ZooError(f"zoo sample draws from generative models with a decoder (vae, cvae); "
                       f"{experiment.entry.name} has none")
    check_memory(num_samples * experiment.data.data_dim, f"{num_samples} samples x D "
                 f"{experiment.data.data_dim} decoder means", "lower --n")
    experiment.model.eval(), experiment.guide.eval()
    seed_everything(experiment.settings.seed)
    with torch.no_grad():
        means = sample(experiment, num_samples, label)
    shape = experiment.data.image_shape or (experiment.model.data_dim,)
    if path.suffix.lower() == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, means.reshape(num_samples, *shape).cpu().numpy())
        return path
    title = f"{experiment.entry.name}: E[x | z], z ~ N(0, I)"
    if label is not None:
        title += f", label {label}"
    return plot_image_grid(square(means.reshape(num_samples, *image_shape(experiment))), path,
                           title=title)
