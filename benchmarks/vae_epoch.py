"""Seconds per MNIST epoch: zoo's VAE against plain PyTorch, Pyro's example and NumPyro.

Two settings, each trained on MNIST held in memory as tensors:

- ``burda``: the registry's default ``vae``, the architecture of Burda et al. (2015),
  784-200-200-50 with tanh, dynamically binarized images, a Bernoulli decoder, the ELBO with
  the KL in closed form, batch 20, Adam 1e-3;
- ``tutorial``: Pyro's VAE tutorial, 784-400-50 with softplus, a Bernoulli likelihood on the
  grey levels, the KL estimated from the draws (Pyro's ``Trace_ELBO``), batch 256, Adam 1e-3.

Contenders, alternating epoch by epoch (in one order, then the reverse), so that a change in the
machine's load hits all of them alike:

- ``plain``: the floor, the same network, loss, batch and optimizer (the engine's Adam with
  torch's fused kernel, :func:`zoo.optimize.make_optimizer`) written in plain eager PyTorch;
- ``zoo``: :func:`zoo.train.fit` with its default step (``auto``: compiled for runs of
  ``COMPILE_MIN_STEPS`` steps or more, see :mod:`zoo.compiled`) in a run of ``--run-epochs``
  epochs (the registry's 10 by default) of which the first ``--epochs`` are timed: the run
  stops after each epoch and continues from its checkpoint, as ``zoo train --resume`` does;
- ``zoo-compiled``: the same with ``step="compiled"`` (``--compile``), and ``zoo-eager`` with
  ``step="eager"`` (``--eager``);
- ``pyro-example``: the network, model, guide and loop of Pyro's ``examples/vae/vae.py``
  (``pyro.module``, ``SVI`` with ``Trace_ELBO`` and Pyro's Adam, ``svi.step`` per batch), its
  layers those of the setting, fed the same pre-loaded tensors;
- ``numpyro``: NumPyro's ``examples/vae.py`` (stax networks, ``SVI`` with ``Trace_ELBO``) with
  a ``jax.jit``-compiled ``svi.update`` (the decoder gives logits, and the Bernoulli takes grey
  levels without NumPyro's support check, which would make their log density -inf, as Pyro's
  example does with ``validate_args=False``), when ``numpyro`` and ``jax`` are importable (an
  optional extra of this benchmark, never a dependency of zoo).

The compiled graphs of zoo are compiled before the timed epochs (once per batch shape; the
seconds are reported as ``compile_seconds``); NumPyro compiles its update within its first
epoch, so compare its later epochs (``epoch_seconds``). Each row
reports the median seconds per epoch, its ratio to ``plain`` and the test ELBO after the same
epochs (10 particles per image; binarized with a fixed seed for ``burda``, grey levels for
``tutorial``).

    python benchmarks/vae_epoch.py [--epochs 2] [--settings burda tutorial] [--threads 1]

It prints a table and writes it to ``--out`` as JSON and, beside it, as Markdown. Without MNIST
in ``DATA_DIR/MNIST/raw`` it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from zoo import compiled, runs
from zoo.data import Data, binarize, load_data
from zoo.evaluate import average_loss
from zoo.guides.vae import MeanFieldGuide as VAEGuide
from zoo.models.vae import VAE
from zoo.networks import SIGMA_MIN
from zoo.objectives import ELBO
from zoo.optimize import make_optimizer, parameter_groups
from zoo.registry import build, get_model
from zoo.settings import TrainSettings
from zoo.train import eager_step, fit, trainable_parameters

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CONTENDERS = ("plain", "zoo", "zoo-compiled", "zoo-eager", "pyro-example", "numpyro")
TEST_PARTICLES = 10
TARGET_RATIO = 0.75


@dataclass(frozen=True)
class Setting:
    hidden: tuple[int, ...]
    activation: str
    batch_size: int
    binarized: bool
    analytic_kl: bool
    latent_dim: int = 50
    lr: float = 1e-3


SETTINGS = {"burda": Setting((200, 200), "tanh", 20, binarized=True, analytic_kl=True),
            "tutorial": Setting((400,), "softplus", 256, binarized=False, analytic_kl=False)}
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2,
                        help="timed epochs of each contender (default: %(default)s)")
    parser.add_argument("--run-epochs", type=int, default=get_model("vae").train["epochs"],
                        help="the length of zoo's runs, which decides whether its default "
                             "step is compiled (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--data-dir", default=os.environ.get("ZOO_DATA", "../shared/data"),
                        help="folder holding MNIST/raw (default: $ZOO_DATA or %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and XLA) CPU threads (default: their choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/vae_epoch.json", metavar="FILE",
                        help="JSON results (default: %(default)s)")
    return parser


def _epoch_inputs(x: Tensor, setting: Setting) -> Tensor:
    return binarize(x) if setting.binarized else x


# --- the floor: the same VAE in plain PyTorch -----------------------------------------------

def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class PlainVAE(nn.Module):
    """zoo's VAE in plain PyTorch: an encoder to (mu, softplus(.) + SIGMA_MIN), a decoder to
    logits plus a pixel bias b (the logit of the mean training image for ``burda``)."""

    def __init__(self, data_dim: int, setting: Setting, bias: Tensor):
        super().__init__()
        self.setting = setting
        self.encoder = _mlp([data_dim, *setting.hidden, 2 * setting.latent_dim],
                            setting.activation)
        self.decoder = _mlp([setting.latent_dim, *setting.hidden[::-1], data_dim],
                            setting.activation)
        self.decoder[-1].bias = None
        self.bias = nn.Parameter(bias.clone())

    def loss(self, x: Tensor, num_particles: int = 1) -> Tensor:
        """-sum_n ELBO(x_n) on K draws: Bernoulli reconstruction, KL in closed form or from
        the draws (log q(z) - log p(z))."""
        mu, raw = self.encoder(x).chunk(2, -1)
        sigma = softplus(raw) + SIGMA_MIN
        eps = torch.randn((num_particles, *mu.shape), device=x.device)
        z = mu + sigma * eps
        logits = self.decoder(z) + self.bias
        reconstruction = binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="sum") / num_particles
        if self.setting.analytic_kl:
            kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).sum()
        else:  # log N(z | mu, sigma) - log N(z | 0, 1), the 2 pi terms cancelling
            kl = (0.5 * (z.square() - eps.square()) - sigma.log()).sum() / num_particles
        return reconstruction + kl


def plain_epoch(vae: PlainVAE, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    x_epoch = _epoch_inputs(x, vae.setting)
    order = torch.randperm(x.shape[0], device=x.device)
    for begin in range(0, x.shape[0], vae.setting.batch_size):
        batch = x_epoch[order[begin:begin + vae.setting.batch_size]]
        loss = vae.loss(batch) / batch.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def plain_test_elbo(vae: PlainVAE, x: Tensor, seed: int, chunk_size: int = 1000) -> float:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        total = sum(float(vae.loss(x[start:start + chunk_size], TEST_PARTICLES))
                    for start in range(0, x.shape[0], chunk_size))
    return -total / x.shape[0]


# --- Pyro's examples/vae/vae.py ----------------------------------------------------------------

class PyroExampleVAE(nn.Module):
    """Pyro's example: ``Encoder`` (hidden layers, then z_loc and z_scale = exp(.)) and
    ``Decoder`` (hidden layers, then sigmoid pixel probabilities), registered with
    ``pyro.module`` in ``model`` and ``guide``."""

    def __init__(self, data_dim: int, setting: Setting):
        super().__init__()
        self.encoder = _mlp([data_dim, *setting.hidden, 2 * setting.latent_dim],
                            setting.activation)
        self.decoder = nn.Sequential(_mlp([setting.latent_dim, *setting.hidden[::-1], data_dim],
                                          setting.activation), nn.Sigmoid())
        self.latent_dim = setting.latent_dim

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.latent_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.latent_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(z_loc, raw.exp()).to_event(1))


def pyro_example(data: Data, setting: Setting, seed: int) -> dict[str, Callable]:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    vae = PyroExampleVAE(data.data_dim, setting)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": setting.lr}),
                         loss=pyro.infer.Trace_ELBO())
    x = data.x_train

    def epoch() -> None:
        x_epoch = _epoch_inputs(x, setting)
        order = torch.randperm(x.shape[0])
        epoch_loss = 0.0
        for begin in range(0, x.shape[0], setting.batch_size):
            epoch_loss += svi.step(x_epoch[order[begin:begin + setting.batch_size]])

    def test_elbo(x_test: Tensor) -> float:
        elbo = pyro.infer.Trace_ELBO(num_particles=TEST_PARTICLES, vectorize_particles=True)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            total = sum(elbo.loss(vae.model, vae.guide, x_test[start:start + 1000])
                        for start in range(0, x_test.shape[0], 1000))
        return -total / x_test.shape[0]

    return {"epoch": epoch, "test_elbo": test_elbo}


# --- NumPyro's examples/vae.py, jit-compiled ---------------------------------------------------

def numpyro_example(data: Data, setting: Setting, seed: int, threads: int | None
                    ) -> dict[str, Callable] | None:
    """NumPyro's VAE with ``jax.jit(svi.update)``; None when numpyro or jax is missing."""
    if not all(importlib.util.find_spec(name) for name in ("numpyro", "jax")):
        return None
    if threads == 1:  # before jax starts its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from jax.example_libraries import stax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    act = {"tanh": stax.Tanh, "softplus": stax.Softplus}[setting.activation]
    hidden = [layer for size in setting.hidden for layer in (stax.Dense(size), act)]
    decoder_hidden = [layer for size in setting.hidden[::-1] for layer in (stax.Dense(size), act)]
    encoder = stax.serial(*hidden, stax.FanOut(2), stax.parallel(
        stax.Dense(setting.latent_dim), stax.serial(stax.Dense(setting.latent_dim), stax.Exp)))
    decoder = stax.serial(*decoder_hidden, stax.Dense(data.data_dim))  # logits

    def model(batch):
        decode = numpyro.module("decoder", decoder, (batch.shape[0], setting.latent_dim))
        with numpyro.plate("batch", batch.shape[0]):
            z = numpyro.sample("z", ndist.Normal(0, 1).expand([setting.latent_dim]).to_event(1))
            pixels = ndist.Bernoulli(logits=decode(z), validate_args=False)  # grey levels too
            numpyro.sample("obs", pixels.to_event(1), obs=batch)

    def guide(batch):
        encode = numpyro.module("encoder", encoder, (batch.shape[0], data.data_dim))
        z_loc, z_std = encode(batch)
        with numpyro.plate("batch", batch.shape[0]):
            numpyro.sample("z", ndist.Normal(z_loc, z_std).to_event(1))

    svi = SVI(model, guide, Adam(setting.lr), Trace_ELBO())
    update = jax.jit(svi.update)
    x = data.x_train
    state = {"svi": svi.init(jax.random.PRNGKey(seed), jnp.asarray(x[:setting.batch_size].numpy()))}

    def epoch() -> None:
        x_epoch = jnp.asarray(_epoch_inputs(x, setting).numpy())
        order = torch.randperm(x.shape[0]).numpy()
        svi_state = state["svi"]
        for begin in range(0, x.shape[0], setting.batch_size):
            svi_state, loss = update(svi_state, x_epoch[order[begin:begin + setting.batch_size]])
        jax.block_until_ready(loss)
        state["svi"] = svi_state

    def test_elbo(x_test: Tensor) -> float:
        params = svi.get_params(state["svi"])
        elbo = Trace_ELBO(num_particles=TEST_PARTICLES)
        key, x_test, total = jax.random.PRNGKey(seed), jnp.asarray(x_test.numpy()), 0.0
        for start in range(0, x_test.shape[0], 1000):
            key, subkey = jax.random.split(key)
            total += float(elbo.loss(subkey, params, model, guide, x_test[start:start + 1000]))
        return -total / x_test.shape[0]

    return {"epoch": epoch, "test_elbo": test_elbo, "compile": lambda: None}


