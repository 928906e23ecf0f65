r"""The figures of the VAE and the CVAE: samples, reconstructions and the latent space.

Each ``plot_*`` function takes a trained :class:`~zoo.experiment.Experiment` and a path, draws
one figure on a fresh ``matplotlib.figure.Figure``, saves it and returns the path; the entries
(:mod:`zoo.entries.vae`, :mod:`zoo.entries.cvae`) list them as the models' ``zoo plot --kind``
choices (``VAE_PLOTS``, ``CVAE_PLOTS``). Images are decoder means E[x | z] (probabilities for a
Bernoulli decoder), not noisy draws. Latent codes of images are posterior means
mu(x) = E_q[z | x] of the guide (:func:`zoo.generation.encode`, :func:`zoo.generation.decode`).

- ``samples``: z ~ N(0, I) decoded; for the CVAE one row per style z and one column per label.
- ``reconstructions``: test images above their reconstructions E[x | z = mu(x)].
- ``interpolation``: the path between the codes of two test images, linear,
  z_t = (1 - t) z_0 + t z_1, and spherical (Shoemake 1985; White 2016),
  z_t = sin((1 - t) omega) / sin(omega) z_0 + sin(t omega) / sin(omega) z_1 with
  cos(omega) = z_0 . z_1 / (|z_0| |z_1|), which keeps the norm typical of N(0, I) draws in
  high dimension where the linear midpoint is too short.
- ``arithmetic``: z_c + t (m_b - m_a) for images c of class a, with m_a the mean code of the
  test images of class a, for the two classes whose mean codes are farthest apart.
- ``manifold``: for a 2-D latent space, the decoded grid z = (Phi^-1(u_i), Phi^-1(u_j)) of
  evenly spaced quantiles u of the standard normal (Kingma & Welling 2014, figure 4).
- ``latents``: the codes of the test images, coloured by label; the first two principal
  components when M > 2. The title reports the active units (Burda et al. 2015): dimensions
  whose code varies over the images (variance above 0.01); fewer than M signals posterior
  collapse.
- ``analogies`` (CVAE): the style z = mu(x, y) of a test image decoded under every label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn.functional import pad as pad_images

from zoo.errors import ZooError
from zoo.evaluate import ACTIVE_UNIT_THRESHOLD, active_units
from zoo.generation import NUM_SAMPLES, decode, encode, image_shape, model_device
from zoo.linalg import principal_axes
from zoo.plots import save_figure

if TYPE_CHECKING:
    from zoo.experiment import Experiment

NUM_ROWS = 8
INTERPOLATION_STEPS = 10
ARITHMETIC_STEPS = 6
MANIFOLD_SIZE = 15
MANIFOLD_QUANTILES = (0.05, 0.95)
MAX_SCATTER = 2000


# --- the images a figure shows ----------------------------------------------------------------

def _images(experiment: Experiment) -> tuple[Tensor, Tensor | None]:
    """The test images ``x: [N, D]`` as the model sees them (binarized with a fixed seed for a
    binary model) and their labels ``[N]`` (None without labels), on the model's device; the
    training images when there is no test split."""
    inputs = experiment.inputs("test") or experiment.inputs("train")
    y = experiment.data.y_test if experiment.data.x_test is not None else experiment.data.y_train
    device = model_device(experiment)
    return inputs[0].to(device), None if y is None else y.to(device)


def _check_labels(experiment: Experiment, what: str) -> int:
    """The number of classes; :class:`ZooError` when the data have no labels."""
    if experiment.data.num_classes is None or experiment.data.y_train is None:
        raise ZooError(f"the {what} figure needs labelled data (digits, mnist, fashion-mnist); "
                       f"{experiment.data.name} has no labels")
    return experiment.data.num_classes


# --- drawing grids of images -----------------------------------------------------------------

def mosaic(images: Tensor, pad: int = 1) -> np.ndarray:
    """One array from a grid of images ``[R, C, H, W]``, ``pad`` pixels of 0.5 between them:
    shape ``[R (H + pad) + pad, C (W + pad) + pad]``."""
    R, C, H, W = images.shape
    tiles = pad_images(images.detach().float().clamp(0, 1).cpu(), (0, pad, 0, pad), value=0.5)
    canvas = tiles.permute(0, 2, 1, 3).reshape(R * (H + pad), C * (W + pad))
    return pad_images(canvas, (pad, 0, pad, 0), value=0.5).numpy()


def plot_image_grid(images: Tensor, path: str | os.PathLike, *, title: str = "",
                    row_labels: Sequence[str] | None = None,
                    column_labels: Sequence[str] | None = None,
                    xlabel: str = "", ylabel: str = "") -> Path:
    """Draw ``images: [R, C, H, W]`` (values in [0, 1]) as one grid, with optional labels of
    rows and columns, and save it to ``path``."""
    R, C, H, W = images.shape
    figure = Figure(figsize=(max(2.5, 0.5 + 0.55 * C * W / 8), max(2.0, 0.6 + 0.55 * R * H / 8)))
    axes = figure.subplots()
    axes.imshow(mosaic(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    centers = lambda n, size: [1 + i * (size + 1) + (size - 1) / 2 for i in range(n)]  # noqa: E731
    axes.set_xticks(centers(C, W) if column_labels else [], column_labels or [])
    axes.set_yticks(centers(R, H) if row_labels else [], row_labels or [])
    axes.tick_params(length=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize="medium")
    return save_figure(figure, path)


def _grid(images: Tensor, shape: Sequence[int]) -> Tensor:
    """``[R, C, D] -> [R, C, H, W]``."""
    return images.reshape(*images.shape[:2], *shape)


def square(images: Tensor) -> Tensor:
    """``[n, H, W] -> [R, C, H, W]`` with C = ceil(sqrt(n)), the last row padded with grey."""
    n = images.shape[0]
    C = math.ceil(math.sqrt(n))
    R = math.ceil(n / C)
    padded = images.new_full((R * C, *images.shape[1:]), 0.5)
    padded[:n] = images
    return padded.reshape(R, C, *images.shape[1:])


# --- the figures ---------------------------------------------------------------------------

@torch.no_grad()
def plot_samples(experiment: Experiment, path: str | os.PathLike) -> Path:
    """Decoder means of z ~ N(0, I): an 8 x 8 grid (VAE); one row per style z and one column
    per label (CVAE)."""
    shape, M = image_shape(experiment), experiment.model.latent_dim
    name, device = experiment.entry.name, model_device(experiment)
    if not experiment.entry.labels:
        z = torch.randn(NUM_SAMPLES, M, device=device)
        images = _grid(decode(experiment, z).reshape(NUM_ROWS, -1, experiment.model.data_dim),
                       shape)
        return plot_image_grid(images, path, title=f"{name}: E[x | z], z ~ N(0, I)")
    C = experiment.model.num_classes
    z = torch.randn(NUM_ROWS, 1, M, device=device).expand(NUM_ROWS, C, M)
    y = torch.arange(C, device=device)
    images = _grid(decode(experiment, z, y), shape)
    return plot_image_grid(images, path, title=f"{name}: E[x | z, y], one z ~ N(0, I) per row",
                           column_labels=[str(label) for label in range(C)], xlabel="label y",
                           ylabel="style z")


@torch.no_grad()
def plot_reconstructions(experiment: Experiment, path: str | os.PathLike,
                         num_images: int = 16) -> Path:
    """Test images (odd rows) above their reconstructions E[x | z = mu(x)] (even rows)."""
    shape = image_shape(experiment)
    x, y = _images(experiment)
    x, y = x[:num_images], None if y is None else y[:num_images]
    x_hat = decode(experiment, encode(experiment, x, y), y)
    columns = min(8, x.shape[0])
    rows = []
    for start in range(0, x.shape[0] - columns + 1, columns):
        rows += [x[start:start + columns], x_hat[start:start + columns]]
    images = _grid(torch.stack(rows), shape)
    return plot_image_grid(images, path, title=f"{experiment.entry.name}: test images and "
                           f"their reconstructions E[x | z = mu(x)]",
                           row_labels=["x", "recon."] * (len(rows) // 2))


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between ``z0, z1: [M]`` at ``t: [T]``, ``[T, M]``:
    sin((1 - t) omega) / sin(omega) z0 + sin(t omega) / sin(omega) z1 with omega the angle
    between z0 and z1.

    The linear path (1 - t) z0 + t z1 when sin(omega) < sqrt(eps): codes pointing the same way
    (where the two paths agree) or opposite ways (where no great circle is singled out), whose
    angle, computed from its cosine, is known only to about sqrt(eps) anyway."""
    t = t[:, None]
    cosine = (z0 @ z1 / (z0.norm() * z1.norm()).clamp(min=1e-12)).clamp(-1, 1)
    omega = torch.arccos(cosine)
    sine = torch.sin(omega)
    if sine.abs() < math.sqrt(torch.finfo(z0.dtype).eps):
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / sine


