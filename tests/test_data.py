"""Data loading: shapes, splits, user files and their errors, and synthetic data against truth."""

import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from zoo.data import DATASETS, load_data
from zoo.errors import ZooError
from zoo.synthetic import synthetic_gmm, synthetic_ppca

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_digits_shapes_range_and_split():
    data = load_data("digits", test_fraction=0.1, seed=0)
    assert (data.num_train, data.x_test.shape[0]) == (1617, 180)  # 180 = round(1797 * 0.1)
    assert data.data_dim == 64 and data.image_shape == (8, 8) and data.num_classes == 10
    for x in (data.x_train, data.x_test):
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert x.min() == 0 and x.max() == 1
    for y in (data.y_train, data.y_test):
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    whole = load_data("digits", test_fraction=0)
    assert whole.x_test is None and whole.y_test is None and whole.num_train == 1797
    # the split is a partition of the rows: every row lands in exactly one of the two
    rows = torch.cat([data.x_train, data.x_test])
    assert torch.equal(torch.unique(rows, dim=0), torch.unique(whole.x_train, dim=0))
    assert rows.shape[0] == whole.num_train


def test_split_is_reproducible_by_seed():
    first, again = load_data("digits", seed=3), load_data("digits", seed=3)
    other = load_data("digits", seed=4)
    assert torch.equal(first.x_test, again.x_test) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_test, other.x_test)


def test_num_data_subsets_real_data_and_sizes_synthetic_data():
    assert load_data("digits", num_data=100, test_fraction=0.2).num_train == 80
    assert load_data("synthetic-ppca", num_data=300, test_fraction=0).num_train == 300
    with pytest.raises(ZooError, match="more than the 1797 rows of digits"):
        load_data("digits", num_data=5000)


def test_csv_round_trip(tmp_path):
    values = np.random.default_rng(0).normal(size=(20, 3))
    lines = ["age, height ,x3"] + [",".join(repr(float(v)) for v in row) for row in values]
    path = write(tmp_path, "people.csv", "\n".join(lines) + "\n\n")
    data = load_data(file=path, test_fraction=0)
    assert data.name == "people" and data.columns == ("age", "height", "x3")
    assert data.y_train is None and data.image_shape is None
    assert torch.equal(data.x_train, torch.tensor(values, dtype=torch.float32))
    split = load_data(file=str(path), test_fraction=0.25)
    assert (split.num_train, split.x_test.shape[0]) == (15, 5)


