"""Seconds per MNIST epoch: zoo's VAE against the same VAE in plain PyTorch.

Both sides train the default ``vae`` of the registry on dynamically binarized MNIST: the
architecture of Burda et al. (2015), 784-200-200-50 with tanh, a Bernoulli decoder, the ELBO
with the KL in closed form, the default batch size (20) and Adam with learning rate 1e-3.

- ``zoo``: :func:`zoo.train.fit` with the registry's model and guide and the ``elbo``
  objective: Pyro traces of guide and model each step, the engine's finiteness checks.
- ``zoo-jit``: the same with ``--jit`` (``TrainSettings(jit=True)``): the loss recorded once per
  batch shape by ``torch.jit.trace`` and replayed without Pyro's Python work
  (:func:`zoo.objectives.traced_loss`); it trains bitwise the same parameters as ``zoo``.
- ``plain``: the floor, a VAE written here in plain PyTorch with the same network, loss, batch
  size, binarization and optimizer (the engine's, :func:`zoo.optimize.make_optimizer`: Adam with
  torch's fused kernel), and no checks.

The three alternate epoch by epoch (zoo, plain, zoo-jit, then the reverse order),
so a change in the machine's load hits all of them alike; zoo continues from its checkpoint
each epoch, as ``zoo train --resume`` does. Each row reports the median seconds per epoch, the
ratio to ``plain`` (the target is at most 1.15) and the test ELBO on the seeded binarization
of the test set after its epochs (10000 images, 10 particles each).

Then Pyro's VAE tutorial configuration (784-400-50 MLP with softplus, batch 256, Adam 1e-3, a
Bernoulli likelihood on the grey levels, the KL estimated from the draws as Pyro's
``Trace_ELBO`` does) is trained with ``fit`` for ``--tutorial-epochs`` epochs; its seconds per
epoch and test ELBO (on grey levels, as in the tutorial) are reported.

Peak memory is measured apart, in a fresh process per configuration that loads MNIST and
trains it for ``MEMORY_STEPS`` steps (one binarization of the training set included): the
peak resident memory of that process, sampled every 10 ms, and how much of it training added.

Run it with

    python benchmarks/vae_epoch.py [--epochs 1] [--data-dir ../shared/data] [--threads 1]

It prints a table and writes the numbers to ``--out`` as JSON. Without MNIST in
``DATA_DIR/MNIST/raw`` it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro
import torch
from memory import PeakMemory
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from zoo import runs
from zoo.data import Data, binarize, load_data
from zoo.evaluate import average_loss
from zoo.guides.vae import SIGMA_MIN
from zoo.guides.vae import MeanFieldGuide as VAEGuide
from zoo.models.vae import VAE
from zoo.objectives import ELBO
from zoo.optimize import make_optimizer
from zoo.registry import build, get_model
from zoo.train import TrainSettings, fit

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CONFIGURATIONS = ("plain", "zoo", "zoo-jit", "pyro-tutorial")
TEST_PARTICLES = 10
MEMORY_STEPS = 300
TARGET_RATIO = 1.15


def build_parser() -> argparse.ArgumentParser:
    defaults = get_model("vae").train
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs timed for each of zoo, plain and zoo-jit "
                             "(default: %(default)s)")
    parser.add_argument("--tutorial-epochs", type=int, default=None, metavar="E",
                        help="epochs of Pyro's tutorial configuration (default: --epochs; "
                             "0 skips it)")
    parser.add_argument("--data-dir", default=os.environ.get("ZOO_DATA", "../shared/data"),
                        help="folder holding MNIST/raw (default: $ZOO_DATA or %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="batch size of zoo and plain (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory processes")
    parser.add_argument("--out", default="benchmarks/results/vae_epoch.json", metavar="FILE",
                        help="JSON results (default: %(default)s)")
    return parser


# --- the floor: the same VAE in plain PyTorch -----------------------------------------------

class PlainVAE(nn.Module):
    """Encoder 784-200-200-(50, 50) and decoder 50-200-200-784 with tanh, a pixel bias at the
    logit of the mean training image, sigma = softplus(.) + SIGMA_MIN: zoo's default VAE."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: tuple[int, ...],
                 x_mean: Tensor):
        super().__init__()
        sizes = [data_dim, *hidden]
        encoder: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            encoder += [nn.Linear(n_in, n_out), nn.Tanh()]
        self.encoder = nn.Sequential(*encoder, nn.Linear(sizes[-1], 2 * latent_dim))
        sizes = [latent_dim, *hidden[::-1]]
        decoder: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            decoder += [nn.Linear(n_in, n_out), nn.Tanh()]
        self.decoder = nn.Sequential(*decoder, nn.Linear(sizes[-1], data_dim, bias=False))
        self.bias = nn.Parameter(torch.logit(x_mean.clamp(1e-3, 1 - 1e-3)))

    def loss(self, x: Tensor, num_particles: int = 1) -> Tensor:
        """-sum_n ELBO(x_n): Bernoulli reconstruction on K draws and the closed-form KL."""
        mu, raw = self.encoder(x).chunk(2, -1)
        sigma = softplus(raw) + SIGMA_MIN
        z = mu + sigma * torch.randn((num_particles, *mu.shape), device=x.device)
        logits = self.decoder(z) + self.bias
        reconstruction = binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="sum") / num_particles
        kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).sum()
        return reconstruction + kl