def _two_images(experiment: Experiment) -> tuple[Tensor, Tensor | None]:
    """Two test images, ``[2, D]``, with their labels: of different classes for the VAE, of
    the same class for the CVAE (whose code holds only the style); the first two otherwise."""
    x, y = _images(experiment)
    if y is None:
        return x[:2], None
    same = (y == y[0]).nonzero().flatten()
    other = (y != y[0]).nonzero().flatten()
    second = (same[1:] if experiment.entry.labels else other)[:1]
    first = torch.zeros(1, dtype=torch.long, device=y.device)
    index = torch.cat([first, second if len(second) else same[1:2]])
    return x[index], y[index]


@torch.no_grad()
def plot_interpolation(experiment: Experiment, path: str | os.PathLike) -> Path:
    """Decoded paths between the codes of two test images: linear (top) and spherical
    (bottom), with the two images at the ends."""
    shape = image_shape(experiment)
    x, y = _two_images(experiment)
    z0, z1 = encode(experiment, x, y)
    t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=z0.device)
    paths = torch.stack([(1 - t[:, None]) * z0 + t[:, None] * z1, slerp(z0, z1, t)])  # [2, T, M]
    label = None if y is None else y[0].expand(INTERPOLATION_STEPS)
    decoded = decode(experiment, paths, label)                                       # [2, T, D]
    ends = lambda x_end: x_end.expand(2, 1, x_end.shape[-1])  # noqa: E731
    images = _grid(torch.cat([ends(x[0]), decoded, ends(x[1])], 1), shape)
    return plot_image_grid(images, path, row_labels=["linear", "spherical"],
                           column_labels=["x0", *[f"{v:.2g}" for v in t.tolist()], "x1"],
                           xlabel="t", title=f"{experiment.entry.name}: interpolation between "
                                             f"the codes of two test images")


