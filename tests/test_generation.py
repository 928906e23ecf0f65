"""Generation and latent-space tools: every plot kind of the VAE and the CVAE through the
``zoo`` command, ``zoo sample`` to PNG and NPY, refused labels and kinds, the geometry
helpers (spherical interpolation, class means, principal components) against references, and
every figure of a model on a GPU (where there is one)."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from zoo.cli import main
from zoo.experiment import load_run
from zoo.figures.images import (
    CVAE_PLOTS,
    VAE_PLOTS,
    class_means,
    mosaic,
    principal_components,
    slerp,
)
from zoo.generation import sample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "2", "--batch-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Briefly trained runs on digits: a VAE with a 2-D latent space (so that the manifold can
    be drawn), one with the default 8-D latent space, and a CVAE."""
    root = tmp_path_factory.mktemp("runs")
    commands = {"vae2": ["vae", "--latent-dim", "2"], "vae8": ["vae"], "cvae": ["cvae"]}
    for name, command in commands.items():
        assert main(["train", *command, "--out", str(root / name), *TINY]) == 0
    return {name: root / name for name in commands}


def _fails_with(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err


def _assert_png(path):
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 2000, path


@pytest.mark.parametrize("run, kinds", [("vae2", VAE_PLOTS), ("cvae", CVAE_PLOTS)])
def test_every_plot_kind_writes_a_png(run_dirs, capsys, run, kinds):
    for kind in kinds:
        capsys.readouterr()
        assert main(["plot", str(run_dirs[run]), "--kind", kind]) == 0, kind
        path = run_dirs[run] / "figures" / f"{kind}.png"
        assert capsys.readouterr().out.strip() == str(path)
        _assert_png(path)


def test_plot_kinds_of_each_model():
    assert set(VAE_PLOTS) == {"samples", "reconstructions", "interpolation", "arithmetic",
                              "manifold", "latents"}
    assert set(CVAE_PLOTS) == {"samples", "reconstructions", "interpolation", "latents",
                               "analogies"}


def test_latents_of_an_8d_space_and_out_path(run_dirs, tmp_path):
    out = tmp_path / "deep" / "latents.png"
    assert main(["plot", str(run_dirs["vae8"]), "--kind", "latents", "--out", str(out)]) == 0
    _assert_png(out)


def test_manifold_needs_a_2d_latent_space(run_dirs, capsys):
    _fails_with(capsys, ["plot", str(run_dirs["vae8"]), "--kind", "manifold"],
                "this run has M = 8 latent dimensions; train with --latent-dim 2")


def test_analogies_are_for_the_cvae_only(run_dirs, capsys):
    _fails_with(capsys, ["plot", str(run_dirs["vae2"]), "--kind", "analogies"],
                "unknown plot kind 'analogies' for model vae; choose one of: samples")


def test_sample_png_and_npy(run_dirs, tmp_path, capsys):
    run = run_dirs["vae8"]
    capsys.readouterr()
    training_figure = (run / "figures" / "samples.png").read_bytes()
    for number in (1, 2):  # each call a new file, never the training figure
        assert main(["sample", str(run), "--n", "10"]) == 0
        default = run / "samples" / f"samples-{number:03d}.png"
        assert capsys.readouterr().out.strip() == str(default)
        _assert_png(default)
    assert (run / "figures" / "samples.png").read_bytes() == training_figure
    _fails_with(capsys, ["sample", str(run), "--out", str(run / "figures" / "samples.png")],
                "is a figure of the training run; choose another --out")
    arrays = []
    for name in ("a.npy", "b.npy"):
        assert main(["sample", str(run), "--n", "10", "--out", str(tmp_path / name)]) == 0
        arrays.append(np.load(tmp_path / name))
    assert arrays[0].shape == (10, 8, 8) and arrays[0].dtype == np.float32
    assert 0 <= arrays[0].min() and arrays[0].max() <= 1
    np.testing.assert_array_equal(*arrays)  # seeded with the run's seed
    assert arrays[0].std(0).mean() > 0.01   # different z, different images


def test_cvae_samples_follow_the_label(run_dirs, tmp_path):
    """With the run's seed every label decodes the same z: label 3 twice gives the same means,
    another label different ones; without --label the labels take turns. (That the labels
    mean the right digits after training is tested in test_vae.py.)"""
    run = run_dirs["cvae"]
    arrays = {}
    for name, label in (("three", "3"), ("again", "3"), ("seven", "7")):
        path = tmp_path / f"{name}.npy"
        assert main(["sample", str(run), "--n", "20", "--label", label, "--out", str(path)]) == 0
        arrays[name] = np.load(path)
    np.testing.assert_array_equal(arrays["three"], arrays["again"])
    assert np.abs(arrays["three"] - arrays["seven"]).mean() > 0.01  # measured 0.036
    assert main(["sample", str(run), "--n", "20", "--out", str(tmp_path / "mixed.npy")]) == 0
    mixed = np.load(tmp_path / "mixed.npy")
    np.testing.assert_allclose(mixed[3], arrays["three"][3], atol=1e-6)
    np.testing.assert_allclose(mixed[7], arrays["seven"][7], atol=1e-6)


@pytest.mark.parametrize("run, argv, message", [
    ("vae8", ["--label", "3"], "--label applies to label-conditioned models (cvae)"),
    ("cvae", ["--label", "10"], "--label must be a class of digits, from 0 to 9; got 10"),
    ("cvae", ["--label", "-1"], "from 0 to 9; got -1"),
    ("vae8", ["--n", "0"], "--n must be at least 1"),
    ("vae8", ["--out", "samples.jpg"], "--out must end in .png"),
])
def test_bad_sample_requests_are_refused(run_dirs, capsys, run, argv, message):
    _fails_with(capsys, ["sample", str(run_dirs[run]), *argv], message)


def test_slerp_keeps_the_norm_and_ends_at_the_endpoints():
    torch.manual_seed(0)
    z0 = torch.randn(16)
    z1 = torch.randn(16)
    z1 = z1 / z1.norm() * z0.norm()
    t = torch.linspace(0, 1, 7)
    path = slerp(z0, z1, t)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    torch.testing.assert_close(path.norm(dim=-1), z0.norm().expand(7))
    linear_midpoint = (z0 + z1) / 2
    assert linear_midpoint.norm() < 0.9 * z0.norm()  # why spherical paths exist
    angles = torch.arccos((path[1:] * path[:-1]).sum(-1) / z0.norm() ** 2)
    torch.testing.assert_close(angles, angles[0].expand(6), atol=1e-4, rtol=0)  # constant speed
    torch.testing.assert_close(slerp(z0, 2 * z0, t), z0 + t[:, None] * z0)  # parallel: linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_of_codes_in_the_same_or_opposite_directions_is_the_linear_path(dtype):
    """sin(omega) = 0 there: no division by it, and no great circle to pick for opposite codes."""
    torch.manual_seed(0)
    z0 = torch.randn(16, dtype=dtype)
    t = torch.linspace(0, 1, 7, dtype=dtype)
    for z1 in (z0, 2 * z0, -z0, -3 * z0):
        torch.testing.assert_close(slerp(z0, z1, t), (1 - t[:, None]) * z0 + t[:, None] * z1)


def test_class_means_and_principal_components():
    torch.manual_seed(0)
    codes = torch.randn(300, 5) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    y = torch.randint(0, 4, (300,))
    means = class_means(codes, y, 5)
    for label in range(4):
        torch.testing.assert_close(means[label], codes[y == label].mean(0))
    assert torch.isnan(means[4]).all()  # no images of class 4
    projected = principal_components(codes)
    reference = torch.from_numpy(PCA(2).fit_transform(codes.double().numpy())).float()
    signs = torch.sign((projected * reference).sum(0))
    torch.testing.assert_close(projected, reference * signs, atol=1e-4, rtol=1e-4)


def test_mosaic_places_each_image():
    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2) / 24
    canvas = mosaic(images, pad=1)
    assert canvas.shape == (2 * 3 + 1, 3 * 3 + 1)
    np.testing.assert_array_equal(canvas[4:6, 7:9], images[1, 2].numpy())
    assert (canvas[0] == 0.5).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("run, kinds", [("vae2", VAE_PLOTS), ("cvae", CVAE_PLOTS)])
def test_every_figure_and_sample_of_a_model_on_the_gpu(run_dirs, tmp_path, run, kinds):
    experiment = load_run(run_dirs[run])
    experiment.model.cuda().eval(), experiment.guide.cuda().eval()
    for kind, plot in kinds.items():
        _assert_png(plot(experiment, tmp_path / f"{kind}.png"))
    means = sample(experiment, 10, 3 if run == "cvae" else None)
    assert means.shape == (10, 64) and means.device.type == "cuda"