# --- zoo ----------------------------------------------------------------------------------------

def zoo_networks(data: Data, setting: Setting, name: str) -> tuple[VAE, VAEGuide]:
    if name == "burda":  # the registry's default VAE, decoder bias at the mean image's logit
        return build(get_model("vae"), None, data, {})
    return (VAE(data.data_dim, setting.latent_dim, hidden_dims=setting.hidden,
                activation=setting.activation),
            VAEGuide(data.data_dim, setting.latent_dim, hidden_dims=setting.hidden,
                     activation=setting.activation))


class _EpochDone(Exception):
    """Stops a zoo run after the epoch being timed."""


def _stop(row: dict[str, Any]) -> None:
    raise _EpochDone


def zoo_contender(data: Data, setting: Setting, name: str, step: str, seed: int,
                  run_epochs: int, device: torch.device, work_dir: Path
                  ) -> dict[str, Callable]:
    pyro.set_rng_seed(seed)
    model, guide = zoo_networks(data, setting, name)
    run_dir = runs.create_run_dir(work_dir, force=True)
    x = data.x_train.to(device)
    settings = TrainSettings(epochs=run_epochs, batch_size=setting.batch_size, lr=setting.lr,
                             seed=seed, device=device.type, step=step, quiet=True)
    epochs = {"done": 0}

    def epoch() -> None:
        checkpoint = runs.load_checkpoint(run_dir) if epochs["done"] else None
        epochs["done"] += 1
        try:
            fit(model, guide, ELBO(analytic_kl=setting.analytic_kl), (x,), settings=settings,
                run_dir=run_dir, checkpoint=checkpoint, on_epoch=_stop,
                transform=(lambda inputs: (binarize(inputs[0]),)) if setting.binarized
                else None)
        except _EpochDone:
            pass

    def test_elbo(x_test: Tensor) -> float:
        return -average_loss(ELBO(num_particles=TEST_PARTICLES, analytic_kl=setting.analytic_kl),
                             model, guide, (x_test.to(device),), seed=seed)

    def compile_step() -> None:
        """Compile the graphs of both batch shapes of an epoch on copies of the networks."""
        model, guide = copies = zoo_networks(data, setting, name)
        objective = ELBO(analytic_kl=setting.analytic_kl)
        parameters = trainable_parameters(model, guide, freeze_model=False)
        optimizer = make_optimizer("adam", parameter_groups(copies, parameters), setting.lr)
        eager = eager_step(partial(objective.differentiable_loss, *copies), optimizer,
                           parameters, settings)
        step = compiled.CompiledStep(eager, objective, model, guide, optimizer)
        last = data.num_train % setting.batch_size or setting.batch_size
        for size in {setting.batch_size, last}:
            step((x[:size],))

    return {"epoch": epoch, "test_elbo": test_elbo, "compile": compile_step}


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def compare(data: Data, name: str, args: argparse.Namespace, device: torch.device,
            work_dir: Path) -> dict[str, Any]:
    """The contenders of one setting, alternating epoch by epoch."""
    setting = SETTINGS[name]
    x_test = (binarize(data.x_test, torch.Generator().manual_seed(1)) if setting.binarized
              else data.x_test)
    contenders: dict[str, dict[str, Callable] | None] = {}
    for contender in args.contenders:
        if contender == "plain":
            pyro.set_rng_seed(args.seed)
            bias = (torch.logit(data.x_train.mean(0).clamp(1e-4, 1 - 1e-4)) if name == "burda"
                    else torch.zeros(data.data_dim))
            vae = PlainVAE(data.data_dim, setting, bias).to(device)
            optimizer = make_optimizer("adam", [*vae.parameters()], setting.lr)
            x = data.x_train.to(device)
            contenders[contender] = {
                "epoch": lambda vae=vae, optimizer=optimizer, x=x: plain_epoch(vae, optimizer, x),
                "test_elbo": lambda x_test, vae=vae: plain_test_elbo(vae, x_test.to(device),
                                                                     args.seed)}
        elif contender.startswith("zoo"):
            step = {"zoo": "auto", "zoo-compiled": "compiled", "zoo-eager": "eager"}[contender]
            contenders[contender] = zoo_contender(data, setting, name, step, args.seed,
                                                  args.run_epochs, device,
                                                  work_dir / f"{name}-{contender}")
        elif contender == "pyro-example" and device.type == "cpu":
            contenders[contender] = pyro_example(data, setting, args.seed)
        elif contender == "numpyro" and device.type == "cpu":
            contenders[contender] = numpyro_example(data, setting, args.seed, args.threads)
    contenders = {key: value for key, value in contenders.items() if value is not None}
    results: dict[str, Any] = {"setting": vars(setting) | {"hidden": list(setting.hidden)}}
    compile_seconds = {}
    for contender in ("zoo-compiled", "zoo"):  # zoo compiles only if its run is long enough
        steps = args.run_epochs * -(-data.num_train // setting.batch_size)
        if contender in contenders and (contender == "zoo-compiled"
                                        or steps >= compiled.COMPILE_MIN_STEPS):
            compile_seconds[contender] = _timed(contenders[contender]["compile"], device)
            print(f"  {name} {contender}: compiled in {compile_seconds[contender]:.1f} s",
                  flush=True)
    seconds: dict[str, list[float]] = {contender: [] for contender in contenders}
    order = list(contenders)
    for epoch in range(args.epochs):
        for contender in (order if epoch % 2 == 0 else order[::-1]):
            seconds[contender].append(_timed(contenders[contender]["epoch"], device))
            print(f"  {name} epoch {epoch + 1} {contender:14s} {seconds[contender][-1]:8.1f} s",
                  flush=True)
    floor = statistics.median(seconds["plain"]) if "plain" in seconds else None
    for contender, runner in contenders.items():
        median = statistics.median(seconds[contender])
        results[contender] = {"seconds_per_epoch": median, "epoch_seconds": seconds[contender],
                              "ratio_to_plain": None if floor is None else median / floor,
                              "test_elbo": runner["test_elbo"](x_test),
                              "compile_seconds": compile_seconds.get(contender)}
    return results


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    raw = Path(args.data_dir).expanduser() / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in MNIST_FILES):
        print(f"MNIST is not in {raw}/ (expected {', '.join(MNIST_FILES)}); "
              f"pass --data-dir DIR. Nothing measured.")
        return None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_data("mnist", data_dir=str(Path(args.data_dir).expanduser()))
    print(f"MNIST: {data.num_train} training images; {torch.get_num_threads()} torch threads "
          f"on {device}")
    results: dict[str, Any] = {
        "epochs": args.epochs, "threads": torch.get_num_threads(), "device": str(device),
        "torch": torch.__version__, "pyro": pyro.__version__, "machine": platform.platform(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(), "target_ratio": TARGET_RATIO,
        "compile_min_steps": compiled.COMPILE_MIN_STEPS, "zoo_run_epochs": args.run_epochs,
    }
    if importlib.util.find_spec("numpyro"):
        import jax
        import numpyro
        results |= {"numpyro": numpyro.__version__, "jax": jax.__version__}
    with tempfile.TemporaryDirectory() as work_dir:
        for name in args.settings:
            results[name] = compare(data, name, args, device, Path(work_dir))
    results["load_average_after"] = os.getloadavg()
    table = markdown_table(results, args.settings)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"written to {out} and {out.with_suffix('.md')}")
    return results


def markdown_table(results: dict[str, Any], settings: list[str]) -> str:
    """Seconds per epoch, the ratio to plain PyTorch, test ELBO and compile time per contender,
    headed by the date, threads and load."""
    load = results["load_average_before"][0], results["load_average_after"][0]
    lines = [f"{results['date']}; {results['threads']} torch "
             f"thread(s); load average {load[0]:.1f} before, {load[1]:.1f} after. Target: zoo "
             f"at most {TARGET_RATIO}x plain and at most NumPyro's time. The tutorial setting's "
             "ELBO is on grey levels, not comparable with burda's.", "",
             "| setting | contender | s/epoch | x plain | test ELBO | compile s |",
             "|---|---|---|---|---|---|"]
    for name in settings:
        for contender in CONTENDERS:
            row = results[name].get(contender)
            if row is None:
                continue
            ratio = "" if row["ratio_to_plain"] is None else f"{row['ratio_to_plain']:.2f}"
            built = "" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
            lines.append(f"| {name} | {contender} | {row['seconds_per_epoch']:.1f} | {ratio} | "
                         f"{row['test_elbo']:.2f} | {built} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(build_parser().parse_args())
