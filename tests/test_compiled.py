"""The compiled training step: the losses and gradients of the eager step for every objective,
bitwise resume, a fallback in one line for a data-dependent branch, a fresh capture for an
edited model file."""

import importlib.util
import sys
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from zoo import compiled, runs
from zoo.experiment import build_experiment, make_config
from zoo.objectives import make_objective
from zoo.settings import TrainSettings
from zoo.train import fit

OBJECTIVES = [("elbo", {}), ("elbo", {"num_particles": 3, "anneal_epochs": 2.0}),
              ("iwae", {"num_particles": 5}), ("miwae", {"num_particles": 6, "num_groups": 2}),
              ("ciwae", {"num_particles": 4, "beta": 0.3}),
              ("piwae", {"num_particles": 4, "num_groups": 2}),
              ("dreg", {"num_particles": 4}), ("dreg", {"num_particles": 4, "anneal_epochs": 2.0})]


def _experiment(model: str, **train):
    data = {"name": "digits"} if model == "vae" else {"name": "synthetic-ppca"}
    config = make_config(model, data=data, train={"epochs": 1, **train})
    return config, build_experiment(config, quiet=True)


def _training_batch(experiment, size):
    inputs = experiment.train_inputs
    if experiment.train_transform is not None:  # the VAE's binarized images
        inputs = experiment.train_transform(inputs)
    return tuple(tensor[:size] for tensor in inputs)


def _assert_close(value, eager, share=1e-5):
    """Equal up to float rounding of reordered sums: within ``share`` of the largest
    magnitude of the eager tensor."""
    assert (value is None) == (eager is None)
    if value is not None:
        assert (value - eager).abs().max() <= share * eager.abs().max(), (value, eager)


@pytest.mark.parametrize("model", ["ppca", "vae"])
@pytest.mark.parametrize("name, options", OBJECTIVES)
def test_compiled_step_has_the_losses_and_gradients_of_the_eager_step(replayed_step, model,
                                                                      name, options):
    """Same seed, same draws, same loss and gradients, for two batch shapes (a recording each)
    and a KL weight that changes between steps without a new recording (an input of the
    graph). PIWAE's and DReG's routing of different gradients to model and guide survives."""
    _, experiment = _experiment(model)
    objective = make_objective(name, **options)
    parameters = [*experiment.model.parameters(), *experiment.guide.parameters()]
    step = compiled.CompiledLoss(objective, experiment.model, experiment.guide)
    eager = partial(objective.differentiable_loss, experiment.model, experiment.guide)
    for epochs, size in [(0.5, 20), (0.5, 7), (1.5, 20)]:
        objective.set_progress(epochs)
        batch = _training_batch(experiment, size)
        results = []
        for loss in (step, eager):
            torch.manual_seed(3)
            value = loss(*batch)
            gradients = torch.autograd.grad(value, parameters, allow_unused=True)
            results.append((value.detach(), gradients, torch.get_rng_state()))
        (value, gradients, state), (eager_value, eager_gradients, eager_state) = results
        assert step.reason is None
        assert torch.equal(state, eager_state)  # the same draws
        _assert_close(value, eager_value)
        for gradient, eager_gradient in zip(gradients, eager_gradients, strict=True):
            _assert_close(gradient, eager_gradient)
    assert len(replayed_step._GRAPHS) == 2


def _train(config, run_dir=None, checkpoint=None):
    """The experiment of ``config`` trained by ``fit``, and its history."""
    experiment = build_experiment(config, quiet=True)
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=experiment.settings, run_dir=run_dir,
                  checkpoint=checkpoint, transform=experiment.train_transform)
    return experiment, history


def _resumes_bitwise(config, tmp_path):
    """A run stopped after its first epoch and resumed ends bitwise where the uninterrupted run
    ends; returns the uninterrupted run's history."""
    straight, history = _train(config)
    stopped = runs.create_run_dir(tmp_path / "stopped")
    _train({**config, "train": {**config["train"], "epochs": 1}}, stopped)
    resumed, _ = _train(config, checkpoint=runs.load_checkpoint(stopped))
    for module, other in [(straight.model, resumed.model), (straight.guide, resumed.guide)]:
        for (name, value), (_, other_value) in zip(module.state_dict().items(),
                                                   other.state_dict().items(), strict=True):
            assert torch.equal(value, other_value), name
    return history


def test_compiled_training_resumes_bitwise(replayed_step, tmp_path):
    config, _ = _experiment("vae", epochs=2, batch_size=500, step="compiled")
    config["objective"] = {**config["objective"], "name": "dreg", "num_particles": 2,
                           "anneal_epochs": 1.0}
    _resumes_bitwise(config, tmp_path)