def plain_epoch(vae: PlainVAE, optimizer: torch.optim.Optimizer, x: Tensor, batch_size: int,
                max_steps: int | None = None) -> None:
    """One epoch: a fresh binarization of the whole tensor, a random order, minibatches."""
    x_bin = binarize(x)
    order = torch.randperm(x.shape[0], device=x.device)
    for step, begin in enumerate(range(0, x.shape[0], batch_size)):
        if step == max_steps:
            break
        batch = x_bin[order[begin:begin + batch_size]]
        loss = vae.loss(batch) / batch.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def plain_test_elbo(vae: PlainVAE, x: Tensor, seed: int, chunk_size: int = 1000) -> float:
    """The mean ELBO per image of ``x`` with ``TEST_PARTICLES`` draws each, seeded."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        total = sum(float(vae.loss(x[start:start + chunk_size], TEST_PARTICLES))
                    for start in range(0, x.shape[0], chunk_size))
    return -total / x.shape[0]


def tutorial_networks(data_dim: int) -> tuple[VAE, VAEGuide]:
    """Pyro's VAE tutorial: 784-400-50 with softplus both ways, Bernoulli decoder."""
    return (VAE(data_dim, 50, hidden_dims=(400,), activation="softplus"),
            VAEGuide(data_dim, 50, hidden_dims=(400,), activation="softplus"))


# --- timing -----------------------------------------------------------------------------------

def _timed(run: Callable[[], Any], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def compare(data: Data, args: argparse.Namespace, device: torch.device,
            work_dir: Path) -> dict[str, Any]:
    """zoo, plain and zoo-jit, alternating epoch by epoch."""
    x = data.x_train.to(device)
    x_test = binarize(data.x_test, torch.Generator().manual_seed(1)).to(device)
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=device.type, quiet=True)
    sides: dict[str, dict[str, Any]] = {}
    for name in ("zoo", "zoo-jit"):
        pyro.set_rng_seed(args.seed)
        model, guide = build(get_model("vae"), None, data, {})
        sides[name] = {"model": model, "guide": guide, "seconds": [],
                       "run_dir": runs.create_run_dir(work_dir / name, force=True)}
    pyro.set_rng_seed(args.seed)
    latent_dim = sides["zoo"]["model"].latent_dim
    plain = PlainVAE(data.data_dim, latent_dim, (200, 200), data.x_train.mean(0)).to(device)
    plain_optimizer = make_optimizer("adam", [*plain.parameters()], args.lr)
    sides["plain"] = {"seconds": []}

    def zoo_epoch(side: dict[str, Any], epoch: int) -> Callable[[], Any]:
        checkpoint = runs.load_checkpoint(side["run_dir"]) if epoch > 0 else None
        return lambda: fit(side["model"], side["guide"], ELBO(), (x,),
                           settings=replace(settings, epochs=epoch + 1,
                                            jit=side is sides["zoo-jit"]),
                           run_dir=side["run_dir"], checkpoint=checkpoint,
                           transform=lambda inputs: (binarize(inputs[0]),))

    order = ["zoo", "plain", "zoo-jit"]
    for epoch in range(args.epochs):
        for name in (order if epoch % 2 == 0 else order[::-1]):
            side = sides[name]
            if name == "plain":
                run = lambda: plain_epoch(plain, plain_optimizer, x, args.batch_size)  # noqa: E731
            else:
                run = zoo_epoch(side, epoch)
            side["seconds"].append(_timed(run, device))
            print(f"  epoch {epoch + 1} {name:18s} {side['seconds'][-1]:8.1f} s", flush=True)

    results = {}
    floor = statistics.median(sides["plain"]["seconds"])
    for name, side in sides.items():
        if name == "plain":
            elbo = plain_test_elbo(plain, x_test, args.seed)
        else:
            elbo = -average_loss(ELBO(num_particles=TEST_PARTICLES), side["model"],
                                 side["guide"], (x_test,), seed=args.seed)
        seconds = statistics.median(side["seconds"])
        results[name] = {"seconds_per_epoch": seconds, "epoch_seconds": side["seconds"],
                         "ratio_to_plain": seconds / floor, "test_elbo": elbo}
    return results


