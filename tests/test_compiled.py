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

from zoo import compiled, runs, updates
from zoo.experiment import build_experiment, make_config
from zoo.objectives import make_objective
from zoo.optimize import OPTIMIZERS
from zoo.settings import TrainSettings
from zoo.train import eager_step, fit

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


def _sgd_step(objective, model, guide, lr=1e4, **options):
    """The compiled step of plain gradient descent at rate ``lr``: its update -lr g shows the
    gradients g the step recorded."""
    parameters = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=lr)
    eager = eager_step(partial(objective.differentiable_loss, model, guide), optimizer,
                       parameters, TrainSettings())
    return compiled.CompiledStep(eager, objective, model, guide, optimizer, **options), parameters


@pytest.mark.parametrize("model", ["ppca", "vae"])
@pytest.mark.parametrize("name, options", OBJECTIVES)
def test_compiled_step_has_the_losses_and_gradients_of_the_eager_step(replayed_step, model,
                                                                      name, options):
    """Same seed, same draws, same loss and gradients, for two batch shapes (a recording each)
    and a KL weight that changes between steps without a new recording (an input of the
    graph). PIWAE's and DReG's routing of different gradients to model and guide survives. The
    gradients are read off the step of gradient descent at a large rate (each step starts
    from the same parameters), so that the parameters' own rounding does not hide them."""
    _, experiment = _experiment(model)
    objective = make_objective(name, **options)
    step, parameters = _sgd_step(objective, experiment.model, experiment.guide)
    start = [parameter.detach().clone() for parameter in parameters]
    for epochs, size in [(0.5, 20), (0.5, 7), (1.5, 20)]:
        objective.set_progress(epochs)
        batch = _training_batch(experiment, size)
        torch.manual_seed(3)
        eager = objective.differentiable_loss(experiment.model, experiment.guide, *batch) / size
        eager_gradients = torch.autograd.grad(eager, parameters, allow_unused=True)
        eager_state = torch.get_rng_state()
        torch.manual_seed(3)
        value = step(batch)
        assert step.reason is None
        assert torch.equal(torch.get_rng_state(), eager_state)  # the same draws
        _assert_close(value, eager.detach())
        for parameter, before, eager_gradient in zip(parameters, start, eager_gradients,
                                                     strict=True):
            gradient = (before - parameter.detach()) / 1e4
            _assert_close(gradient, torch.zeros_like(gradient) if eager_gradient is None
                          else eager_gradient)
        torch._foreach_copy_([parameter.detach() for parameter in parameters], start)
    assert len(replayed_step._GRAPHS) == 2


@pytest.mark.parametrize("optimizer, options", [
    ("adam", {}), ("adam", {"weight_decay": 0.1}), ("adamw", {}), ("sgd", {"weight_decay": 0.1})])
@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_recorded_updates_are_those_of_torchs_optimizers(optimizer, options, clip_norm):
    """zoo.updates, run eagerly, moves parameters and optimizer state as torch's fused
    optimizer does over five steps with changing learning rates, one of them with a loss that
    is not finite (no step)."""
    torch.manual_seed(0)
    ours = [torch.randn(4, 3), torch.randn(5)]
    theirs = [torch.nn.Parameter(tensor.clone()) for tensor in ours]
    reference = OPTIMIZERS[optimizer](theirs, lr=0.1, fused=True, **options)
    recorded = OPTIMIZERS[optimizer]([torch.nn.Parameter(tensor) for tensor in ours], lr=0.1,
                                     **options)
    ours = [group_parameter for group_parameter in recorded.param_groups[0]["params"]]
    for step, lr in enumerate([0.1, 0.05, 0.2, 0.2, 0.01]):
        gradients = [torch.randn_like(tensor) for tensor in ours]
        finite = step != 2
        for optimizers in (reference, recorded):
            optimizers.param_groups[0]["lr"] = lr
        if finite:
            for parameter, gradient in zip(theirs, gradients, strict=True):
                parameter.grad = gradient.clone()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(theirs, clip_norm)
            reference.step()
        rates = updates.step_rates(recorded, torch.device("cpu"))
        with torch.no_grad():
            for parameter, gradient in zip(ours, updates.clip(gradients, clip_norm),
                                           strict=True):
                updates.update(recorded, recorded.param_groups[0], parameter, gradient,
                               updates.state_of(recorded, parameter), rates[0],
                               torch.tensor(finite))
    for parameter, parameter_theirs in zip(ours, theirs, strict=True):
        _assert_close(parameter.detach(), parameter_theirs.detach(), 1e-6)
        state, state_theirs = recorded.state[parameter], reference.state[parameter_theirs]
        assert state.keys() == state_theirs.keys()
        for name in state:
            _assert_close(state[name], state_theirs[name], 1e-6)