def class_means(codes: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """The mean code of each class, ``[C, M]`` (NaN rows for absent classes)."""
    sums = codes.new_zeros(num_classes, codes.shape[1]).index_add_(0, y, codes)
    counts = torch.bincount(y, minlength=num_classes)[:, None]
    return sums / counts


@torch.no_grad()
def plot_arithmetic(experiment: Experiment, path: str | os.PathLike,
                    num_rows: int = 6) -> Path:
    """Latent arithmetic: each row is a test image x_c of class a, then the decoded
    z_c + t (m_b - m_a) for t from 0 to 1, where m_a and m_b are the mean codes of classes a
    and b, the two classes whose mean codes are farthest apart."""
    shape, C = image_shape(experiment), _check_labels(experiment, "arithmetic")
    x, y = _images(experiment)
    codes = encode(experiment, x)
    means = class_means(codes, y, C)
    distances = torch.cdist(means, means).nan_to_num(-1.0)
    a, b = divmod(int(distances.argmax()), C)
    rows = (y == a).nonzero().flatten()[:num_rows]
    t = torch.linspace(0, 1, ARITHMETIC_STEPS, device=codes.device)
    z = codes[rows, None, :] + t[:, None] * (means[b] - means[a])      # [rows, T, M]
    images = _grid(torch.cat([x[rows, None, :], decode(experiment, z)], 1), shape)
    return plot_image_grid(images, path, column_labels=["x", *[f"{v:.2g}" for v in t.tolist()]],
                           xlabel="t", title=f"{experiment.entry.name}: z(x) + t (mean z of "
                                             f"class {b} - mean z of class {a})")


@torch.no_grad()
def plot_manifold(experiment: Experiment, path: str | os.PathLike) -> Path:
    """The decoded grid of standard-normal quantiles over a 2-D latent space."""
    shape, M = image_shape(experiment), experiment.model.latent_dim
    if M != 2:
        raise ZooError(f"the manifold figure decodes a grid over a 2-D latent space, and this "
                       f"run has M = {M} latent dimensions; train with --latent-dim 2, or use "
                       f"--kind latents")
    u = torch.linspace(*MANIFOLD_QUANTILES, MANIFOLD_SIZE, device=model_device(experiment))
    q = torch.special.ndtri(u)
    z = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1)  # rows: z2 from high to low
    z = z.flip(-1)                                                     # z = (z1, z2)
    images = _grid(decode(experiment, z), shape)
    ticks = [f"{v:.1f}" for v in q.tolist()]
    return plot_image_grid(images, path, column_labels=ticks, row_labels=ticks[::-1],
                           xlabel="z1", ylabel="z2",
                           title=f"{experiment.entry.name}: E[x | z] over quantiles of N(0, I)")


