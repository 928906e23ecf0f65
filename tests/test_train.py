"""The training engine: reproducibility, resume, non-finite stops, run folders, clipping."""

from functools import partial

import pytest
import torch

from zoo import runs
from zoo.convergence import (
    PLATEAU_HALVINGS,
    converged,
    convergence,
    describe_convergence,
)
from zoo.errors import ZooError
from zoo.experiment import build_experiment, load_run, resume_run, train_run
from zoo.settings import TrainSettings
from zoo.train import TrainingDiverged, eager_step, fit, trainable_parameters


def _parameters(experiment):
    return {**{f"model.{k}": v for k, v in experiment.model.state_dict().items()},
            **{f"guide.{k}": v for k, v in experiment.guide.state_dict().items()}}


def _assert_bitwise_equal(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_same_seed_gives_bitwise_same_parameters(small_ppca_config):
    results = []
    for _ in range(2):
        experiment = build_experiment(small_ppca_config, quiet=True)
        fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
            settings=experiment.settings)
        results.append(_parameters(experiment))
    _assert_bitwise_equal(*results)
    other = dict(small_ppca_config, train={**small_ppca_config["train"], "seed": 1})
    experiment = build_experiment(other, quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    assert not torch.equal(_parameters(experiment)["model.V"], results[0]["model.V"])



def test_a_step_passed_to_fit_takes_every_step(small_ppca_config):
    """``make_step`` is the one seam for another step (a compiled one, say): fit calls the step
    it builds once per optimizer step, and the eager step it wraps here trains bitwise as the
    default does."""
    results, calls = [], []

    def counted_step(*args):
        step = eager_step(*args)

        def counted(batch):
            calls.append(batch[0].shape[0])
            return step(batch)
        return counted

    for make_step in (eager_step, counted_step):
        experiment = build_experiment(small_ppca_config, quiet=True)
        history = fit(experiment.model, experiment.guide, experiment.objective,
                      experiment.train_inputs, settings=experiment.settings,
                      make_step=make_step)
        results.append(_parameters(experiment))
    assert len(calls) == history[-1]["step"] > 0
    assert sum(calls) == len(history) * experiment.train_inputs[0].shape[0]
    _assert_bitwise_equal(*results)

def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(small_ppca_config, tmp_path):
    whole = train_run(small_ppca_config, tmp_path / "whole", quiet=True)

    experiment = build_experiment(small_ppca_config, quiet=True)
    stopped = runs.create_run_dir(tmp_path / "stopped")
    runs.write_config(stopped, small_ppca_config)

    def stop_after_epoch_three(row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
            test=experiment.test_inputs, settings=experiment.settings, run_dir=stopped,
            on_epoch=stop_after_epoch_three)
    assert len(runs.read_metrics(stopped)) == 3
    resume_run(stopped, quiet=True)

    _assert_bitwise_equal(_parameters(load_run(whole)), _parameters(load_run(stopped)))
    losses = [[(row["epoch"], row["train_loss"], row["test_loss"]) for row in
               runs.read_metrics(run_dir)] for run_dir in (whole, stopped)]
    assert losses[0] == losses[1]


def test_resume_extends_a_finished_run(small_ppca_config, tmp_path):
    run_dir = train_run(small_ppca_config, tmp_path / "run", quiet=True)
    resume_run(run_dir, epochs=8, quiet=True)
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == list(range(1, 9))
    assert runs.read_config(run_dir)["train"]["epochs"] == 8


class _SabotagedAt:
    """An objective whose loss is passed through ``sabotage(loss, model)`` at its
    ``bad_step``-th call (and every later one with ``after``)."""

    def __init__(self, objective, bad_step, sabotage, after=False):
        self.objective, self.bad_step, self.sabotage, self.after = (objective, bad_step,
                                                                    sabotage, after)
        self.calls = 0

    def differentiable_loss(self, model, guide, *args):
        self.calls += 1
        loss = self.objective.differentiable_loss(model, guide, *args)
        hit = self.calls >= self.bad_step if self.after else self.calls == self.bad_step
        return self.sabotage(loss, model) if hit else loss


def _nan_loss(loss, model):
    return loss * float("nan")


def _nan_gradient(loss, model):
    zero = 0 * sum(parameter.sum() for parameter in model.parameters())
    return loss + 0 * zero.sqrt()  # value + 0; gradient 0 * inf = nan


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(
        small_ppca_config, tmp_path):
    experiment = build_experiment(small_ppca_config, quiet=True)
    run_dir = runs.create_run_dir(tmp_path / "run")
    steps_per_epoch = -(-experiment.data.num_train // 100)
    bad = 2 * steps_per_epoch + 5
    with pytest.raises(TrainingDiverged, match=rf"epoch 3, step 5 \(step {bad} overall\)"):
        fit(experiment.model, experiment.guide,
            _SabotagedAt(experiment.objective, bad, _nan_loss, after=True),
            experiment.train_inputs, settings=experiment.settings, run_dir=run_dir)
    checkpoint = runs.load_checkpoint(run_dir)
    assert checkpoint["step"] == 2 * steps_per_epoch
    assert len(runs.read_metrics(run_dir)) == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("where", ["mid-epoch", "last step of an epoch"])
def test_non_finite_gradient_stops_training_and_keeps_a_finite_checkpoint(
        small_ppca_config, tmp_path, where):
    """A nan gradient under a finite loss turns the parameters into nan: the next loss stops
    training, or, after an epoch's last step, the check before its checkpoint does."""
    experiment = build_experiment(small_ppca_config, quiet=True)
    run_dir = runs.create_run_dir(tmp_path / "run")
    steps_per_epoch = -(-experiment.data.num_train // 100)
    bad = 2 * steps_per_epoch + (3 if where == "mid-epoch" else 0)
    message = (rf"loss is not finite at epoch 3, step 4 \(step {bad + 1} overall\)"
               if where == "mid-epoch" else rf"parameters are not finite after step {bad} "
                                            rf"\(the end of epoch 2\)")
    with pytest.raises(TrainingDiverged, match=message):
        fit(experiment.model, experiment.guide,
            _SabotagedAt(experiment.objective, bad, _nan_gradient),
            experiment.train_inputs, settings=experiment.settings, run_dir=run_dir)
    checkpoint = runs.load_checkpoint(run_dir)
    assert checkpoint["epoch"] == (2 if where == "mid-epoch" else 1)
    for part in ("model", "guide"):
        assert all(torch.isfinite(value).all() for value in checkpoint[part].values())


def test_checkpoint_loads_with_weights_only(small_ppca_config, tmp_path):
    run_dir = train_run(small_ppca_config, tmp_path / "run", quiet=True)
    checkpoint = torch.load(run_dir / runs.CHECKPOINT, weights_only=True)
    assert {"model", "guide", "optimizer", "epoch", "step", "history", "rng"} <= set(checkpoint)
    assert (run_dir / "figures" / "loss.png").stat().st_size > 0


def test_existing_run_folder_is_refused_unless_forced(small_ppca_config, tmp_path):
    run_dir = train_run(small_ppca_config, tmp_path / "run", quiet=True)
    with pytest.raises(ZooError, match="already exists.*--force"):
        train_run(small_ppca_config, run_dir, quiet=True)
    train_run(small_ppca_config, run_dir, force=True, quiet=True)


def test_steps_override_epochs_and_the_last_epoch_may_be_partial(small_ppca_config):
    experiment = build_experiment(small_ppca_config, quiet=True)
    settings = TrainSettings(steps=40, batch_size=100, quiet=True)
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=settings)
    steps_per_epoch = -(-experiment.data.num_train // 100)
    assert history[-1]["step"] == 40
    assert len(history) == -(-40 // steps_per_epoch)


def test_gradient_clipping_bounds_the_update(small_ppca_config):
    experiment = build_experiment(small_ppca_config, quiet=True)
    model, guide = experiment.model, experiment.guide
    after = trainable_parameters(model, guide, freeze_model=False)
    before = [p.detach().clone() for p in after]
    settings = TrainSettings(steps=1, optimizer="sgd", lr=1.0, clip_norm=1e-3, quiet=True)
    fit(model, guide, experiment.objective, experiment.train_inputs, settings=settings)
    scaled = {id(model.get_parameter(name)): scale for name, scale in model.step_scales().items()}
    step_scales = [scaled.get(id(p), 1.0) for p in after]
    change = torch.sqrt(sum(((a - b) / scale).square().sum()
                            for a, b, scale in zip(after, before, step_scales, strict=True)))
    assert 0 < change <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"optimizer": "adamm"}, "choose one of: adam, adamw, sgd"),
    ({"device": "tpu"}, "--device must be cpu, cuda or auto"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ZooError, match=message):
        TrainSettings(**settings)


def test_engine_reports_progress_for_annealing_and_can_freeze_the_model(small_ppca_config):
    """The KL weight ramps with the epochs done (one data pass of 1800 rows in batches of 100
    is 18 steps); with ``freeze_model`` the model's parameters do not move."""
    from zoo.objectives import IWAE

    experiment = build_experiment(small_ppca_config, quiet=True)
    objective = IWAE(num_particles=2, anneal_epochs=4)
    seen = []
    before = {k: v.clone() for k, v in experiment.model.state_dict().items()}
    guide_before = experiment.guide.encoder.weight.detach().clone()
    settings = TrainSettings(epochs=2, batch_size=100, quiet=True, freeze_model=True)
    fit(experiment.model, experiment.guide, objective, experiment.train_inputs,
        settings=settings, on_epoch=lambda row: seen.append(objective.kl_weight))
    assert seen == pytest.approx([17 / 18 / 4, (1 + 17 / 18) / 4])
    _assert_bitwise_equal(before, experiment.model.state_dict())
    assert not torch.equal(guide_before, experiment.guide.encoder.weight)
    assert all(p.requires_grad for p in experiment.model.parameters())


def test_binary_models_see_fresh_training_draws_and_one_fixed_test_binarization():
    """Dynamic binarization (Burda et al. 2015): each epoch's training images are a new
    Bernoulli draw from the grey levels; evaluation sees one seeded draw, the same each time."""
    from zoo.experiment import make_config

    experiment = build_experiment(make_config("vae", data={"name": "digits"}), quiet=True)
    grey = experiment.train_inputs[0]
    assert not set(grey.unique().tolist()) <= {0.0, 1.0}
    first, second = (experiment.train_transform(experiment.train_inputs)[0] for _ in range(2))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    # each pixel is a Bernoulli(grey) draw: the mean over 2 draws of all pixels is within
    # 5 standard errors of the mean grey level
    pixels = torch.stack([first, second])
    standard_error = (grey * (1 - grey)).sum().sqrt() / grey.numel() / 2**0.5
    assert abs(pixels.mean() - grey.mean()) < 5 * standard_error
    test_once, test_again = experiment.inputs("test")[0], experiment.inputs("test")[0]
    assert set(test_once.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(test_once, test_again)


# --- training to convergence ---------------------------------------------------------------------

def _convergence_config(**train):
    """PPCA on a small synthetic set, trained to convergence with a loose tolerance."""
    from zoo.experiment import make_config

    return make_config("ppca", guide="full", data={"name": "synthetic-ppca"},
                       train={"max_steps": 3000, "batch_size": 200, "passes": 1,
                              "tolerance": 1e-3, "patience": 3, **train})


def test_training_to_convergence_stops_early_and_records_it(tmp_path):

    config = _convergence_config()
    run_dir = train_run(config, tmp_path / "run", quiet=True)
    summary = runs.read_config(run_dir)["convergence"]
    rows = runs.read_metrics(run_dir)
    settings = TrainSettings(**config["train"])
    assert summary["converged"] is True
    assert summary["steps"] == rows[-1]["step"] < 3000
    assert summary["improvement"] + 2 * summary["standard_error"] < 1e-3
    assert converged(rows, settings)
    assert not any(converged(rows[:end], settings) for end in range(1, len(rows)))
    smallest = 2.0**-PLATEAU_HALVINGS           # converged at the plateau schedule's end,
    assert rows[-1]["lr_factor"] == smallest    # after at least 4 patience epochs there
    assert sum(row["lr_factor"] == smallest for row in rows) >= 4 * 3


def _history(losses, factor=2.0**-PLATEAU_HALVINGS):
    return [{"epoch": e + 1, "step": 50 * (e + 1), "fit_loss": loss, "lr_factor": factor}
            for e, loss in enumerate(losses)]


def test_the_trend_is_least_squares_with_its_standard_error():
    """:func:`zoo.convergence.trend` against numpy's polynomial fit of degree 1 and the
    covariance of its coefficients."""
    import numpy as np

    from zoo.convergence import trend

    losses = (48.5 - 0.003 * torch.arange(12.0) + 0.01 * torch.randn(
        12, generator=torch.Generator().manual_seed(0))).double().numpy()
    (slope, _), covariance = np.polyfit(np.arange(12.0), losses, 1, cov=True)
    rate, standard_error = trend(losses.tolist())
    assert rate == pytest.approx(-slope, rel=1e-9)
    assert standard_error == pytest.approx(np.sqrt(covariance[0, 0]), rel=1e-9)


def test_a_noisy_loss_still_falling_by_more_than_the_tolerance_does_not_stop():
    """The loss of a low-noise PPCA table: it moves by about 0.01 nats from epoch to epoch
    while it still falls by 1e-3 per epoch, ten times the tolerance. Two short windows (the
    plateau test) often see no improvement; training to convergence must not stop there, and
    stops once the same noise sits on a flat loss long enough to tell."""
    from zoo.convergence import improvement

    settings = TrainSettings(tolerance=1e-4, patience=3, lr_schedule="plateau")
    noise = 0.01 * torch.randn(200, generator=torch.Generator().manual_seed(1))
    falling = (48.5 - 1e-3 * torch.arange(200.0) + noise).tolist()
    assert any(improvement(falling[:end], 3) < 1e-4 for end in range(6, 60))
    assert not any(converged(_history(falling[:end]), settings) for end in range(1, 201))
    flat = (48.5 + noise).tolist()
    stops = [end for end in range(1, 201) if converged(_history(flat[:end]), settings)]
    assert stops and stops[0] >= 12
    not_yet_smallest = 2.0**(1 - PLATEAU_HALVINGS)
    assert not converged(_history(flat, factor=not_yet_smallest), settings)


def test_averaging_iterates_ends_each_epoch_at_the_mean_of_its_steps(small_ppca_config):
    """With ``average_iterates`` the parameters after an epoch are the mean of those after
    each of its steps (recorded here by wrapping the step), and training resumes from them."""
    config = {**small_ppca_config, "train": {**small_ppca_config["train"],
                                             "average_iterates": True, "epochs": 2}}
    experiment = build_experiment(config, quiet=True)
    parameters = [*experiment.model.parameters(), *experiment.guide.parameters()]
    after_each_step = []

    def recording_step(*args):
        step = eager_step(*args)

        def recorded(batch):
            loss = step(batch)
            after_each_step.append([parameter.detach().clone() for parameter in parameters])
            return loss
        return recorded

    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=TrainSettings(**config["train"]),
                  make_step=recording_step)
    last_epoch = after_each_step[history[0]["step"]:]
    assert len(last_epoch) == history[1]["step"] - history[0]["step"] > 1
    for index, parameter in enumerate(parameters):
        mean = torch.stack([step[index] for step in last_epoch]).mean(0)
        torch.testing.assert_close(parameter.detach(), mean, rtol=1e-5, atol=1e-6)
        assert not torch.equal(parameter.detach(), last_epoch[-1][index])


def test_extending_a_converged_run_is_refused_and_threads_may_change_on_resume(tmp_path):
    """A converged run given a larger budget would train nothing: refused, with config.json
    as it was; --threads changes for the resumed command alone."""
    run_dir = train_run(_convergence_config(), tmp_path / "run", quiet=True)
    before = (run_dir / runs.CONFIG).read_bytes()
    with pytest.raises(ZooError, match="already converged to --tolerance 0.001"):
        resume_run(run_dir, steps=5000, quiet=True)
    assert (run_dir / runs.CONFIG).read_bytes() == before
    resume_run(run_dir, quiet=True, threads=2)       # this command's, not the run's
    assert (run_dir / runs.CONFIG).read_bytes() == before


def test_a_budget_too_small_to_converge_says_so(tmp_path):
    config = _convergence_config(max_steps=600, tolerance=1e-6)
    with pytest.warns(UserWarning, match=r"without converging.*--max-steps 1200"):
        run_dir = train_run(config, tmp_path / "run", quiet=True)
    summary = runs.read_config(run_dir)["convergence"]
    assert summary == {"converged": False, "steps": 600, "tolerance": 1e-6, "escapes": 0,
                       "improvement": summary["improvement"],
                       "standard_error": summary["standard_error"]}
    assert summary["improvement"] + 2 * summary["standard_error"] > 1e-6


def test_training_to_convergence_resumes_bitwise(tmp_path):
    config = _convergence_config()
    whole = train_run(config, tmp_path / "whole", quiet=True)
    epochs = len(runs.read_metrics(whole))

    experiment = build_experiment(config, quiet=True)
    stopped = runs.create_run_dir(tmp_path / "stopped")
    runs.write_config(stopped, config)

    def stop_midway(row):
        if row["epoch"] == epochs // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
            settings=experiment.settings, run_dir=stopped, on_epoch=stop_midway)
    resume_run(stopped, quiet=True)
    _assert_bitwise_equal(_parameters(load_run(whole)), _parameters(load_run(stopped)))
    columns = ("epoch", "step", "train_loss", "fit_loss", "lr_factor", "improvement")
    rows = [[tuple(str(row[column]) for column in columns) for row in runs.read_metrics(run_dir)]
            for run_dir in (whole, stopped)]
    assert rows[0] == rows[1]
    assert runs.read_config(whole)["convergence"] == runs.read_config(stopped)["convergence"]


def test_a_fixed_budget_turns_off_the_default_convergence_and_max_steps_keeps_it():
    from zoo.experiment import make_config

    default = make_config("ppca")["train"]
    assert default["tolerance"] is not None and default["lr_schedule"] == "plateau"
    assert default["average_iterates"]
    fixed = make_config("ppca", train={"steps": 500})["train"]
    assert fixed["tolerance"] is None and fixed["lr_schedule"] == "cosine"
    assert not fixed["average_iterates"]
    assert fixed["steps"] == 500
    roomier = make_config("ppca", train={"max_steps": 99})["train"]
    assert roomier["steps"] == 99 and roomier["tolerance"] == default["tolerance"]


@pytest.mark.parametrize("settings, message", [
    ({"tolerance": 0.0}, "--tolerance must be positive"),
    ({"patience": 0}, "--patience must be at least 1"),
    ({"threads": 0}, "--threads must be at least 1"),
    ({"lr_schedule": "plateau"}, "--lr-schedule plateau needs --tolerance"),
])
def test_bad_convergence_settings_are_refused(settings, message):
    with pytest.raises(ZooError, match=message):
        TrainSettings(**settings)


def test_threads_are_used_during_training_and_restored_after(small_ppca_config, monkeypatch,
                                                            request):
    """The run's threads hold while the model is built from the data (a start computed with
    other threads differs in its last digits, and a long run then ends elsewhere) and while it
    trains; the process's own number comes back after each."""
    import zoo.experiment

    request.addfinalizer(partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(2)
    building = []
    build = zoo.experiment.build

    def spy(*args, **kwargs):
        building.append(torch.get_num_threads())
        return build(*args, **kwargs)

    monkeypatch.setattr(zoo.experiment, "build", spy)
    before = torch.get_num_threads()
    config = dict(small_ppca_config, train={**small_ppca_config["train"], "threads": 1})
    experiment = build_experiment(config, quiet=True)
    assert building == [1] and torch.get_num_threads() == before
    seen = []
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, on_epoch=lambda row: seen.append(torch.get_num_threads()))
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


class _EscapeOnce:
    """A false-stop check that, the first time training would stop, halves W and reports an escape
    (``used``: it already has), and afterwards finds none."""

    def __init__(self, used=False):
        self.used = used

    def __call__(self, model, guide, x):
        if self.used:
            return False
        self.used = True
        model.set_parameters(W=model.W.detach() * 0.5)
        return True


def test_a_false_stop_check_is_asked_at_most_max_escapes_times():
    """A move that the objective undoes (here: one that always moves) cannot keep training
    going: after MAX_ESCAPES escapes the rule's stop stands, and the run converges."""
    from zoo.convergence import MAX_ESCAPES

    experiment = build_experiment(_convergence_config(), quiet=True)
    asked = []

    def always(model, guide, x):
        asked.append(True)
        model.set_parameters(W=model.W.detach() * 0.5)
        return True

    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=experiment.settings, before_stop=always)
    assert len(asked) == MAX_ESCAPES == sum(row.get("escaped") == 1 for row in history)
    assert converged(history, experiment.settings)