def _train(config, run_dir=None, checkpoint=None):
    """The experiment of ``config`` trained by ``fit``, and its history."""
    experiment = build_experiment(config, quiet=True)
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=experiment.settings, run_dir=run_dir,
                  checkpoint=checkpoint, transform=experiment.train_transform)
    return experiment, history


def _straight_and_resumed(config, tmp_path):
    """The run of ``config`` uninterrupted, its history, and the same run stopped after its
    first epoch and resumed from that checkpoint."""
    straight, history = _train(config)
    stopped = runs.create_run_dir(tmp_path / "stopped")
    _train({**config, "train": {**config["train"], "epochs": 1}}, stopped)
    resumed, _ = _train(config, checkpoint=runs.load_checkpoint(stopped))
    return straight, history, resumed


def _resumes_bitwise(config, tmp_path):
    """A run stopped after its first epoch and resumed ends bitwise where the uninterrupted run
    ends; returns the uninterrupted run's history."""
    straight, history, resumed = _straight_and_resumed(config, tmp_path)
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


@pytest.mark.parametrize("options", [{}, {"optimizer": "adamw", "clip_norm": 1.0},
                                     {"optimizer": "sgd", "lr": 1e-3}])
def test_compiled_training_follows_eager_training(replayed_step, small_ppca_config, options):
    """PPCA's loadings train at a learning rate scaled to the data (a parameter group of their
    own): the compiled step's rates per group, clipping and each optimizer follow the eager
    run's losses and parameters up to float rounding."""
    config = {**small_ppca_config, "train": {**small_ppca_config["train"], **options}}
    runs_ = [_train({**config, "train": {**config["train"], "step": step}})
             for step in ("compiled", "eager")]
    (trained, history), (eager, eager_history) = runs_
    assert set(trained.model.step_scales().values()) - {1.0}  # two parameter groups
    for row, eager_row in zip(history, eager_history, strict=True):
        assert row["train_loss"] == pytest.approx(eager_row["train_loss"], rel=1e-5)
    for module, other in [(trained.model, eager.model), (trained.guide, eager.guide)]:
        for value, eager_value in zip(module.state_dict().values(),
                                      other.state_dict().values(), strict=True):
            _assert_close(value, eager_value, 1e-4)


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
        step, _ = _sgd_step(objective, model, guide, lr=0.0)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            losses.append(step((x,)).item())
        assert len(replayed_step._GRAPHS) == recordings
        torch.manual_seed(0)
        assert losses[-1] == pytest.approx(
            objective.differentiable_loss(model, guide, x).item() / len(x), rel=1e-6)
    assert losses[0] != losses[2]


def test_short_runs_train_eagerly_and_long_ones_compiled():
    """auto compiles a run of at least COMPILE_MIN_STEPS steps, from its first step for a
    fixed budget and from step COMPILE_MIN_STEPS on for training to convergence (a cap)."""
    model, guide, objective = _Model(), _Guide(), make_objective("elbo")
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()])

    def step(mode, total_steps, **options):
        return compiled.training_step(eager_step, objective, model, guide, optimizer,
                                      step=mode, total_steps=total_steps, **options)

    assert step("auto", compiled.COMPILE_MIN_STEPS - 1) is eager_step
    assert step("eager", 10**6) is eager_step
    forced, long = step("compiled", 10), step("auto", compiled.COMPILE_MIN_STEPS)
    capped = step("auto", 10**5, budget_is_cap=True)
    assert (forced.first, long.first, capped.first) == (0, 0, compiled.COMPILE_MIN_STEPS)


def test_an_optimizer_without_a_recorded_update_trains_eagerly_in_one_line():
    model, guide = _Model(), _Guide()
    optimizer = torch.optim.RMSprop([*model.parameters(), *guide.parameters()])
    with pytest.warns(UserWarning) as caught:
        step = compiled.training_step(eager_step, make_objective("elbo"), model, guide,
                                      optimizer, step="compiled", total_steps=10)
    assert [str(warning.message) for warning in caught] == [
        "training eagerly: the optimizer RMSprop has no recorded update (--eager skips the "
        "compiled step)"]
    assert step.reason is not None


def test_a_loss_that_is_not_finite_takes_no_step(replayed_step):
    """As the eager step: the loss is returned, the parameters stay (the training loop then
    stops on it), and no fallback is reported; the next finite batch steps."""
    model, guide = _Model(), _Guide()
    step, parameters = _sgd_step(make_objective("elbo"), model, guide, lr=0.1)
    before = [parameter.detach().clone() for parameter in parameters]
    x = torch.randn(10, 3)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch.isfinite(step((torch.where(x > 1, float("nan"), x),)))
        assert list(map(torch.equal, parameters, before)) == [True] * len(before)
        assert torch.isfinite(step((x,)))
    assert step.reason is None
    assert not any(map(torch.equal, parameters, before))


