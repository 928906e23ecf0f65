"""Seconds per eager training step of the digits VAE by how model and guide read their networks.

``PyroModule`` reads a plain ``nn.Module`` child through its ``__getattr__``, which sends one
``pyro.param`` message per tensor of the child on every read. The VAE and its guide read their
networks through :class:`zoo.networks.NetworkAttribute` instead. This benchmark times one eager
training step (ELBO, Adam, batch 20, the registry's digits VAE) for three ways of reading:

- ``attribute``: the class attribute of :class:`~zoo.networks.NetworkAttribute` (the zoo's);
- ``modules``: the dictionary ``module._modules[name]`` (the zoo's former way);
- ``hook``: ``PyroModule.__getattr__``, what Python calls without either.

All three run in the same process on the same data, alternating in a rotating order, each from
the same initial parameters; the table reports the median seconds per step over ``--repeats``
rounds of ``--steps`` steps and the ratio to ``modules``, and the median microseconds of one
read of the decoder inside a model call with no Pyro handler active (20,000 reads per round;
in a training step the objective's trace also records each message the hook sends).

    python benchmarks/network_access.py [--steps 300] [--repeats 7] [--threads 1]
                                        [--out benchmarks/results]

writes ``network_access.json`` to the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule

from zoo.experiment import build_experiment, make_config
from zoo.guides.vae import MeanFieldGuide
from zoo.models.vae import VAE
from zoo.optimize import make_optimizer
from zoo.train import eager_step


class ModulesVAE(VAE):
    def decode(self, z):
        return self.observation(self._modules["generation_net"](z))


class ModulesGuide(MeanFieldGuide):
    def distribution(self, x):
        return pyro.distributions.Normal(*self._modules["recognition_net"](x)).to_event(1)


class HookVAE(VAE):
    def decode(self, z):
        return self.observation(PyroModule.__getattr__(self, "generation_net")(z))


class HookGuide(MeanFieldGuide):
    def distribution(self, x):
        network = PyroModule.__getattr__(self, "recognition_net")
        return pyro.distributions.Normal(*network(x)).to_event(1)


VARIANTS = {"attribute": (VAE, MeanFieldGuide), "modules": (ModulesVAE, ModulesGuide),
            "hook": (HookVAE, HookGuide)}
READS = {"attribute": lambda model: model.generation_net,
         "modules": lambda model: model._modules["generation_net"],
         "hook": lambda model: PyroModule.__getattr__(model, "generation_net")}


class ReadingVAE(VAE):
    """A VAE whose call times ``num_reads`` reads of its decoder by ``read``, in microseconds:
    inside the call, as in ``decode``, PyroModule's context is active."""

    def forward(self, read, num_reads: int) -> float:
        start = time.perf_counter()
        for _ in range(num_reads):
            read(self)
        return 1e6 * (time.perf_counter() - start) / num_reads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser


def time_steps(step, x: torch.Tensor, steps: int, batch_size: int) -> float:
    """Seconds per step over ``steps`` steps on random batches of ``x``."""
    batches = [x[torch.randint(len(x), (batch_size,))] for _ in range(steps)]
    start = time.perf_counter()
    for batch in batches:
        step((batch,))
    return (time.perf_counter() - start) / steps


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    experiment = build_experiment(make_config("vae"), quiet=True)
    settings = experiment.settings
    x = torch.bernoulli(experiment.train_inputs[0])
    pyro.enable_validation(False)  # as in training after its first step
    steps = {}
    for name, (model_class, guide_class) in VARIANTS.items():
        model, guide = copy.deepcopy(experiment.model), copy.deepcopy(experiment.guide)
        model.__class__, guide.__class__ = model_class, guide_class
        parameters = [*model.parameters(), *guide.parameters()]
        optimizer = make_optimizer(settings.optimizer, parameters, settings.lr)
        loss_of = partial(experiment.objective.differentiable_loss, model, guide)
        steps[name] = eager_step(loss_of, optimizer, parameters, settings)
        time_steps(steps[name], x, 20, settings.batch_size)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(args.repeats):
        for name in names[repeat % 3:] + names[:repeat % 3]:
            seconds[name].append(time_steps(steps[name], x, args.steps, settings.batch_size))
    reader = copy.deepcopy(experiment.model)
    reader.__class__ = ReadingVAE
    microseconds: dict[str, list[float]] = {name: [] for name in READS}
    for _ in range(args.repeats):
        for name, read in READS.items():
            microseconds[name].append(reader(read, 20000))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    read_median = {name: statistics.median(values) for name, values in microseconds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "load_average": os.getloadavg(), "batch_size": settings.batch_size,
        "steps": args.steps, "repeats": args.repeats,
        "median_seconds_per_step": median, "seconds_per_step": seconds,
        "ratio_to_modules": {name: median[name] / median["modules"] for name in VARIANTS},
        "median_microseconds_per_read": read_median,
    }
    print(f"digits VAE, eager step, batch {settings.batch_size}, {args.threads} thread(s), "
          f"load average {result['load_average'][0]:.2f}")
    for name in VARIANTS:
        print(f"{name:10s} {1e3 * median[name]:7.3f} ms per step   "
              f"ratio to modules {result['ratio_to_modules'][name]:.3f}   "
              f"{read_median[name]:8.2f} us per read")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "network_access.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(build_parser().parse_args())
