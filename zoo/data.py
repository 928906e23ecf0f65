"""Data sets in memory as float32 tensors, split into train and test.

``load_data(name)`` loads a named data set (``DATASETS`` lists them) and ``load_data(file=...)``
the user's own numeric table (``.csv`` with a header row, or a 2-D ``.npy`` array, read by
:mod:`zoo.tables`). Rows are data points: ``x: [N, D]`` float32, labels ``y: [N]`` int64 where
the data set has them.

The synthetic data sets come with their ground truth (``Data.truth``), drawn by the generators
of :mod:`zoo.synthetic` from a private random stream, so the same seed gives the same data and
the global torch seed is neither used nor changed.

Every mistake in the input raises :class:`~zoo.errors.ZooError` naming the problem, the place
(file, data row, column) and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoo.errors import ZooError
from zoo.synthetic import synthetic_gmm, synthetic_ppca
from zoo.tables import read_csv, read_npy

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits: 1797 images, pixels in [0, 1], 10 classes",
    "mnist": "MNIST handwritten digits: 60000 train + 10000 test images of 28x28, 10 classes",
    "fashion-mnist": "Fashion-MNIST clothing: 60000 train + 10000 test images of 28x28, 10 classes",
    "synthetic-ppca": "probabilistic PCA x = W z + b + noise, D=10, M=2, N=2000, truth W, b, sigma",
    "synthetic-gmm": "Gaussian mixture, K=3 full-covariance components in 2-D, N=1500, truth given",
    "synthetic-expnormal": "z ~ Exponential(1), x = z + N(0, 1): N=2000 values of x, 1 column",
}

_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DEFAULT_DATA_DIR = "~/.cache/zoo/data"
_DOWNLOAD_TIMEOUT_S = 30.0

# Fixed ground truth of the synthetic data sets: the truth does not change with the seed, which
# only draws the data points and the split.
_PPCA_DATA_DIM, _PPCA_LATENT_DIM, _PPCA_SIGMA, _PPCA_NUM_DATA = 10, 2, 0.5, 2000
_PPCA_TRUTH_SEED = 0
_GMM_TRUTH = {
    "weights": [0.5, 0.3, 0.2],
    "means": [[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]],
    "covariances": [[[1.0, 0.6], [0.6, 1.0]],
                    [[1.0, -0.4], [-0.4, 0.6]],
                    [[0.5, 0.0], [0.0, 1.5]]],
}
_GMM_NUM_DATA = 1500
_EXPNORMAL_NUM_DATA = 2000

LARGEST_VALUE = 1e15
"""The largest magnitude of a value in a user table without ``standardize``: the models sum
squares of values in float32, which overflows (3.4e38) soon beyond it."""


@dataclass(frozen=True, eq=False)
class Data:
    """A data set in memory, split into train and test.

    ``x_*``: ``[N, D]`` float32 (images flattened row by row), ``y_*``: ``[N]`` int64 class labels
    or None. ``x_test`` and ``y_test`` are None without a test split. ``truth`` holds the
    generating parameters of synthetic data, in the original (unstandardized) units. With
    standardization, ``x = (x_raw - shift) / scale`` with ``shift``, ``scale``: ``[D]`` fitted on
    the training rows. ``columns`` are the header names of a csv file.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    truth: dict[str, torch.Tensor] = field(default_factory=dict)
    columns: tuple[str, ...] | None = None
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    @property
    def data_dim(self) -> int:
        """D, the number of columns of x."""
        return self.x_train.shape[1]

    @property
    def num_train(self) -> int:
        """The number of training rows."""
        return self.x_train.shape[0]