def tutorial(data: Data, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Pyro's VAE tutorial configuration trained with ``fit`` on grey levels."""
    pyro.set_rng_seed(args.seed)
    model, guide = tutorial_networks(data.data_dim)
    settings = TrainSettings(epochs=args.tutorial_epochs, batch_size=256, lr=1e-3,
                             seed=args.seed, device=device.type, quiet=True)
    history = fit(model, guide, ELBO(analytic_kl=False), (data.x_train,), settings=settings)
    elbo = -average_loss(ELBO(num_particles=TEST_PARTICLES, analytic_kl=False), model, guide,
                         (data.x_test.to(device),), seed=args.seed)
    print(f"  pyro-tutorial        {sum(row['seconds'] for row in history):8.1f} s for "
          f"{args.tutorial_epochs} epoch(s)", flush=True)
    return {"seconds_per_epoch": statistics.median(row["seconds"] for row in history),
            "epoch_seconds": [row["seconds"] for row in history],
            "test_elbo_grey_levels": elbo}


# --- peak memory, one fresh process per configuration -----------------------------------------

def _train_steps(name: str, data: Data, args: argparse.Namespace, device: torch.device,
                 steps: int) -> None:
    """Train configuration ``name`` from scratch for ``steps`` steps."""
    pyro.set_rng_seed(args.seed)
    x = data.x_train.to(device)
    if name == "plain":
        vae = PlainVAE(data.data_dim, 50, (200, 200), data.x_train.mean(0)).to(device)
        plain_epoch(vae, make_optimizer("adam", [*vae.parameters()], args.lr), x, args.batch_size,
                    max_steps=steps)
        return
    settings = TrainSettings(steps=steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, device=device.type, jit=name == "zoo-jit",
                             quiet=True)
    if name == "pyro-tutorial":
        model, guide = tutorial_networks(data.data_dim)
        fit(model, guide, ELBO(analytic_kl=False), (x,),
            settings=replace(settings, batch_size=256, lr=1e-3))
    else:
        model, guide = build(get_model("vae"), None, data, {})
        fit(model, guide, ELBO(), (x,), settings=settings,
            transform=lambda inputs: (binarize(inputs[0]),))


def _memory_child(name: str, args: argparse.Namespace, queue) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_data("mnist", data_dir=str(Path(args.data_dir).expanduser()))
    with PeakMemory(device) as memory:
        _train_steps(name, data, args, device, MEMORY_STEPS)
    queue.put(memory.result())


def peak_memory(name: str, args: argparse.Namespace) -> dict[str, float | None]:
    """Peak memory of a fresh process training ``name`` for ``MEMORY_STEPS`` steps."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_memory_child, args=(name, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


# --- the run ------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict[str, Any] | None:
    raw = Path(args.data_dir).expanduser() / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in MNIST_FILES):
        print(f"MNIST is not in {raw}/ (expected {', '.join(MNIST_FILES)}); "
              f"pass --data-dir DIR. Nothing measured.")
        return None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tutorial_epochs is None:
        args.tutorial_epochs = args.epochs
    device = torch.device(args.device)
    data = load_data("mnist", data_dir=str(Path(args.data_dir).expanduser()))
    print(f"MNIST: {data.num_train} training images; batch {args.batch_size}, Adam "
          f"{args.lr}; {torch.get_num_threads()} torch threads on {device}")
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {
        "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
        "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
        "pyro": pyro.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_before": load_average, "target_ratio": TARGET_RATIO,
    }
    with tempfile.TemporaryDirectory() as work_dir:
        results.update(compare(data, args, device, Path(work_dir)))
    if args.tutorial_epochs > 0:
        results["pyro-tutorial"] = tutorial(data, args, device)
    results["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if not args.no_memory:
        for name in CONFIGURATIONS:
            if name in results:
                results[name]["memory"] = peak_memory(name, args)
    _print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    return results


def _print_table(results: dict[str, Any]) -> None:
    header = (f"{'configuration':<20}{'s/epoch':>9}{'x plain':>9}{'test ELBO':>11}"
              f"{'peak RSS MiB':>14}{'(training)':>12}")
    print(header)
    print("-" * len(header))
    for name in CONFIGURATIONS:
        if name not in results:
            continue
        row = results[name]
        ratio = f"{row['ratio_to_plain']:.2f}" if "ratio_to_plain" in row else ""
        elbo = row.get("test_elbo", row.get("test_elbo_grey_levels"))
        memory = row.get("memory")
        memory_text = (f"{memory['peak_rss_mib']:>14.0f}{memory['training_added_mib']:>12.0f}"
                       if memory else "")
        print(f"{name:<20}{row['seconds_per_epoch']:>9.1f}{ratio:>9}{elbo:>11.2f}{memory_text}")
    print(f"target: zoo within {TARGET_RATIO}x of plain. pyro-tutorial: batch 256, Bernoulli on "
          f"grey levels, its ELBO on grey levels (not comparable with the binarized rows)")


if __name__ == "__main__":
    main(build_parser().parse_args())
