"""Speed-up of several processes against one: the MNIST VAE trained with IWAE(5), and its
importance-sampled test log-likelihood.

Each configuration runs the ``zoo`` command as a user would, in a fresh process:

- ``1 process``: ``zoo train vae --dataset mnist --loss iwae --particles 5 ...`` with
  ``OMP_NUM_THREADS=1`` (and, with ``--threads-baseline``, with N threads too);
- ``N processes``: the same with ``--nproc N`` (torch's launcher, gloo, one thread each).

Training is timed by the engine itself (the ``seconds`` column of metrics.csv: the training
steps alone, without start-up, data loading and the test loss); a shortened epoch of
``--steps`` steps is used, so that the benchmark fits on a loaded machine. Evaluation is timed
from outside (``zoo evaluate RUN --split test --particles K``, start-up included, measured
apart as the time of the same command with ``--particles 1``). The configurations alternate,
repeat after repeat, so that a change in the machine's load hits them alike; the table gives
the median and the speed-up against one process with one thread, next to the load average.

Run it with

    python benchmarks/distributed.py [--data-dir ../shared/data] [--steps 300] [--repeats 2]

It prints a table and writes it to ``--out`` as JSON and, beside it, as Markdown. Without MNIST
in ``DATA_DIR/MNIST/raw`` it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zoo import runs

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("ZOO_DATA", "../shared/data"))
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--particles", type=int, default=100,
                        help="K of the timed evaluation (0: no evaluation)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads-baseline", action="store_true",
                        help="also time one process with N threads")
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    return parser


def _zoo(argv: list[str], threads: int) -> float:
    """Run ``python -m zoo ARGV`` with ``threads`` threads per process; its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoo", *argv], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - started


def configurations(nproc: int, threads_baseline: bool) -> list[tuple[str, int, list[str]]]:
    """(label, threads per process, extra arguments)."""
    return [("1 process, 1 thread", 1, []),
            *([(f"1 process, {nproc} threads", nproc, [])] if threads_baseline else []),
            (f"{nproc} processes, 1 thread each", 1, ["--nproc", str(nproc)])]


def main(args: argparse.Namespace) -> dict:
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"no MNIST in {args.data_dir}/MNIST/raw; nothing to measure")
        return {}
    train: dict[str, dict[str, list[float]]] = {}
    evaluation: dict[str, list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for batch_size in args.batch_sizes:
                for label, threads, extra in configurations(args.nproc, args.threads_baseline):
                    run_dir = Path(folder) / f"run-{batch_size}-{len(extra)}-{threads}"
                    _zoo(["train", "vae", "--dataset", "mnist", "--data-dir", args.data_dir,
                          "--loss", "iwae", "--particles", "5", "--steps", str(args.steps),
                          "--batch-size", str(batch_size), "--quiet", "--force",
                          "--out", str(run_dir), *extra], threads)
                    seconds = runs.read_metrics(run_dir)[-1]["seconds"]
                    train.setdefault(str(batch_size), {}).setdefault(label, []).append(seconds)
                    loads.append(os.getloadavg()[0])
            if args.particles:
                run_dir = Path(folder) / f"run-{args.batch_sizes[0]}-0-1"
                for label, threads, extra in configurations(args.nproc, args.threads_baseline):
                    command = ["evaluate", str(run_dir), "--split", "test", *extra]
                    seconds = (_zoo([*command, "--particles", str(args.particles)], threads)
                               - _zoo([*command, "--particles", "1"], threads))
                    evaluation.setdefault(label, []).append(seconds)
                    loads.append(os.getloadavg()[0])
    result = {
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "steps": args.steps, "repeats": args.repeats, "nproc": args.nproc,
        "load_average": [min(loads), max(loads)],
        "train_seconds": {batch: {label: statistics.median(values)
                                  for label, values in row.items()}
                          for batch, row in train.items()},
        "evaluate_seconds": {label: statistics.median(values)
                             for label, values in evaluation.items()},
        "evaluate_particles": args.particles,
    }
    table = markdown_table(result)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(table)
    return result


def markdown_table(result: dict) -> str:
    """Milliseconds per training step and the speed-up per batch size and configuration, then
    the evaluation's seconds, headed by the setting and the load."""
    lines = [f"MNIST VAE, IWAE(5), {result['steps']} steps per run, median of "
             f"{result['repeats']}; {result['cores']} cores, load average "
             f"{result['load_average'][0]:.1f} to {result['load_average'][1]:.1f}", "",
             "| batch | configuration | per step | speed-up vs 1 process, 1 thread |",
             "|---|---|---|---|"]
    for batch, row in result["train_seconds"].items():
        base = row["1 process, 1 thread"]
        for label, seconds in row.items():
            lines.append(f"| {batch} | {label} | {seconds / result['steps'] * 1000:.1f} ms | "
                         f"{base / seconds:.2f}x |")
    if result["evaluate_seconds"]:
        base = result["evaluate_seconds"]["1 process, 1 thread"]
        lines += ["", f"zoo evaluate --split test --particles {result['evaluate_particles']} "
                      "(10000 images), seconds beyond --particles 1:", "",
                  "| configuration | seconds | speed-up |", "|---|---|---|"]
        lines += [f"| {label} | {seconds:.1f} s | {base / seconds:.2f}x |"
                  for label, seconds in result["evaluate_seconds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(build_parser().parse_args())