def test_a_false_stop_check_that_replaces_a_parameter_is_refused():
    """A move off a false stop must write in place: assigning a PyroParam (``model.sigma =
    ...``) gives it new storage, which the training step would not see, and is refused with
    the parameter's name and the fix."""
    experiment = build_experiment(_convergence_config(), quiet=True)

    def assign(model, guide, x):
        model.sigma = model.sigma.detach() * 2
        return True

    with pytest.raises(ZooError, match=r"replaced model\.sigma_unconstrained.*copy_"):
        fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
            settings=experiment.settings, before_stop=assign)


def test_an_escape_from_a_false_stop_restarts_the_rule_and_resumes_bitwise(tmp_path):
    """Where training to convergence would stop and the model's false-stop check moves it instead,
    the epoch's row records ``escaped``, the learning rate starts again at its full value,
    the stopping rule reads only the epochs after the escape, and config.json counts the
    escape. A run interrupted just after the escape and resumed ends bitwise as the
    uninterrupted run does."""
    config = _convergence_config()
    experiment = build_experiment(config, quiet=True)
    run_dir = runs.create_run_dir(tmp_path / "whole")
    runs.write_config(run_dir, config)
    settings = experiment.settings
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=settings, run_dir=run_dir,
                  before_stop=_EscapeOnce())
    escaped = [row["epoch"] for row in history if row.get("escaped")]
    assert len(escaped) == 1
    before, after = history[:escaped[0]], history[escaped[0]:]
    assert converged(before[:-1] + [{**before[-1], "escaped": 0}], settings)  # it would stop
    assert not any(converged(history[:end], settings)
                   for end in range(escaped[0], len(history)))
    assert converged(history, settings) and history[-1]["step"] < settings.steps
    assert after[0]["lr_factor"] == 1.0 and after[-1]["lr_factor"] == 2.0**-PLATEAU_HALVINGS
    assert sum(row["lr_factor"] == after[-1]["lr_factor"] for row in after) >= 4 * 3
    assert convergence(history, settings)["escapes"] == 1
    metrics = runs.read_metrics(run_dir)
    assert [row["epoch"] for row in metrics if row["escaped"] == 1] == escaped
    assert "left a false stop 1 time" in describe_convergence(convergence(history, settings))

    stopped = runs.create_run_dir(tmp_path / "stopped")
    runs.write_config(stopped, config)

    def stop_after_the_escape(row):
        if row["epoch"] == escaped[0]:
            raise KeyboardInterrupt

    experiment = build_experiment(config, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
            settings=settings, run_dir=stopped, on_epoch=stop_after_the_escape,
            before_stop=_EscapeOnce())
    experiment = build_experiment(config, quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=settings, run_dir=stopped, checkpoint=runs.load_checkpoint(stopped),
        before_stop=_EscapeOnce(used=True))
    _assert_bitwise_equal(_parameters(load_run(run_dir)), _parameters(load_run(stopped)))
    columns = ("epoch", "step", "train_loss", "fit_loss", "lr_factor", "improvement", "escaped")
    rows = [[tuple(str(row[column]) for column in columns) for row in runs.read_metrics(folder)]
            for folder in (run_dir, stopped)]
    assert rows[0] == rows[1]
