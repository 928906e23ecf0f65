"""The README's MNIST table: the VAE's defaults (Burda et al.'s 784-200-200-50 network, dynamic
binarization, batch 20, Adam 1e-3) trained for a number of epochs with the ELBO or IWAE, then
evaluated on the test images with 5000 importance samples per image.

Each row is ``zoo train vae --dataset mnist ROW`` followed by
``zoo evaluate RUN --particles 5000 --split test --json``. The long rows take hours on one CPU
thread (training 30-80 minutes, the 5000-sample evaluation about 17 minutes), so ``--rows``
picks some (two runs of this script, each on its own rows, can share a machine's cores); the
table keeps the rows already in the JSON file and replaces those run again, and each row records
its own date and load.

    python benchmarks/mnist.py [--rows 0 1 ...] [--particles 5000] [--threads 1]
                               [--data-dir DIR] [--out benchmarks/results] [--runs DIR]

MNIST is found as ``zoo`` finds it (``--data-dir``, else ``$ZOO_DATA``, else a download).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from zoo import runs
from zoo.experiment import evaluate_run, make_config, train_run

ROWS: tuple[dict[str, Any], ...] = (
    {"epochs": 3},
    {"epochs": 31},
    {"epochs": 165, "published": "-86.76 (VAE, k = 1)"},
    {"epochs": 20, "loss": "iwae", "particles": 5},
    {"epochs": 102, "loss": "iwae", "particles": 5, "published": "-85.54 (IWAE, k = 5)"},
)
"""The table's rows: training epochs and objective; the published test log-likelihood of
Burda et al. (2015, Table 1, one stochastic layer, 3280 epochs) where it is the same objective."""


def command(row: dict[str, Any]) -> str:
    """The ``zoo train`` flags of a row, as the table prints them."""
    flags = [f"--loss {row['loss']} --particles {row['particles']}"] if "loss" in row else []
    return " ".join([*flags, f"--epochs {row['epochs']}"])


def run_row(row: dict[str, Any], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Train and evaluate one row; its table entry."""
    load_before = os.getloadavg()
    objective = ({"name": row["loss"], "num_particles": row["particles"]} if "loss" in row
                 else None)
    data = {"name": args.dataset, **({"data_dir": args.data_dir} if args.data_dir else {})}
    config = make_config("vae", data=data, objective=objective,
                         train={"epochs": row["epochs"], "threads": args.threads})
    run_dir = train_run(config, folder / command(row).replace(" ", "").replace("--", "-"),
                        quiet=args.quiet)
    minutes = sum(epoch["seconds"] for epoch in runs.read_metrics(run_dir)) / 60
    test = evaluate_run(run_dir, num_samples=args.particles, splits=("test",),
                        quiet=args.quiet)["test"]
    return {"command": command(row), "epochs": row["epochs"], "minutes": minutes,
            "test_elbo": test["elbo"], "test_log_likelihood": test["log_likelihood"],
            "active_units": test.get("active_units"), "published": row.get("published", ""),
            "particles": args.particles, "threads": args.threads, "dataset": args.dataset,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": load_before, "load_after": os.getloadavg()}


def write_table(measured: dict[str, dict[str, Any]], out: Path) -> None:
    """``mnist.json`` (rows by command) and ``mnist.md`` in ``out``, in the order of ``ROWS``."""
    (out / "mnist.json").write_text(json.dumps(measured, indent=2) + "\n")
    lines = ["| command (`zoo train vae --dataset mnist ...`) | epochs | minutes | test ELBO | "
             "test log p(x) | active units | published log p(x) | measured (load average) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in (command(row) for row in ROWS):
        if key in measured:
            row = measured[key]
            lines.append(f"| `{key}` | {row['epochs']} | {row['minutes']:.1f} | "
                         f"{row['test_elbo']:.2f} | {row['test_log_likelihood']:.2f} | "
                         f"{row['active_units']} | {row['published']} | {row['date']} "
                         f"({row['load_before'][0]:.1f}) |")
    (out / "mnist.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "mnist.json"
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        for index in args.rows:
            row = run_row(ROWS[index], args, Path(args.runs or temporary))
            print(json.dumps(row), flush=True)
            # read again: another run of this script may have written its rows meanwhile
            measured = json.loads(previous.read_text()) if previous.exists() else {}
            measured[row["command"]] = row
            write_table(measured, out)
    return measured


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))),
                        choices=range(len(ROWS)), metavar="I",
                        help="which rows to run, 0-based (default all: hours)")
    parser.add_argument("--particles", type=int, default=5000,
                        help="importance samples per test image (default 5000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--data-dir", metavar="DIR", help="where MNIST/raw is")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    parser.add_argument("--runs", metavar="DIR", help="keep the run folders in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
