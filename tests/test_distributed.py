"""Several processes against one (torch.distributed, gloo, 2 ranks on the CPU): the same
parameters after training, the same evaluation, sound run folders, one line for bad set-ups.

The ranks are forked from the test process (their environment as torchrun would set it), so
they start in milliseconds; the command-line tests start them through ``--nproc``.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from zoo import distributed, runs
from zoo.cli import main
from zoo.evaluate import log_likelihood
from zoo.experiment import build_experiment, load_run, make_config, train_run
from zoo.train import fit

TOLERANCE = 1e-5
"""Largest difference allowed between parameters trained by 2 ranks and by 1 process: float32
sums taken in another order (about 1e-7 relative per step) over a few dozen Adam steps of size
lr <= 1e-2; a rank with other draws or another batch moves a parameter by about lr per step."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_rank(rank, size, port, function, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        function(*args)
    finally:
        distributed.shutdown()


def run_ranks(function, *args, size=2):
    """Run ``function(*args)`` in ``size`` forked processes joined by gloo."""
    mp.start_processes(_as_rank, args=(size, _free_port(), function, args), nprocs=size,
                       start_method="fork")


def _parameters(experiment):
    return {**{f"model.{k}": v for k, v in experiment.model.state_dict().items()},
            **{f"guide.{k}": v for k, v in experiment.guide.state_dict().items()}}


def _train(config):
    experiment = build_experiment(config, quiet=True)
    initial = {name: value.clone() for name, value in _parameters(experiment).items()}
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, transform=experiment.train_transform)
    return initial, _parameters(experiment)


def _train_each(configs, folder):
    for index, config in enumerate(configs):
        _, trained = _train(config)
        if distributed.is_main():
            torch.save(trained, folder / f"{index}.pt")


def _configs(model, guide, train):
    objectives = [{"name": "elbo"}, {"name": "iwae", "num_particles": 4},
                  {"name": "dreg", "num_particles": 4}]
    return [make_config(model, guide=guide, objective=objective, train=train)
            for objective in objectives]


def _assert_two_ranks_train_like_one(configs, tmp_path):
    run_ranks(_train_each, configs, tmp_path)
    for index, config in enumerate(configs):
        initial, alone = _train(config)
        together = torch.load(tmp_path / f"{index}.pt", weights_only=True)
        moved = max((alone[name] - initial[name]).abs().max().item() for name in alone)
        assert moved > 100 * TOLERANCE, config["objective"]
        for name in alone:
            difference = (alone[name] - together[name]).abs().max().item()
            assert difference < TOLERANCE, (config["objective"]["name"], name, difference)


def test_two_ranks_train_ppca_like_one_process(tmp_path):
    """1800 training points in batches of 256: 7 batches split in two, and one of 8."""
    configs = _configs("ppca", "full", {"epochs": 2, "steps": None, "batch_size": 256,
                                        "lr": 0.01})
    _assert_two_ranks_train_like_one(configs, tmp_path)


@pytest.mark.slow
def test_two_ranks_train_the_binarized_digits_vae_like_one_process(tmp_path):
    """1617 training images in batches of 100, binarized afresh each epoch: 16 batches split
    in two and a last one of 17, which both ranks compute whole. Plain SGD: Adam divides each
    gradient by its running scale, so a decoder weight of a pixel that is never on, whose
    gradient is rounding noise, moves by about lr either way (13 of 4096 weights of the last
    layer, by up to 1e-4, after one epoch of IWAE(4) at lr 3e-3); SGD keeps rounding at its
    size (2.4e-7 after one epoch)."""
    configs = _configs("vae", "meanfield", {"epochs": 2, "batch_size": 100, "lr": 0.05,
                                            "optimizer": "sgd"})
    _assert_two_ranks_train_like_one(configs, tmp_path)


def _log_likelihood(config, out):
    experiment = build_experiment(config, quiet=True)
    estimate = log_likelihood(experiment.model, experiment.guide, experiment.data.x_train,
                              num_samples=64, max_elements=64 * 10 * 150, seed=5)
    if distributed.is_main():
        torch.save(estimate.__dict__, out)


def test_sharded_evaluation_equals_one_process(small_ppca_config, tmp_path):
    """12 chunks of 150 points, dealt to two ranks, each chunk on its own seeded stream."""
    run_ranks(_log_likelihood, small_ppca_config, tmp_path / "sharded.pt")
    _log_likelihood(small_ppca_config, tmp_path / "alone.pt")
    sharded, alone = (torch.load(tmp_path / f"{name}.pt", weights_only=True)
                      for name in ("sharded", "alone"))
    for key in alone:
        assert torch.equal(sharded[key], alone[key]), key
    other = build_experiment(small_ppca_config, quiet=True)
    reseeded = log_likelihood(other.model, other.guide, other.data.x_train, num_samples=64,
                              max_elements=64 * 10 * 150, seed=6)
    assert not torch.equal(reseeded.log_likelihood, alone["log_likelihood"])