class _Scaled(_Model):
    """The model's likelihood scale a setting read in Python, which a recording freezes."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + self.loc, self.scale).to_event(1), obs=x)


def test_a_failed_check_takes_the_step_eagerly_from_the_state_before_it(replayed_step,
                                                                         monkeypatch):
    """A model whose Python setting changes between steps: the periodic check catches it, the
    state before the step comes back, and the step and the ones after it are eager, so the run
    ends where an eager run ends (up to float rounding of the one compiled step)."""
    monkeypatch.setattr(compiled, "VERIFY_EVERY", 2)
    x = torch.randn(40, 3) + 0.5
    trained, warned = [], []
    for mode in ("compiled", "eager"):
        torch.manual_seed(0)
        model, guide = _Scaled(), _Guide()
        optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=0.1)
        objective = make_objective("elbo")
        parameters = [*model.parameters(), *guide.parameters()]
        eager = eager_step(partial(objective.differentiable_loss, model, guide), optimizer,
                           parameters, TrainSettings())
        step = compiled.training_step(eager, objective, model, guide, optimizer, step=mode,
                                      total_steps=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for scale in (1.0, 3.0, 3.0, 3.0):
                model.scale = scale
                step((x,))
        trained.append([parameter.detach().clone() for parameter in parameters])
        warned.append([str(warning.message) for warning in caught])
    assert warned == [["training eagerly: the loss of the compiled step differs from the eager "
                       "one, so the model or guide branches on the data or on the step "
                       "(--eager skips the compiled step)"], []]
    for value, eager_value in zip(*trained, strict=True):
        _assert_close(value, eager_value, 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_has_the_losses_and_gradients_of_the_eager_step():
    """On CUDA the recording is compiled by inductor and replayed as a CUDA graph: the draws of
    the GPU's generator, the loss and the gradients are those of the eager step, replay after
    replay (whose outputs the next replay would overwrite)."""
    _, experiment = _experiment("vae")
    model, guide = experiment.model.cuda(), experiment.guide.cuda()
    objective = make_objective("dreg", num_particles=4)
    step, parameters = _sgd_step(objective, model, guide)
    start = [parameter.detach().clone() for parameter in parameters]
    batch = tuple(tensor.cuda() for tensor in _training_batch(experiment, 20))
    for seed in range(3):
        torch.cuda.manual_seed(seed)
        eager = objective.differentiable_loss(model, guide, *batch) / 20
        eager_gradients = torch.autograd.grad(eager, parameters)
        eager_state = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(seed)
        value = step(batch)
        assert step.reason is None
        assert torch.equal(torch.cuda.get_rng_state(), eager_state)
        _assert_close(value, eager.detach(), 1e-4)
        for parameter, before, eager_gradient in zip(parameters, start, eager_gradients,
                                                     strict=True):
            _assert_close((before - parameter.detach()) / 1e4, eager_gradient, 1e-4)
        torch._foreach_copy_([parameter.detach() for parameter in parameters], start)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_training_follows_eager_training_and_resumes(tmp_path):
    """On CUDA the step is replayed as a CUDA graph over the run's own parameters and Adam's
    state, which it writes in place; a resumed run's Adam step counts come from the checkpoint on
    the CPU and move to the GPU. Training and resumed training follow eager training's losses
    and parameters up to float rounding, without a fallback."""
    config, _ = _experiment("vae", epochs=2, batch_size=100, step="compiled", device="cuda")
    config["objective"] = {**config["objective"], "name": "dreg", "num_particles": 4,
                           "anneal_epochs": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        trained, history, resumed = _straight_and_resumed(config, tmp_path)
    eager, eager_history = _train({**config, "train": {**config["train"], "step": "eager"}})
    for row, eager_row in zip(history, eager_history, strict=True):
        assert abs(row["train_loss"] - eager_row["train_loss"]) <= 1e-4 * abs(
            eager_row["train_loss"])
    for run in (trained, resumed):
        for module, other in [(run.model, eager.model), (run.guide, eager.guide)]:
            for value, eager_value in zip(module.state_dict().values(),
                                          other.state_dict().values(), strict=True):
                _assert_close(value, eager_value, 1e-3)


def test_gradients_are_compared_at_the_scale_of_the_largest():
    """A gradient near zero (a parameter at its optimum: a small difference of large terms) may
    differ by rounding that is large against itself but not against the largest gradient; a
    difference at the scale of the largest gradient is a branch."""
    parameters = [torch.zeros(3), torch.zeros(())]
    loss, eager = torch.tensor(5.0), [torch.tensor([1e3, -2e3, 5e2]), torch.tensor(1e-6)]
    compiled._compare(loss, [eager[0], torch.tensor(-1e-5)], loss, eager, parameters)
    with pytest.raises(compiled._Fallback, match=r"the gradient of \(\) .* differs"):
        compiled._compare(loss, [eager[0], torch.tensor(10.0)], loss, eager, parameters)
    with pytest.raises(compiled._Fallback, match="the loss .* differs"):
        compiled._compare(torch.tensor(5.1), eager, loss, eager, parameters)
