"""The ``zoo`` command: listing, train/evaluate/resume round trips, and bad input (one line on
stderr, exit status 2, never a stack trace)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.cli import main

TINY = ["--steps", "30", "--batch-size", "200", "--quiet"]


def _fails_with(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("zoo: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err


def test_list_shows_models_guides_objectives_and_data(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ppca", "meanfield", "full", "elbo", "digits", "mnist", "synthetic-ppca"):
        assert name in out


def test_train_evaluate_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--guide", "full", "--out", str(run), *TINY]) == 0
    assert capsys.readouterr().out.strip() == str(run)
    assert {p.name for p in run.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.csv",
                                               "figures"}
    assert main(["evaluate", str(run), "--particles", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"train", "test", "convergence"}
    assert result.pop("convergence") == {"converged": None, "steps": 30, "improvement": None,
                                         "standard_error": None, "tolerance": None,
                                         "escapes": 0}  # fixed
    for split in result.values():
        assert {"elbo", "log_likelihood", "exact_log_likelihood", "mle_log_likelihood",
                "posterior_kl"} <= set(split)
        assert split["elbo"] <= split["exact_log_likelihood"]
    assert result["train"]["exact_log_likelihood"] <= result["train"]["mle_log_likelihood"]
    assert main(["train", "--resume", str(run), "--steps", "45", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--particles", "10"]) == 0
    assert "exact_log_likelihood" in capsys.readouterr().out


def test_no_test_split_gives_only_train_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--test-fraction", "0", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--particles", "10", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"train", "convergence"}


def test_user_csv_table(tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5)) + rng.normal(size=(300, 5))
    path = tmp_path / "table.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c,d,e", comments="")
    run = tmp_path / "run"
    assert main(["train", "ppca", "--data", str(path), "--standardize", "--out", str(run),
                 *TINY]) == 0


@pytest.mark.parametrize("argv, message", [
    (["train", "pcaa"], "unknown model 'pcaa'; choose one of: ppca, "),
    (["train", "ppca", "--guide", "diag"], "unknown guide 'diag' for model ppca; choose one of"),
    (["train", "ppca", "--loss", "elbow"], "unknown objective 'elbow'; choose one of: elbo"),
    (["train", "ppca", "--dataset", "digitz"], "unknown data set 'digitz'"),
    (["train", "ppca", "--latent-dim", "0"], "--latent-dim"),
    (["train", "ppca", "--latent-dim", "10"], "--latent-dim"),
    (["train", "ppca", "--data", "no/such/file.csv"], "no such file"),
    (["train", "ppca", "--particles", "0"], "--particles must be at least 1"),
    (["train", "ppca", "--epochs", "0"], "--epochs must be at least 1"),
    (["train"], "name a model"),
    (["evaluate", "no/such/run"], "not a run folder"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    _fails_with(capsys, argv, message)


def test_nan_in_data_is_refused(tmp_path, capsys):
    path = tmp_path / "table.csv"
    path.write_text("a,b,c\n1,2,3\n4,nan,6\n7,8,9\n")
    _fails_with(capsys, ["train", "ppca", "--data", str(path), "--latent-dim", "1"], "nan")


def test_existing_run_folder_needs_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *TINY]) == 0
    _fails_with(capsys, ["train", "ppca", "--out", str(run), *TINY], "--force")
    assert main(["train", "ppca", "--out", str(run), "--force", *TINY]) == 0


def test_resume_refuses_other_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *TINY]) == 0
    _fails_with(capsys, ["train", "--resume", str(run), "--lr", "0.1"], "drop --lr")


@pytest.mark.parametrize("command", [[str(Path(sys.executable).parent / "zoo")],
                                     [sys.executable, "-m", "zoo"]])
def test_console_script_and_module_entry_point(command, tmp_path):
    done = subprocess.run([*command, "train", "nope"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("zoo: error: unknown model 'nope'; choose one of: ppca, ")
    done = subprocess.run([*command, "list"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "ppca" in done.stdout


@pytest.mark.parametrize("loss_flags", [
    ["--loss", "piwae", "--particles", "8", "--m", "2"],
    ["--loss", "dreg", "--particles", "4", "--anneal-epochs", "2"],
    ["--loss", "elbo", "--free-bits", "0.1", "--guide", "meanfield"],
])
def test_objective_flags_reach_the_run(tmp_path, capsys, loss_flags):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *loss_flags, *TINY]) == 0
    objective = json.loads((run / "config.json").read_text())["objective"]
    flags = dict(zip(loss_flags[::2], loss_flags[1::2], strict=True))
    assert objective["name"] == flags["--loss"]
    assert objective["num_particles"] == int(flags.get("--particles", 1))
    for flag, key in (("--m", "num_groups"), ("--anneal-epochs", "anneal_epochs"),
                      ("--free-bits", "free_bits")):
        if flag in flags:
            assert objective[key] == float(flags[flag])


@pytest.mark.parametrize("flags, message", [
    (["--loss", "miwae", "--particles", "10", "--m", "3"], "positive divisor"),
    (["--loss", "iwae", "--particles", "0"], "at least 1"),
    (["--loss", "ciwae", "--beta", "2"], "[0, 1]"),
    (["--loss", "iwae", "--m", "2"], "--m does not apply to --loss iwae"),
    (["--loss", "elbo", "--free-bits", "0.5", "--guide", "full"], "factorized Gaussian guide"),
    (["--loss", "elbow"], "unknown objective 'elbow'"),
])
def test_invalid_objectives_are_refused_before_training(tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    _fails_with(capsys, ["train", "ppca", "--out", str(run), *flags, *TINY], message)
    assert not run.exists()


@pytest.mark.parametrize("flag, step, retired", [("--eager", "eager", False),
                                                   ("--compile", "compiled", False),
                                                   ("--jit", "compiled", True)])
def test_the_training_step_is_recorded_in_the_run(tmp_path, capsys, replayed_step, flag, step,
                                                  retired):
    """--eager and --compile are recorded; --jit, retired, says so in one line and compiles."""
    run = tmp_path / "run"
    assert main(["train", "ppca", flag, "--loss", "iwae", "--particles", "4", "--out",
                 str(run), *TINY]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["step"] == step
    retirement = [line for line in capsys.readouterr().err.splitlines() if "--jit" in line]
    assert retirement == (["zoo: warning: --jit is retired: the training step is compiled by "
                           "default; --jit now means --compile"] if retired else [])


def test_a_run_that_recorded_jit_still_loads(tmp_path):
    """Runs of zoo before the compiled step recorded ``jit`` in config.json; they still load."""
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    config["train"]["jit"] = False
    (run / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(run), "--json"]) == 0


def test_freezing_a_model_whose_guide_has_no_parameters_is_refused(tmp_path, capsys):
    """The GMM's enumerate guide has no parameters: --freeze-model would leave nothing to
    train, which is refused before a run folder is written."""
    run = tmp_path / "run"
    _fails_with(capsys, ["train", "gmm", "--freeze-model", "--out", str(run), *TINY],
                "nothing to train")
    assert not run.exists()


def test_plot_draws_the_models_first_kind_by_default(tmp_path, capsys):
    gmm, ppca = tmp_path / "gmm", tmp_path / "ppca"
    assert main(["train", "gmm", "--restarts", "1", "--out", str(gmm), *TINY]) == 0
    (gmm / "figures" / "components.png").unlink()
    capsys.readouterr()
    assert main(["plot", str(gmm)]) == 0
    assert capsys.readouterr().out.strip() == str(gmm / "figures" / "components.png")
    assert (gmm / "figures" / "components.png").stat().st_size > 2000
    assert main(["train", "ppca", "--out", str(ppca), *TINY]) == 0
    capsys.readouterr()
    assert main(["plot", str(ppca)]) == 0
    assert capsys.readouterr().out.strip() == str(ppca / "figures" / "posterior.png")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ppca", "expnormal", "vae", "cvae", "gmm"])
def test_plot_offers_every_figure_training_draws(tmp_path, capsys, model):
    """Each figure in a fresh run's figures/ is a kind of zoo plot, and the path printed is
    the path written (``.png`` added to a name without a suffix)."""
    run = tmp_path / "run"
    options = ["--restarts", "1"] if model == "gmm" else []
    assert main(["train", model, "--steps", "5", "--quiet", "--out", str(run), *options]) == 0
    drawn = sorted(path.stem for path in (run / "figures").iterdir())
    assert "loss" in drawn
    for kind in drawn:
        capsys.readouterr()
        assert main(["plot", str(run), "--kind", kind, "--out", str(tmp_path / kind)]) == 0
        printed = Path(capsys.readouterr().out.strip())
        assert printed == tmp_path / f"{kind}.png" and printed.stat().st_size > 2000
    _fails_with(capsys, ["plot", str(run), "--out", str(tmp_path / "figure.v2")],
                "cannot draw a figure into figure.v2: choose a name ending in one of")


def test_evaluate_a_vae_reports_its_bound_likelihood_and_active_units(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--epochs", "5", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--particles", "200", "--split", "test", "--json"]) == 0
    test = json.loads(capsys.readouterr().out)["test"]
    assert {"elbo", "log_likelihood", "ess", "active_units"} <= set(test)
    assert test["log_likelihood"] > test["elbo"]  # L_200 above L_1 by far more than MC error
    assert 1 <= test["active_units"] <= 8 and 1 <= test["ess"] <= 200


def test_evaluate_one_split(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--particles", "10", "--split", "test", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"test", "convergence"}
    none = tmp_path / "none"
    assert main(["train", "ppca", "--test-fraction", "0", "--out", str(none), *TINY]) == 0
    capsys.readouterr()
    _fails_with(capsys, ["evaluate", str(none), "--split", "test"], "has no test split")


def test_evaluate_on_a_device(tmp_path, capsys):
    """``--device auto`` evaluates where training can run; ``cuda`` without a GPU is refused."""
    run = tmp_path / "run"
    assert main(["train", "ppca", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--particles", "10", "--json"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--particles", "10", "--json", "--device", "auto"]) == 0
    anywhere = json.loads(capsys.readouterr().out)
    if not torch.cuda.is_available():
        assert anywhere == on_cpu
        _fails_with(capsys, ["evaluate", str(run), "--device", "cuda"], "sees no CUDA GPU")
    else:  # other random streams on the GPU: the same estimates up to Monte-Carlo error
        for split in on_cpu:
            assert abs(anywhere[split]["log_likelihood"] - on_cpu[split]["log_likelihood"]) < 0.05


@pytest.mark.parametrize("model, figures", [
    ("vae", {"loss.png", "samples.png", "reconstructions.png", "latents.png"}),
    ("gmm", {"loss.png", "components.png"}),
])
def test_training_draws_the_models_own_figures(tmp_path, model, figures):
    run = tmp_path / "run"
    assert main(["train", model, "--steps", "20", "--quiet", "--out", str(run)]) == 0
    assert {path.name for path in (run / "figures").iterdir()} == figures


def _zoo(*argv: str, **streams) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zoo", *argv], stderr=subprocess.PIPE,
                            text=True, **streams)


def test_a_closed_stdout_ends_quietly():
    """``zoo list | head -1``: the reader is gone before zoo writes; exit 0, nothing on stderr."""
    process = _zoo("list", stdout=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        process = _zoo("list", stdout=full)
        assert process.wait(timeout=120) == 1
    lines = process.stderr.read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: cannot write the output: ")
    assert "No space left on device" in lines[0]


def test_list_aligns_every_name(capsys):
    """Every description starts in the same column, however long the names, and no line runs
    past the width."""
    from zoo.cli import LIST_WIDTH
    from zoo.data import DATASETS
    from zoo.registry import MODELS

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("  ") and line.split()[0] in
            {*MODELS, *DATASETS}]
    assert len(rows) == len(MODELS) + len(DATASETS)
    starts = {len(line) - len(line[2:].lstrip(" ").split(" ", 1)[1].lstrip(" ")) for line in rows}
    assert len(starts) == 1
    column = starts.pop()
    continued = [line for line in lines if line.startswith(" " * column)]
    assert continued and all(not line[column - 1].strip() for line in continued)
    assert max(map(len, lines)) <= LIST_WIDTH


def test_a_built_in_data_set_with_constant_columns_names_the_flag(tmp_path, capsys):
    """The digits' border pixels are constant: the GMM's refusal names --drop-constant, which
    trains it."""
    run = tmp_path / "run"
    _fails_with(capsys, ["train", "gmm", "--dataset", "digits", "--out", str(run), *TINY],
                "pass --drop-constant to leave them out")
    assert main(["train", "gmm", "--dataset", "digits", "--drop-constant", "--restarts", "1",
                 "--out", str(run), *TINY]) == 0


def test_the_training_bar_names_model_and_guide_and_quiet_silences_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--guide", "full", "--steps", "30", "--batch-size", "200",
                 "--out", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(run)        # the bar is on stderr, stdout has the result
    assert "training ppca (full guide)" in captured.err
    assert main(["train", "--resume", str(run), "--steps", "45", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["evaluate", str(run), "--particles", "10", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and set(json.loads(captured.out)) == {"train", "test", "convergence"}


def test_training_to_convergence_is_the_default_and_a_short_budget_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--max-steps", "30", "--quiet", "--out", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoo: warning: training used its budget of 30 ")
    assert "--max-steps 60" in err[0] and f"--resume {run} --steps 60" in err[0]
    assert main(["evaluate", str(run), "--particles", "10"]) == 0
    assert "training: NOT converged within its budget of 30 steps" in capsys.readouterr().out


def test_threads_are_recorded_and_used_by_the_commands_on_the_run(tmp_path, capsys):
    from zoo.runs import read_config

    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        assert main(["train", "ppca", *TINY, "--threads", "1", "--out", str(run)]) == 0
        assert read_config(run)["train"]["threads"] == 1
        torch.set_num_threads(2)
        assert main(["evaluate", str(run), "--particles", "10", "--json"]) == 0
        assert torch.get_num_threads() == 1                     # the run's own
        assert main(["evaluate", str(run), "--particles", "10", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2                     # --threads wins
        _fails_with(capsys, ["evaluate", str(run), "--threads", "0"],
                    "--threads must be at least 1")
    finally:
        torch.set_num_threads(before)
