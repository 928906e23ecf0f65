"""Seconds of training with one CPU thread against torch's default number of threads.

The small models (PPCA, expnormal, GMM) take steps of a few small tensor operations, where
torch's threads cost more to wake and join than they save, and on a machine whose cores are
busy with other work extra threads only wait for a core. This benchmark trains each model for a
fixed ``--steps`` on its default data, alternating one thread and torch's default, each timed
``--repeats`` times in the same process, and reports the medians, their ratio and the machine's
load average (``os.getloadavg``) before and after, since the ratio depends on it.

``--busy 0 2`` times each model twice: on the machine as it is, and with two other processes
spinning on its CPUs meanwhile (``python -c "while True: pass"``), which stands in for the other
work of a shared machine, reproducibly.

    python benchmarks/threads.py [--models ppca expnormal gmm vae] [--steps 300] [--repeats 3]
                                 [--busy 0 2] [--out benchmarks/results]

writes ``threads.json`` and ``threads.md`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from zoo.experiment import build_experiment, make_config
from zoo.train import fit


def training_seconds(model: str, steps: int, threads: int) -> float:
    """Wall-clock seconds of ``steps`` training steps of ``model`` with its defaults otherwise."""
    config = make_config(model, train={"steps": steps, "threads": threads},
                         options={"restarts": 1} if model == "gmm" else None)
    experiment = build_experiment(config, quiet=True)
    started = time.perf_counter()
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, transform=experiment.train_transform)
    return time.perf_counter() - started


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` other processes spinning on the CPUs while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(processes)]
    try:
        time.sleep(1.0 if spinners else 0.0)  # let them start
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def row(model: str, others: int, args: argparse.Namespace, default: int) -> dict[str, Any]:
    """One table row: the median seconds of ``model`` with one and ``default`` threads."""
    training_seconds(model, 5, 1)  # warm-up: first-call costs are not timed
    times: dict[int, list[float]] = {1: [], default: []}
    for _ in range(args.repeats):
        for threads in times:
            times[threads].append(training_seconds(model, args.steps, threads))
    one, many = (statistics.median(times[threads]) for threads in (1, default))
    print(f"{model:10s} busy {others}: 1 thread {one:6.2f} s, {default} threads {many:6.2f} s, "
          f"ratio {many / one:4.2f}", flush=True)
    return {"model": model, "busy": others, "one_thread_s": one, "default_threads_s": many,
            "ratio": many / one}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppca", "expnormal", "gmm", "vae"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="runs timed per setting")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], metavar="N",
                        help="other processes spinning meanwhile, one table row per model "
                             "and N (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    default = torch.get_num_threads()
    load_before = os.getloadavg()
    rows = []
    for others in args.busy:
        with busy(others):
            rows += [row(model, others, args, default) for model in args.models]
    load_after = os.getloadavg()
    result = {"steps": args.steps, "repeats": args.repeats, "default_threads": default,
              "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{args.steps} training steps with each model's defaults, median of "
             f"{args.repeats}; {result['cpus']} CPUs, torch's default {default} threads; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
             f"({result['date']})", "",
             f"| model | other busy processes | 1 thread (s) | {default} threads (s) | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['busy']} | {row['one_thread_s']:.2f} | "
              f"{row['default_threads_s']:.2f} | {row['ratio']:.2f} |" for row in rows]
    (out / "threads.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main(build_parser().parse_args())
