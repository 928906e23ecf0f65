"""Seconds per epoch of the IWAE objective, vectorized over particles against K separate passes.

Every objective in ``zoo.objectives`` draws its K particles per data point in one batched pass
of guide and model under a particle plate. This benchmark measures what that buys: one epoch of
training with IWAE(K) for K in {1, 5, 50}, vectorized, against the same objective computed from
K single-particle passes (a Python loop, stacked before the log-mean-exp), on the digits VAE
(``--model ppca`` for PPCA). Both variants run in the same process, alternating, each timed
``--repeats`` times; the table reports the median seconds per epoch and their ratio.

    python benchmarks/objectives.py [--model vae] [--repeats 3] [--out benchmarks/results]

writes ``objectives.json`` and ``objectives.md`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from zoo.experiment import build_experiment, make_config
from zoo.objectives import IWAE, Objective, log_weights
from zoo.settings import TrainSettings
from zoo.train import fit

PARTICLES = (1, 5, 50)


class LoopedIWAE(Objective):
    """IWAE(K) from K separate single-particle passes: the baseline vectorization replaces."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w = torch.cat([log_weights(model, guide, *args, num_particles=1)
                           for _ in range(self.num_particles)])
        return -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()


def epoch_seconds(experiment, objective) -> float:
    """Wall-clock seconds of one training epoch (the model and guide keep training)."""
    settings = TrainSettings(**{**experiment.config["train"], "epochs": 1, "steps": None,
                                "quiet": True})
    started = time.perf_counter()
    fit(experiment.model, experiment.guide, objective, experiment.train_inputs,
        settings=settings, transform=experiment.train_transform)
    return time.perf_counter() - started


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vae", choices=["vae", "ppca"])
    parser.add_argument("--particles", type=int, nargs="+", default=list(PARTICLES))
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    data = {"vae": "digits", "ppca": "synthetic-ppca"}[args.model]
    experiment = build_experiment(make_config(args.model, data={"name": data}), quiet=True)
    epoch_seconds(experiment, IWAE(num_particles=1))  # warm-up: first-call costs are not timed
    rows = []
    for K in args.particles:
        times: dict[str, list[float]] = {"vectorized": [], "looped": []}
        for _ in range(args.repeats):
            times["vectorized"].append(epoch_seconds(experiment, IWAE(num_particles=K)))
            times["looped"].append(epoch_seconds(experiment, LoopedIWAE(num_particles=K)))
        vectorized, looped = (statistics.median(times[name]) for name in ("vectorized",
                                                                            "looped"))
        rows.append({"K": K, "vectorized_s": vectorized, "looped_s": looped,
                     "speedup": looped / vectorized})
        print(f"K={K:3d}: vectorized {vectorized:7.2f} s/epoch, {K} passes {looped:7.2f} "
              f"s/epoch, speed-up {looped / vectorized:5.1f}x", flush=True)
    single = rows[0]["vectorized_s"] if rows[0]["K"] == 1 else float("nan")
    result = {"model": args.model, "data": data,
              "batch_size": experiment.config["train"]["batch_size"],
              "num_train": experiment.data.num_train, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows,
              "single_particle_epoch_s": single,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_before": load_before, "load_after": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "objectives.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"IWAE(K) on {args.model} ({data}, {result['num_train']} training points, batch "
             f"{result['batch_size']}, {result['threads']} thread(s)); median of {args.repeats} "
             f"epochs; {result['date']}, load average {load_before[0]:.1f} before, "
             f"{result['load_after'][0]:.1f} after", "",
             "| K | vectorized (s/epoch) | K passes (s/epoch) | speed-up | vs K=1 epoch |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['K']} | {row['vectorized_s']:.2f} | {row['looped_s']:.2f} | "
              f"{row['speedup']:.1f}x | {row['vectorized_s'] / single:.1f}x |" for row in rows]
    (out / "objectives.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main(build_parser().parse_args())