@pytest.fixture
def as_rank_zero_of_two(monkeypatch):
    """The environment torchrun gives rank 0 of 2, without the other rank."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)


def _one_error_line(capsys, status, *phrases):
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("zoo: error: ") and error.count("\n") == 1, error
    for phrase in phrases:
        assert phrase in error


@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
def test_a_world_size_that_does_not_divide_the_batch_is_refused(
        launcher, request, capsys, tmp_path):
    argv = ["train", "ppca", "--batch-size", "5", "--epochs", "1", "--out", str(tmp_path / "r")]
    if launcher == "nproc":
        argv += ["--nproc", "2"]
    else:
        request.getfixturevalue("as_rank_zero_of_two")
    _one_error_line(capsys, main(argv), "--batch-size 5", "2 processes")
    assert not (tmp_path / "r").exists()


def test_a_missing_backend_is_refused(as_rank_zero_of_two, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda backend: False)
    status = main(["train", "ppca", "--epochs", "1", "--batch-size", "100", "--quiet",
                   "--out", str(tmp_path / "r")])
    _one_error_line(capsys, status, "backend gloo", "not available")


@pytest.mark.parametrize("device, phrase", [("tpu", "--device must be"),
                                            ("cuda", "CUDA")])
def test_an_unknown_or_absent_device_is_refused(device, phrase, capsys, tmp_path):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status = main(["train", "ppca", "--nproc", "2", "--device", device,
                   "--out", str(tmp_path / "r")])
    _one_error_line(capsys, status, phrase)


def test_nproc_must_be_positive(capsys, tmp_path):
    status = main(["train", "ppca", "--nproc", "0", "--out", str(tmp_path / "r")])
    _one_error_line(capsys, status, "--nproc must be at least 1")


def _zoo(*argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "zoo", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def _rank_process(parent: int, rank: int) -> int:
    """The process id of the launcher's child with ``RANK=rank``."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        for grandchild in [child, *Path(f"/proc/{child}/task/{child}/children")
                           .read_text().split()]:
            environment = Path(f"/proc/{grandchild}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environment:
                return int(grandchild)
    raise LookupError(f"no process with RANK={rank} under {parent}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_a_killed_rank_stops_the_run_and_one_process_resumes_it(small_ppca_config, tmp_path):
    run_dir = tmp_path / "killed"
    launcher = _zoo("train", "ppca", "--guide", "full", "--epochs", "10000", "--batch-size", "100",
                    "--lr", "0.01", "--lr-schedule", "constant", "--quiet", "--out", str(run_dir),
                    "--nproc", "2")
    deadline = time.monotonic() + 300
    while not (run_dir / runs.CHECKPOINT).exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)
    os.kill(_rank_process(launcher.pid, 1), signal.SIGKILL)
    _, error = launcher.communicate(timeout=120)
    assert launcher.returncode == 3
    assert error.count("\n") == 1 and error.startswith(
        "zoo: error: process 1 of 2 was stopped by signal SIGKILL"), error

    epochs = runs.load_checkpoint(run_dir)["epoch"] + 2
    assert main(["train", "--resume", str(run_dir), "--epochs", str(epochs), "--quiet"]) == 0
    config = make_config("ppca", guide="full", train={"epochs": epochs, "batch_size": 100,
                                                      "lr": 0.01, "lr_schedule": "constant"})
    whole = train_run(config, tmp_path / "whole", quiet=True)
    resumed, alone = _parameters(load_run(run_dir)), _parameters(load_run(whole))
    for name in alone:
        assert (resumed[name] - alone[name]).abs().max().item() < TOLERANCE, name


@pytest.mark.slow
def test_nproc_trains_and_evaluates_like_one_process(tmp_path):
    common = ["--epochs", "2", "--batch-size", "100", "--quiet"]
    for name, extra in (("two", ["--nproc", "2"]), ("one", [])):
        process = _zoo("train", "ppca", *common, "--out", str(tmp_path / name), *extra)
        assert process.communicate(timeout=300)[0].strip() == str(tmp_path / name)
    trained = [_parameters(load_run(tmp_path / name)) for name in ("one", "two")]
    for name in trained[0]:
        assert (trained[0][name] - trained[1][name]).abs().max().item() < TOLERANCE, name
    metrics = {}
    for processes, extra in (("2", ["--nproc", "2"]), ("1", [])):
        process = _zoo("evaluate", str(tmp_path / "two"), "--particles", "50", "--json", *extra)
        out, error = process.communicate(timeout=300)
        assert process.returncode == 0, error
        metrics[processes] = out
    assert metrics["1"] and metrics["1"] == metrics["2"]


def test_a_global_latent_variable_is_refused_under_several_processes(monkeypatch):
    """A site outside the data plate is shared by every point of the batch: its term does not
    split over the processes' shares, so it is refused with one line naming the site."""
    import pyro
    import pyro.distributions as dist

    from zoo.errors import ZooError

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shared = distributed.share_guide(guide)
    with pytest.raises(ZooError, match="latent site 'mu' lies outside the plate 'data'"):
        shared(torch.zeros(4))