def test_npy_round_trip(tmp_path):
    values = np.arange(12, dtype=np.int64).reshape(6, 2)
    np.save(tmp_path / "table.npy", values)
    data = load_data(file=tmp_path / "table.npy", test_fraction=0)
    assert data.name == "table" and data.columns is None
    assert data.x_train.dtype == torch.float32
    assert torch.equal(data.x_train, torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("a,b\n", "header but no data rows"),
    ("a,b,c,d\n" + "1,2,3,4\n" * 6 + "1,2,3\n", r"data row 7 \(line 8\) has 3 cells, the header "
                                                r"has 4"),
    ("id,age\n" + "1,2\n" * 11 + "1,abc\n", r"data row 12 \(line 13\), column 'age': 'abc' is "
                                            "not a number"),
    ("x1,x2,x3\n" + "1,2,3\n" * 4 + "1,2,nan\n", r"data row 5 \(line 6\), column 'x3' is nan: "
                                                  "remove or impute missing values"),
    ("x1,x2\n1,2\n3,-inf\n", r"data row 2 \(line 3\), column 'x2' is -inf"),
    ("x1,x2\n1,2\n3,\n", r"data row 2 \(line 3\), column 'x2' is empty"),
    ("x1,x2\n1,2\n3,1e40\n", r"column 'x2' is 1e\+40, beyond the float32 range"),
    ("x1,x2\n1,2\n", "1 data row"),
    ("1,2\n3,4\n5,6\n", "numbers, not a header: add a header row"),
    ("a,,c\n1,2,3\n4,5,6\n", "column 2 of the header has no name"),
    ("a,b,a\n1,2,3\n4,5,6\n", "repeats the column name"),
])
def test_bad_csv_is_refused_with_its_place(tmp_path, text, match):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(ZooError, match=match) as error:
        load_data(file=path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("array, match", [
    (np.zeros(100), r"got shape \(100,\); save it as x\[:, None\] for one column"),
    (np.zeros((4, 2, 2)), r"got shape \(4, 2, 2\)"),
    (np.zeros((5, 0)), "no columns"),
    (np.zeros((1, 3)), "1 data row"),
    (np.array([["a", "b"], ["c", "d"]]), "expected a numeric array"),
    (np.array([[1.0, 2.0], [3.0, np.nan]]), r"entry \[1, 1\] .* is nan"),
])
def test_bad_npy_is_refused(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ZooError, match=match):
        load_data(file=tmp_path / "bad.npy")


def test_bad_files_and_arguments_are_refused(tmp_path):
    with pytest.raises(ZooError, match="no such file: .*missing.csv"):
        load_data(file=tmp_path / "missing.csv")
    with pytest.raises(ZooError, match=r"unknown file type '.txt'.*use .csv"):
        load_data(file=write(tmp_path, "table.txt", "a\n1\n2\n"))
    with pytest.raises(ZooError, match="could not be read as a .npy"):
        load_data(file=write(tmp_path, "broken.npy", "not numpy"))
    with pytest.raises(ZooError, match="not both"):
        load_data("digits", file=tmp_path / "x.csv")
    with pytest.raises(ZooError, match="give a data set name or a file"):
        load_data()
    for fraction in (1.0, -0.1, float("nan")):
        with pytest.raises(ZooError, match=r"test_fraction must be in \[0, 1\)"):
            load_data("digits", test_fraction=fraction)
    with pytest.raises(ZooError, match="leaves no training rows"):
        load_data(file=write(tmp_path, "two.csv", "a\n1\n2\n"), test_fraction=0.9)


def test_unknown_name_lists_the_valid_names():
    message = ("unknown data set 'digit'; choose one of: digits, fashion-mnist, mnist, "
               "synthetic-expnormal, synthetic-gmm, synthetic-ppca")
    with pytest.raises(ZooError, match=message):
        load_data("digit")
    assert sorted(DATASETS) == ["digits", "fashion-mnist", "mnist", "synthetic-expnormal",
                                "synthetic-gmm", "synthetic-ppca"]


def test_standardize_fits_on_train_and_applies_to_test(tmp_path):
    values = np.random.default_rng(1).normal([5.0, -3.0, 100.0], [2.0, 0.1, 30.0], size=(50, 3))
    np.save(tmp_path / "t.npy", values)
    raw = load_data(file=tmp_path / "t.npy", test_fraction=0.2, seed=7)
    data = load_data(file=tmp_path / "t.npy", test_fraction=0.2, seed=7, standardize=True)
    torch.testing.assert_close(data.x_train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train.std(0, correction=0), torch.ones(3))
    torch.testing.assert_close(data.shift, raw.x_train.mean(0))
    torch.testing.assert_close(data.x_test, (raw.x_test - data.shift) / data.scale)
    assert raw.shift is None and raw.scale is None


def test_standardize_refuses_constant_columns(tmp_path):
    path = write(tmp_path, "c.csv", "a,flag,b\n1,0,2\n3,0,5\n4,0,1\n")
    with pytest.raises(ZooError, match="column\\(s\\) 'flag' are constant.*--drop-constant"):
        load_data(file=path, test_fraction=0, standardize=True)
    assert load_data(file=path, test_fraction=0).num_train == 3  # constant columns are allowed
    dropped = load_data(file=path, test_fraction=0, standardize=True, drop_constant=True)
    assert dropped.columns == ("a", "b") and dropped.data_dim == 2
    torch.testing.assert_close(dropped.x_train.std(0, correction=0), torch.ones(2))


def test_drop_constant_leaves_out_the_digits_border_pixels_in_both_splits():
    raw, data = (load_data("digits", drop_constant=flag) for flag in (False, True))
    constant = (raw.x_train == raw.x_train[0]).all(0)
    assert 0 < constant.sum() < 10 and data.data_dim == 64 - constant.sum()
    torch.testing.assert_close(data.x_test, raw.x_test[:, ~constant])
    assert data.image_shape is None and not (data.x_train == data.x_train[0]).all(0).any()


def test_synthetic_ppca_covariance_matches_truth():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    W = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.5]])
    b = torch.tensor([1.0, -2.0, 0.5])
    num_data, sigma = 20000, 0.5
    x, truth = synthetic_ppca(num_data, W, b, sigma, seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG was not used
    assert torch.equal(x, synthetic_ppca(num_data, W, b, sigma, seed=0)[0])
    assert x.shape == (num_data, 3) and truth["z"].shape == (num_data, 2)
    assert set(truth) == {"W", "b", "sigma", "z"}
    cov = (W @ W.T + sigma**2 * torch.eye(3)).double()
    x = x.double()
    # standard errors of the sample mean and covariance of Gaussian data
    mean_se = (cov.diagonal() / num_data).sqrt()
    assert ((x.mean(0) - b.double()).abs() < 5 * mean_se).all()
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / num_data).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 5 * cov_se).all()


