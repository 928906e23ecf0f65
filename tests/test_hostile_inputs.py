"""Hostile inputs and faults against the ``zoo`` command, one parametrized case or more per
class: each is refused with exit status 2 and one line on stderr, never a traceback, and a
refused command leaves the run folder as it was (file names and bytes); run folders take one
writer at a time; a run does not resume on data that changed since it was trained."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo import runs
from zoo.cli import main
from zoo.convergence import warn_if_diverged
from zoo.experiment import build_experiment
from zoo.train import fit

TINY = ["--steps", "30", "--batch-size", "200", "--quiet"]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's errors
        return exit_.code


def _refused(capsys, argv, message, folder: Path | None = None) -> None:
    """``zoo argv`` exits with 2 and one line naming ``message``; ``folder`` is unchanged."""
    before = _contents(folder) if folder is not None else None
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("zoo: error: ") and message in err, err
    if folder is not None:
        assert _contents(folder) == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny PPCA run trained on a csv table (30 steps), and that table."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    table = root / "table.csv"
    np.savetxt(table, rng.normal(size=(300, 4)), delimiter=",", header="a,b,c,d", comments="")
    assert main(["train", "ppca", "--data", str(table), "--latent-dim", "1", "--out",
                 str(root / "run"), *TINY]) == 0
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# Damage: a refused command on an existing run leaves it as it was.
@pytest.mark.parametrize("flags, message", [
    (["--steps", "-5"], "--steps must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--steps", "20"], "already trained 30 steps"),
    (["--steps", "30"], "nothing would train"),
])
def test_refused_resume_leaves_the_run_as_it_was(capsys, run, flags, message):
    _refused(capsys, ["train", "--resume", str(run), *flags], message, run)


def test_demo_into_a_run_folder_is_refused(capsys, run):
    _refused(capsys, ["demo", "--out", str(run)], "is a run folder", run)


def test_force_replaces_the_whole_older_run(capsys, run, tmp_path):
    (run / "figures" / "old.png").write_bytes(b"old")
    (run / "report.html").write_text("old")
    assert main(["train", "ppca", "--out", str(run), "--force", *TINY]) == 0
    assert not (run / "figures" / "old.png").exists() and not (run / "report.html").exists()
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    capsys.readouterr()
    _refused(capsys, ["train", "ppca", "--out", str(other), "--force", *TINY],
             "not a run folder", other)


def test_two_writers_on_one_run_folder(capsys, run):
    """A second process holds the run's lock: resuming and overwriting are refused, reading
    is not; once the holder ends, the run resumes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from zoo import runs\n"
         "with runs.locked(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
         str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = f"in use by another zoo command (process {holder.pid})"
        _refused(capsys, ["train", "--resume", str(run), "--steps", "40"], message)
        _refused(capsys, ["train", "ppca", "--out", str(run), "--force", *TINY], message)
        _refused(capsys, ["plot", str(run)], message)
        assert main(["evaluate", str(run), "--particles", "5"]) == 0
    finally:
        holder.communicate("")
    assert not (run / runs.LOCK).exists()
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 0


def test_a_stale_lock_and_a_killed_write_are_cleaned_up(run):
    (run / runs.LOCK).write_text("999999999\n")  # a lock file no process holds
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 0
    assert {path.name for path in run.iterdir()} == {"config.json", "checkpoint.pt",
                                                     "metrics.csv", "figures"}