def principal_components(codes: Tensor, k: int = 2) -> Tensor:
    """The projection of ``codes: [N, M]`` on their first k principal components, ``[N, k]``,
    each component's sign fixed so that its largest loading is positive."""
    _, V = principal_axes(torch.cov(codes.T), k)                     # [M, k]
    return (codes - codes.mean(0)) @ V


@torch.no_grad()
def plot_latents(experiment: Experiment, path: str | os.PathLike) -> Path:
    """The codes mu(x) of test images coloured by label: the two latent dimensions when M = 2,
    else the first two principal components; the title gives the active units."""
    x, y = _images(experiment)
    x, y = x[:MAX_SCATTER], None if y is None else y[:MAX_SCATTER]
    codes = encode(experiment, x, y)
    M = codes.shape[1]
    points = codes if M <= 2 else principal_components(codes)
    if M == 1:
        points = torch.cat([points, torch.zeros_like(points)], 1)
    figure = Figure(figsize=(5.5, 4.5))
    axes = figure.subplots()
    colors = None if y is None else y.cpu().numpy()
    scatter = axes.scatter(*points.T.cpu().numpy(), c=colors, cmap="tab10", s=6, alpha=0.8,
                           vmin=-0.5, vmax=9.5)
    if y is not None:
        figure.colorbar(scatter, ax=axes, ticks=range(10), label="label")
    names = ("z1", "z2") if M <= 2 else ("principal component 1", "principal component 2")
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    active = active_units(codes)
    axes.set_title(f"{experiment.entry.name}: posterior means of {x.shape[0]} images\n"
                   f"active units: {active} of {M} (variance of E_q[z_d] > "
                   f"{ACTIVE_UNIT_THRESHOLD})", fontsize="medium")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


@torch.no_grad()
def plot_analogies(experiment: Experiment, path: str | os.PathLike, num_rows: int = 8) -> Path:
    """Analogies (CVAE): each row is a test image, then its style z = mu(x, y) decoded under
    every label, so the row shows the same handwriting for each digit."""
    shape, C = image_shape(experiment), _check_labels(experiment, "analogies")
    x, y = _images(experiment)
    x, y = x[:num_rows], y[:num_rows]
    z = encode(experiment, x, y)[:, None, :].expand(-1, C, -1)         # [rows, C, M]
    decoded = decode(experiment, z, torch.arange(C, device=z.device))
    images = _grid(torch.cat([x[:, None, :], decoded], 1), shape)
    return plot_image_grid(images, path, column_labels=["x", *map(str, range(C))],
                           xlabel="label y", title=f"{experiment.entry.name}: the style of each "
                                                   f"test image decoded under every label")


VAE_PLOTS: dict[str, Callable[[Experiment, str | os.PathLike], Path]] = {
    "samples": plot_samples, "reconstructions": plot_reconstructions,
    "interpolation": plot_interpolation, "arithmetic": plot_arithmetic,
    "manifold": plot_manifold, "latents": plot_latents,
}
CVAE_PLOTS: dict[str, Callable[[Experiment, str | os.PathLike], Path]] = {
    "samples": plot_samples, "reconstructions": plot_reconstructions,
    "interpolation": plot_interpolation, "latents": plot_latents,
    "analogies": plot_analogies,
}