def load_data(name: str | None = None, *, file: str | os.PathLike | None = None,
              data_dir: str | None = None, test_fraction: float = 0.1, standardize: bool = False,
              seed: int = 0, num_data: int | None = None, drop_constant: bool = False) -> Data:
    """Load a named data set or a file into memory, split into train and test.

    Give exactly one of ``name`` (a key of ``DATASETS``) and ``file`` (a ``.csv`` with a header
    row, or a 2-D ``.npy`` array; the data set is then named after the file's stem).

    ``test_fraction`` in [0, 1): that share of the rows (rounded, at least one) goes to the test
    split, drawn at random with ``seed``; 0 means no test split. mnist and fashion-mnist keep their
    official test set as the test split whatever the fraction, except that 0 drops it.

    ``num_data``: the synthetic data sets draw that many points; the others keep a random subset
    (drawn with ``seed``) of that many rows before splitting (for mnist and fashion-mnist, of the
    training images). ``data_dir``: where mnist and fashion-mnist live (else the environment
    variable ``ZOO_DATA``, else ``~/.cache/zoo/data``, downloading there when needed).
    ``standardize``: shift and scale every column to mean 0 and standard deviation 1 on the
    training rows; the test rows use the same shift and scale. ``drop_constant``: leave out the
    columns that are constant on the training rows (the border pixels of the digits, say),
    before standardizing.
    """
    if (name is None) == (file is None):
        raise ZooError("give either a data set name or a file, not both"
                       if name is not None else "give a data set name or a file to load")
    if name is not None and name not in DATASETS:
        raise ZooError(f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if not 0 <= test_fraction < 1:
        raise ZooError(f"test_fraction must be in [0, 1), got {test_fraction}: use 0 for no test "
                       "split or e.g. 0.1 to hold out a tenth of the rows")
    if num_data is not None and num_data < 2:
        raise ZooError(f"num_data must be at least 2, got {num_data}")
    if data_dir is not None and name not in _TORCHVISION_CLASSES:
        raise ZooError(f"--data-dir applies to {' and '.join(_TORCHVISION_CLASSES)}, not to "
                       f"{name or 'a --data file'}: drop it")
    generator = torch.Generator().manual_seed(seed)
    if file is not None:
        data = _subset(_load_file(Path(file)), num_data, generator)
    elif name == "synthetic-ppca":
        data = _load_synthetic_ppca(num_data or _PPCA_NUM_DATA, seed)
    elif name == "synthetic-gmm":
        data = _load_synthetic_gmm(num_data or _GMM_NUM_DATA, seed)
    elif name == "synthetic-expnormal":
        data = _load_synthetic_expnormal(num_data or _EXPNORMAL_NUM_DATA, seed)
    elif name == "digits":
        data = _subset(_load_digits(), num_data, generator)
    else:
        data = _subset(_load_torchvision(name, data_dir), num_data, generator)
    data = _split(data, test_fraction, generator)
    data = _drop_constant(data) if drop_constant else data
    if standardize:
        return _standardize(data)
    if file is not None:
        _check_magnitude(data)
    return data


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A binary image drawn pixel by pixel, x_bin ~ Bernoulli(x), from grey levels in [0, 1].

    Drawing afresh each epoch is the dynamic binarization of Burda et al. (2015); a fixed
    ``generator`` gives the one seeded binarization used for evaluation.
    """
    return torch.bernoulli(x, generator=generator)


def _load_synthetic_ppca(num_data: int, seed: int) -> Data:
    truth_generator = torch.Generator().manual_seed(_PPCA_TRUTH_SEED)
    W = torch.randn(_PPCA_DATA_DIM, _PPCA_LATENT_DIM, generator=truth_generator)
    b = torch.randn(_PPCA_DATA_DIM, generator=truth_generator)
    x, truth = synthetic_ppca(num_data, W, b, _PPCA_SIGMA, seed=seed)
    del truth["z"]  # per-row latents would not follow the split; the truth is the parameters
    return Data("synthetic-ppca", x, None, None, None, truth=truth)


def _load_synthetic_gmm(num_data: int, seed: int) -> Data:
    x, truth = synthetic_gmm(num_data, *(torch.tensor(_GMM_TRUTH[key])
                                         for key in ("weights", "means", "covariances")),
                             seed=seed)
    z = truth.pop("z")  # the component of each row becomes its label, split with it
    return Data("synthetic-gmm", x, z, None, None, num_classes=len(_GMM_TRUTH["weights"]),
                truth=truth)


def _load_synthetic_expnormal(num_data: int, seed: int) -> Data:
    """x_n = z_n + eps_n with z_n ~ Exponential(1) and eps_n ~ N(0, 1), as a table [N, 1]."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(num_data).exponential_(1.0, generator=generator)
    x = z + torch.randn(num_data, generator=generator)
    return Data("synthetic-expnormal", x[:, None], None, None, None)


def _load_digits() -> Data:
    from sklearn.datasets import load_digits  # imported here: slow, and only this loader needs it

    digits = load_digits()
    x = torch.from_numpy(digits.data).float() / 16
    y = torch.from_numpy(digits.target).long()
    return Data("digits", x.contiguous(), y, None, None, image_shape=(8, 8), num_classes=10)


def _load_torchvision(name: str, data_dir: str | None) -> Data:
    """MNIST or Fashion-MNIST with its official test set; the files are read, not transformed."""
    from torchvision import datasets  # imported here: slow, and only this loader needs it

    dataset_class = getattr(datasets, _TORCHVISION_CLASSES[name])
    root = Path(data_dir or os.environ.get("ZOO_DATA") or _DEFAULT_DATA_DIR).expanduser()
    try:
        splits = [dataset_class(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:
        splits = _download(name, dataset_class, root)
    x_train, x_test = (split.data.reshape(len(split.data), -1).float() / 255 for split in splits)
    y_train, y_test = (split.targets.long() for split in splits)
    return Data(name, x_train, y_train, x_test, y_test, image_shape=(28, 28), num_classes=10)


def _download(name: str, dataset_class, root: Path) -> list:
    """Both splits with ``download=True``, the network wait capped; ZooError when it fails.

    A failed download removes the empty folders it made, so a mistyped root leaves no trace.
    """
    raw = root / dataset_class.__name__ / "raw"
    new_folders = [folder for folder in (raw, raw.parent, root) if not folder.exists()]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen has no timeout of its own
    try:
        return [dataset_class(root, train=train, download=True) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        for folder in new_folders:
            with contextlib.suppress(OSError):  # not empty: keep what was downloaded
                folder.rmdir()
        raise ZooError(
            f"{name} is not in {raw}/ and could not be downloaded ({reason}): put the four files "
            f"{', '.join(_IDX_FILES)} in DIR/{dataset_class.__name__}/raw/ and pass --data-dir DIR "
            "or set ZOO_DATA=DIR, or run once on a machine with network so that torchvision "
            "downloads them") from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _load_file(path: Path) -> Data:
    if not path.exists():
        raise ZooError(f"no such file: {path}")
    if not path.is_file():
        raise ZooError(f"{path} is not a file: give a .csv or .npy file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, columns = read_csv(path)
    elif suffix == ".npy":
        x, columns = read_npy(path), None
    else:
        raise ZooError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; use .csv "
                       "(with a header row of column names) or .npy (a 2-D numeric array)")
    return Data(path.stem, x, None, None, None, columns=columns)


def _check_magnitude(data: Data) -> None:
    """Refuse columns holding values beyond ``LARGEST_VALUE`` in magnitude, naming them."""
    x = data.x_train if data.x_test is None else torch.cat([data.x_train, data.x_test])
    largest = x.abs().amax(dim=0)
    large = torch.nonzero(largest > LARGEST_VALUE).flatten().tolist()
    if large:
        names = [repr(data.columns[j]) if data.columns else str(j) for j in large]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ZooError(f"{data.name}: column(s) {shown}{'' if data.columns else ' (0-based)'} "
                       f"hold values up to {largest.max().item():.3g}, too large for the "
                       f"models' float32 arithmetic (beyond {LARGEST_VALUE:.0e}): pass "
                       f"--standardize, or rescale them")


def _subset(data: Data, num_data: int | None, generator: torch.Generator) -> Data:
    """Keep a random ``num_data`` of the training rows (in their original order)."""
    if num_data is None:
        return data
    if num_data > data.num_train:
        raise ZooError(f"num_data {num_data} is more than the {data.num_train} rows of "
                       f"{data.name}: ask for fewer")
    keep = torch.randperm(data.num_train, generator=generator)[:num_data].sort().values
    y_train = None if data.y_train is None else data.y_train[keep]
    return dataclasses.replace(data, x_train=data.x_train[keep], y_train=y_train)


def _split(data: Data, test_fraction: float, generator: torch.Generator) -> Data:
    """Move a random ``test_fraction`` of the rows to the test split (both keep row order)."""
    if data.x_test is not None:  # an official test set
        if test_fraction == 0:
            return dataclasses.replace(data, x_test=None, y_test=None)
        return data
    if test_fraction == 0:
        return data
    num_rows = data.num_train
    num_test = max(1, round(num_rows * test_fraction))
    if num_test >= num_rows:
        raise ZooError(f"test_fraction {test_fraction} leaves no training rows of the {num_rows} "
                       f"rows of {data.name}: lower it, or use 0 for no test split")
    order = torch.randperm(num_rows, generator=generator)
    test, train = order[:num_test].sort().values, order[num_test:].sort().values
    y = data.y_train
    return dataclasses.replace(
        data, x_train=data.x_train[train], x_test=data.x_train[test],
        y_train=None if y is None else y[train], y_test=None if y is None else y[test])


def _drop_constant(data: Data) -> Data:
    """The data without the columns that are constant on the training rows: they carry no
    information, and a density fitted to them is unbounded. Images become plain tables."""
    x = data.x_train
    keep = ~(x == x[0]).all(dim=0)
    if keep.all():
        return data
    columns = (None if data.columns is None else
               tuple(name for name, kept in zip(data.columns, keep.tolist(), strict=True) if kept))
    return dataclasses.replace(
        data, x_train=x[:, keep], x_test=None if data.x_test is None else data.x_test[:, keep],
        image_shape=None, columns=columns)


def _standardize(data: Data) -> Data:
    """Columns to mean 0 and standard deviation 1 on the training rows; test rows alike."""
    x = data.x_train
    constant = torch.nonzero((x == x[0]).all(dim=0)).flatten().tolist()
    if constant:
        names = [repr(data.columns[j]) if data.columns else str(j) for j in constant]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if not data.columns:
            shown += " (0-based)"
        raise ZooError(f"cannot standardize {data.name}: column(s) {shown} are constant on the "
                       "training rows (standard deviation 0); pass --drop-constant to leave "
                       "them out, or do not standardize")
    x64 = x.double()
    shift = x64.mean(dim=0)
    scale = x64.std(dim=0, correction=0)

    def apply(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else ((values.double() - shift) / scale).float()

    return dataclasses.replace(data, x_train=apply(data.x_train), x_test=apply(data.x_test),
                               shift=shift.float(), scale=scale.float())