# Tracebacks: damaged, foreign or malicious checkpoints, and checkpoints of other runs.
class _Touches:
    """A pickle that creates a file when it is loaded by an unrestricted unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _state_change(change):
    def apply(path):
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return apply


@pytest.mark.parametrize("damage, message", [
    (_truncate, "is damaged or not a checkpoint"),
    (lambda path: path.write_bytes(b""), "is damaged or not a checkpoint"),
    (lambda path: path.write_text("hello"), "is damaged or not a checkpoint"),
    (lambda path: torch.save([1, 2], path), "is not a zoo checkpoint (it holds a list)"),
    (lambda path: path.write_bytes(pickle.dumps({"model": _Touches(path.parent / "PWNED")})),
     "refuses to load"),
    (lambda path: torch.save({"model": _Touches(path.parent / "PWNED")}, path),
     "refuses to load"),
    (_state_change(lambda state: state.pop("rng")), "'rng' is missing"),
    (_state_change(lambda state: state["model"].pop("V")), "model.V is missing"),
    (_state_change(lambda state: state["model"].update(V=torch.zeros(4, 3))),
     "V has shape (4, 3), the model wants (4, 1)"),
    (_state_change(lambda state: state["guide"].update(extra=torch.zeros(1))),
     "guide.extra is unknown"),
    (_state_change(lambda state: state["model"].update(V=state["model"]["V"] * float("nan"))),
     "non-finite values in model.V"),
])
@pytest.mark.parametrize("command", [["evaluate", "--json"], ["train", "--resume"]])
def test_bad_checkpoints_are_one_line(capsys, run, damage, message, command):
    damage(run / "checkpoint.pt")
    _refused(capsys, [command[0], *command[2:], str(run)] if command[0] == "evaluate"
             else [*command, str(run), "--steps", "40"], message, run)
    assert not (run / "PWNED").exists()


def _config_change(change):
    def apply(path):
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    return apply


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_text("{not json"), "is not valid JSON"),
    (lambda path: path.write_text("[1, 2]"), "must hold a JSON object"),
    (_config_change(lambda config: config["train"].update(lr="fast")),
     "'train.lr' must be a number, got \"fast\""),
    (_config_change(lambda config: config["train"].update(epochs=True)),
     "'train.epochs' must be an integer, got true"),
    (_config_change(lambda config: config["objective"].update(colour=1)),
     "unknown key 'objective.colour'"),
    (_config_change(lambda config: config["data"].pop("seed")), "'data.seed' is missing"),
    (_config_change(lambda config: config.update(data=[])), "'data' must be an object"),
    (_config_change(lambda config: config["train"].update(seed=-1)), "--seed must be in"),
])
def test_bad_configs_name_the_key(capsys, run, damage, message):
    damage(run / "config.json")
    _refused(capsys, ["evaluate", str(run)], message, run)
    _refused(capsys, ["train", "--resume", str(run), "--steps", "40"], message, run)


# Tracebacks: sizes beyond memory or hours of work, values out of range, outputs not writable.
@pytest.mark.parametrize("argv, message", [
    (["train", "ppca", "--particles", str(10**9)], "GiB of memory"),
    (["train", "ppca", "--latent-dim", str(99999999999)], "GiB of memory"),
    (["train", "ppca", "--batch-size", str(10**12), "--particles", str(10**8)], "GiB of memory"),
    (["train", "ppca", "--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["train", "ppca", "--seed", str(2**32)], "--seed must be in [0, 2^32)"),
    (["train", "ppca", "--device", "tpu"], "--device must be cpu, cuda or auto"),
    (["train", "ppca", "--guide", "meanfield", "--free-bits", "1e300"], "beyond the float32"),
    (["train", "ppca", "--lr", "1e39"], "beyond the float32"),
    (["train", "ppca", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["train", "ppca", "--nonsense"], "unrecognized arguments: --nonsense"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "ppca", "--out", ""], "--out is empty"),
])
def test_impossible_settings_are_refused_up_front(capsys, tmp_path, argv, message):
    _refused(capsys, [*argv, *(["--out", str(tmp_path / "out")] if "--out" not in argv and
                               argv[0] == "train" else [])], message)
    assert not (tmp_path / "out").exists()


def test_evaluate_and_sample_bound_memory_and_work(capsys, run, tmp_path):
    _refused(capsys, ["evaluate", str(run), "--particles", str(10**12)], "more than the 1e+12",
             run)
    _refused(capsys, ["evaluate", str(run), "--device", "tpu"], "--device must be", run)
    vae = tmp_path / "vae"
    assert main(["train", "vae", "--steps", "1", "--batch-size", "50", "--quiet", "--out",
                 str(vae)]) == 0
    capsys.readouterr()
    _refused(capsys, ["sample", str(vae), "--n", str(10**10), "--out", str(tmp_path / "x.npy")],
             "GiB of memory", vae)


@pytest.mark.parametrize("command, target, message", [
    (["train", "ppca", *TINY, "--out"], "file", "is a file, not a folder"),
    (["train", "ppca", *TINY, "--out"], "file/below", "lies under"),
    (["demo", "--out"], "file", "is a file, not a folder"),
    (["sample", "RUN", "--out"], "file/below.png", "lies under"),
    (["sample", "RUN", "--out"], "folder", "is a folder: give a file name"),
    (["plot", "RUN", "--out"], "file/below.png", "lies under"),
    (["plot", "RUN", "--out"], "folder", "is a folder: give a file name"),
    (["sample", "RUN", "--out"], "", "--out is empty"),
])
def test_outputs_that_cannot_be_written(capsys, run, tmp_path, command, target, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    argv = [str(run) if word == "RUN" else word for word in command]
    _refused(capsys, [*argv, str(tmp_path / target) if target else ""], message, run)
    assert (tmp_path / "file").read_text() == "x" and not any((tmp_path / "folder").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_refused(capsys, tmp_path):
    locked_out = tmp_path / "readonly"
    locked_out.mkdir(mode=0o500)
    _refused(capsys, ["train", "ppca", *TINY, "--out", str(locked_out / "run")],
             "is not writable")


# Data: numbers that are not plain numbers, values beyond float32 arithmetic, ignored flags.
@pytest.mark.parametrize("cell, message", [
    ("1_00", "'1_00' is not a number"),
    ("\u0661\u0662", "is not a number"),
    ("0x10", "'0x10' is not a number"),
])
def test_csv_cells_must_be_plain_numbers(capsys, tmp_path, cell, message):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n3,4\n" + f"5,{cell}\n", encoding="utf-8")
    _refused(capsys, ["train", "ppca", "--data", str(path), "--latent-dim", "1", "--out",
                      str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


def test_huge_values_name_their_columns_and_suggest_standardize(capsys, tmp_path):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, 3)) * np.array([1.0, 1e30, 1.0])
    path = tmp_path / "table.csv"
    np.savetxt(path, table, delimiter=",", header="small,huge,other", comments="")
    out = ["--latent-dim", "1", "--out", str(tmp_path / "out"), *TINY]
    _refused(capsys, ["train", "ppca", "--data", str(path), *out], "column(s) 'huge' hold")
    capsys.readouterr()
    _refused(capsys, ["train", "ppca", "--data", str(path), *out], "--standardize")
    assert main(["train", "ppca", "--data", str(path), "--standardize", *out]) == 0


def test_data_dir_with_a_data_file_is_refused(capsys, tmp_path, trained):
    _refused(capsys, ["train", "ppca", "--data", str(trained.parent / "table.csv"),
                      "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
             "--data-dir applies to mnist and fashion-mnist")


def test_a_vae_on_a_table_trains_and_leaves_out_the_image_figures(capsys, tmp_path):
    path = tmp_path / "table.csv"
    np.savetxt(path, np.random.default_rng(2).random((60, 5)), delimiter=",",
               header="a,b,c,d,e", comments="")
    run = tmp_path / "run"
    assert main(["train", "vae", "--data", str(path), "--likelihood", "gaussian", "--steps", "2",
                 "--quiet", "--out", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoo: warning: table is a table, not images")
    assert {path.name for path in (run / "figures").iterdir()} == {"loss.png"}


# Silent: resuming on changed data, diverging losses, interruptions before any checkpoint.
def test_resume_and_evaluate_refuse_changed_data(capsys, run, trained, tmp_path):
    table = trained.parent / "table.csv"
    original = table.read_text()
    try:
        changed = np.loadtxt(table, delimiter=",", skiprows=1) + 1  # same shape, new values
        np.savetxt(table, changed, delimiter=",", header="a,b,c,d", comments="")
        message = "changed since it was trained"
        _refused(capsys, ["train", "--resume", str(run), "--steps", "40"], message, run)
        _refused(capsys, ["evaluate", str(run)], message, run)
    finally:
        table.write_text(original)
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 0


@pytest.mark.parametrize("losses, warns", [
    ([5.0, 3.0, 2.0], False),
    ([5.0, 3.0, 40.0], False),  # below 3 + 10 (3 + 1) = 43
    ([5.0, 3.0, 44.0], True),
    ([-100.0, -120.0, 1200.0], True),  # above -120 + 10 (120 + 1) = 1090
    ([-100.0, -120.0, 1000.0], False),
    ([1e14], False),  # one epoch: nothing to compare with
    ([2.0, 1e14], True),
])
def test_a_loss_that_grows_but_stays_finite_warns(losses, warns):
    history = [{"epoch": epoch, "train_loss": loss} for epoch, loss in enumerate(losses, 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_diverged(history)
    assert len(caught) == warns
    if warns:
        assert "training diverged" in str(caught[0].message)


class _GrowingLoss:
    """An objective whose value rises by 1e14 nats per data point after ``start`` calls; the
    gradient is unchanged, so the parameters stay finite."""

    def __init__(self, objective, start):
        self.objective, self.start, self.calls = objective, start, 0

    def differentiable_loss(self, model, guide, *args):
        self.calls += 1
        loss = self.objective.differentiable_loss(model, guide, *args)
        return loss + 1e14 * args[0].shape[0] if self.calls > self.start else loss


@pytest.mark.parametrize("start, warns", [(10**9, False), (4 * 18, True)])
def test_training_whose_loss_grows_but_stays_finite_warns(small_ppca_config, start, warns):
    """Six epochs of 18 steps; from the fifth epoch on the loss is 1e14 nats per point."""
    experiment = build_experiment(small_ppca_config, quiet=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(experiment.model, experiment.guide,
                      _GrowingLoss(experiment.objective, start), experiment.train_inputs,
                      settings=experiment.settings)
    assert (history[-1]["train_loss"] > 1e13) == warns
    messages = [str(warning.message) for warning in caught]
    assert [message for message in messages if "training diverged" in message] == (
        [messages[-1]] if warns else [])


def test_an_interruption_before_the_first_checkpoint_says_none_was_kept(capsys, monkeypatch,
                                                                         tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("zoo.experiment.fit", interrupted)
    assert main(["train", "ppca", "--out", str(tmp_path / "run"), *TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint was written" in err[0], err
    assert not (tmp_path / "run" / runs.LOCK).exists()


def test_a_killed_process_leaves_a_stale_lock_that_is_taken_over(run):
    """A process killed while it holds the lock leaves its lock file; the lock itself dies
    with the process."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from zoo import runs\n"
         "with runs.locked(sys.argv[1]):\n print('locked', flush=True); time.sleep(600)",
         str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert (run / runs.LOCK).read_text().strip() == str(holder.pid)
    with runs.locked(run):
        assert (run / runs.LOCK).read_text().strip() == str(os.getpid())
    assert not (run / runs.LOCK).exists()