@pytest.mark.slow
def test_inductor_compiled_training_resumes_bitwise_and_follows_eager_training(tmp_path):
    """The step compiled by inductor (not only its recording): a bitwise resume, and the losses
    of eager training, which it follows up to float rounding."""
    config, _ = _experiment("vae", epochs=2, batch_size=100, step="compiled")
    config["objective"] = {**config["objective"], "name": "dreg", "num_particles": 4,
                           "anneal_epochs": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        history = _resumes_bitwise(config, tmp_path)
    _, eager = _train({**config, "train": {**config["train"], "step": "eager"}})
    for row, eager_row in zip(history, eager, strict=True):
        assert abs(row["train_loss"] - eager_row["train_loss"]) <= 1e-4 * abs(
            eager_row["train_loss"])


class _Model(PyroModule):
    """x_n ~ N(z_n + loc, 1), z_n ~ N(0, I_3); with ``branch``, the scale of x is 2 when the
    batch's mean is positive: a Python branch on the data's values."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))
        self.branch = branch

    def forward(self, x):
        scale = 2.0 if self.branch and x.mean() > 0 else 1.0
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + self.loc, scale).to_event(1), obs=x)


class _Guide(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 6)

    def forward(self, x):
        loc, log_scale = self.net(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def _fit(model, guide, x, step):
    torch.manual_seed(0)
    model.load_state_dict(_Model().state_dict()), guide.load_state_dict(_Guide().state_dict())
    fit(model, guide, make_objective("iwae", num_particles=3), (x,),
        settings=TrainSettings(steps=6, batch_size=10, step=step, quiet=True))
    return [parameter.detach().clone() for parameter in (*model.parameters(),
                                                         *guide.parameters())]


def test_a_data_dependent_branch_falls_back_to_eager_in_one_line(replayed_step):
    x = torch.randn(30, 3) + 0.1
    model, guide = _Model(branch=True), _Guide()
    with pytest.warns(UserWarning) as caught:
        trained = _fit(model, guide, x, "compiled")
    assert [str(warning.message) for warning in caught] == [
        "training eagerly: the model, guide or objective reads a tensor's value in Python (a "
        "data-dependent branch, .item()), which a recording would freeze (--eager skips the "
        "compiled step)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = _fit(model, guide, x, "eager")
    for value, eager_value in zip(trained, eager, strict=True):
        assert torch.equal(value, eager_value)
    assert not replayed_step._GRAPHS


MODEL_FILE = '''
import pyro, pyro.distributions as dist, torch
from pyro.nn import PyroModule

class Model(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + self.loc, SCALE).to_event(1), obs=x)
'''


def _load(path, monkeypatch):
    spec = importlib.util.spec_from_file_location("student_model", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "student_model", module)
    spec.loader.exec_module(module)
    return module.Model()


def test_an_edited_model_file_gets_a_fresh_capture(replayed_step, tmp_path, monkeypatch):
    """A second model from the same file reuses the recording; after the file is edited (the
    student changes the likelihood's scale and trains again), a new recording is taken, and it
    computes the new model's loss."""
    path, x = tmp_path / "student_model.py", torch.randn(10, 3)
    objective = make_objective("elbo")
    losses = []
    for scale, recordings in [(1.0, 1), (1.0, 1), (0.5, 2)]:
        path.write_text(MODEL_FILE.replace("SCALE", str(scale)))
        model, guide = _load(path, monkeypatch), _Guide()
        step = compiled.CompiledLoss(objective, model, guide)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            losses.append(step(x).item())
        assert len(replayed_step._GRAPHS) == recordings
        torch.manual_seed(0)
        assert losses[-1] == pytest.approx(objective.differentiable_loss(model, guide, x).item(),
                                           rel=1e-6)
    assert losses[0] != losses[2]


def test_short_runs_train_eagerly_and_long_ones_compiled():
    """auto compiles a run of at least COMPILE_MIN_STEPS steps, from its first step for a
    fixed budget and from step COMPILE_MIN_STEPS on for training to convergence (a cap)."""
    model, guide, objective = _Model(), _Guide(), make_objective("elbo")
    short = compiled.step_loss(objective, model, guide, "auto", compiled.COMPILE_MIN_STEPS - 1)
    assert not isinstance(short, compiled.CompiledLoss)
    assert not isinstance(compiled.step_loss(objective, model, guide, "eager", 10**6),
                          compiled.CompiledLoss)
    forced = compiled.step_loss(objective, model, guide, "compiled", 10)
    long = compiled.step_loss(objective, model, guide, "auto", compiled.COMPILE_MIN_STEPS)
    capped = compiled.step_loss(objective, model, guide, "auto", 10**5, budget_is_cap=True)
    assert (forced.first, long.first, capped.first) == (0, 0, compiled.COMPILE_MIN_STEPS)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_has_the_losses_and_gradients_of_the_eager_step():
    """On CUDA the recording is compiled by inductor and replayed as a CUDA graph: the draws of
    the GPU's generator, the loss and the gradients are those of the eager step, replay after
    replay (whose outputs the next replay would overwrite)."""
    _, experiment = _experiment("vae")
    model, guide = experiment.model.cuda(), experiment.guide.cuda()
    objective = make_objective("dreg", num_particles=4)
    parameters = [*model.parameters(), *guide.parameters()]
    step = compiled.CompiledLoss(objective, model, guide)
    eager = partial(objective.differentiable_loss, model, guide)
    batch = tuple(tensor.cuda() for tensor in _training_batch(experiment, 20))
    for seed in range(3):
        results = []
        for loss in (step, eager):
            torch.cuda.manual_seed(seed)
            value = loss(*batch)
            results.append((value.detach(), torch.autograd.grad(value, parameters),
                            torch.cuda.get_rng_state()))
        assert step.reason is None
        (value, gradients, state), (eager_value, eager_gradients, eager_state) = results
        assert torch.equal(state, eager_state)
        _assert_close(value, eager_value, 1e-4)
        for gradient, eager_gradient in zip(gradients, eager_gradients, strict=True):
            _assert_close(gradient, eager_gradient, 1e-4)