def test_synthetic_gmm_frequencies_and_means_match_truth():
    weights = torch.tensor([0.6, 0.3, 0.1])
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    covariances = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[2.0, 0.0], [0.0, 0.5]],
                                [[1.0, -0.9], [-0.9, 1.0]]])
    num_data = 20000
    x, truth = synthetic_gmm(num_data, weights, means, covariances, seed=1)
    z = truth["z"]
    assert x.shape == (num_data, 2) and z.dtype == torch.int64
    assert torch.equal(x, synthetic_gmm(num_data, weights, means, covariances, seed=1)[0])
    counts = torch.bincount(z, minlength=3).double()
    frequency_se = (weights * (1 - weights) / num_data).sqrt()
    assert ((counts / num_data - weights).abs() < 5 * frequency_se).all()
    for k in range(3):
        mean_se = (covariances[k].diagonal() / counts[k]).sqrt()
        assert ((x[z == k].mean(0) - means[k]).abs() < 5 * mean_se).all()


@pytest.mark.parametrize("call, match", [
    (lambda: synthetic_ppca(10, torch.ones(3), torch.ones(3), 1.0), r"W must be a matrix"),
    (lambda: synthetic_ppca(10, torch.ones(3, 2), torch.ones(2), 1.0), r"b must have shape"),
    (lambda: synthetic_ppca(10, torch.ones(3, 2), torch.ones(3), 0.0), "must be positive"),
    (lambda: synthetic_ppca(0, torch.ones(3, 2), torch.ones(3), 1.0), "positive integer"),
    (lambda: synthetic_gmm(10, torch.tensor([0.5, 0.6]), torch.zeros(2, 1), torch.ones(2, 1, 1)),
     "sum to 1"),
    (lambda: synthetic_gmm(10, torch.tensor([1.5, -0.5]), torch.zeros(2, 1), torch.ones(2, 1, 1)),
     "non-negative"),
    (lambda: synthetic_gmm(10, torch.ones(2) / 2, torch.zeros(3, 1), torch.ones(2, 1, 1)),
     r"means must have shape \[K, D\] with K = 2"),
    (lambda: synthetic_gmm(10, torch.ones(2) / 2, torch.zeros(2, 2), torch.ones(2, 1, 1)),
     r"covariances must have shape"),
    (lambda: synthetic_gmm(10, torch.ones(1), torch.zeros(1, 2),
                           torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])),
     r"covariances\[0\] is not positive definite"),
    (lambda: synthetic_gmm(10, torch.ones(1), torch.zeros(1, 2),
                           torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])),
     r"covariances\[0\] is not symmetric"),
])
def test_synthetic_generators_refuse_bad_parameters(call, match):
    with pytest.raises(ZooError, match=match):
        call()


def test_synthetic_data_sets():
    ppca = load_data("synthetic-ppca")
    assert ppca.x_train.shape == (1800, 10) and ppca.x_test.shape == (200, 10)
    assert ppca.y_train is None and set(ppca.truth) == {"W", "b", "sigma"}
    assert torch.equal(load_data("synthetic-ppca", seed=5).truth["W"], ppca.truth["W"])
    gmm = load_data("synthetic-gmm", test_fraction=0)
    assert gmm.x_train.shape == (1500, 2) and gmm.num_classes == 3
    assert gmm.y_train.dtype == torch.int64 and set(gmm.y_train.tolist()) == {0, 1, 2}
    assert set(gmm.truth) == {"weights", "means", "covariances"}


def mnist_root() -> Path:
    root = Path(os.environ.get("ZOO_DATA") or SHARED_DATA)
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"no MNIST in {root}/MNIST/raw/")
    return root


def test_mnist_loads_from_a_data_dir():
    data = load_data("mnist", data_dir=str(mnist_root()))
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.min() == 0 and data.x_train.max() == 1
    assert data.image_shape == (28, 28) and data.num_classes == 10
    assert abs(float(data.x_train.mean()) - 0.1307) < 1e-4
    assert load_data("mnist", data_dir=str(mnist_root()), test_fraction=0).x_test is None


def test_missing_fashion_mnist_says_where_and_how(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision does before downloading
        raise URLError("network unreachable")

    monkeypatch.setattr(datasets.FashionMNIST, "download", offline)
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    with pytest.raises(ZooError) as error:
        load_data("fashion-mnist")
    message = str(error.value)
    assert f"{tmp_path}/FashionMNIST/raw/" in message and "network unreachable" in message
    for needed in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "--data-dir DIR",
                   "ZOO_DATA=DIR", "network"):
        assert needed in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the failed attempt left no empty folders


def test_synthetic_expnormal_has_the_moments_of_its_model():
    """x = z + eps with z ~ Exponential(1), eps ~ N(0, 1): mean 1 and variance 1 + 1 = 2."""
    data = load_data("synthetic-expnormal", test_fraction=0)
    x = data.x_train[:, 0]
    assert data.x_train.shape == (2000, 1)
    assert abs(x.mean() - 1) < 4 * (2 / 2000) ** 0.5
    assert abs(x.var() - 2) < 0.25  # sd of the sample variance: sqrt((mu4 - sigma^4) / N) ~ 0.06
