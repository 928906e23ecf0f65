"""PPCA trained with its default settings on tables it was never tuned for, against the
closed-form maximum likelihood.

Each table is drawn from PPCA with non-orthogonal loadings (columns that share a common
direction), of its own size, scale and conditioning, and written as a CSV file; the digits'
pixels are the one real table. Each row trains ``zoo train ppca --data FILE --latent-dim M``
with the given guide and objective and nothing else, and reports what ``zoo evaluate`` reports
on the training rows: the gap between the closed-form maximum log-likelihood and the learned
model's exact log-likelihood, the mean posterior KL(q || p) (nats per point), the steps taken,
whether the run converged, how many times it left a false stop (``ModelEntry.before_stop``),
and its wall time (one thread, with the machine's load average).

    python benchmarks/ppca_convergence.py [--tables issue-12 ...] [--guides meanfield full]
                                          [--losses elbo iwae] [--out benchmarks/results]
                                          [--random SEED ...] [--name ppca_convergence]
                                          [--resume]

writes ``NAME.json`` and ``NAME.md`` to the output folder after every row. ``--resume`` keeps
the rows an interrupted run of the same command already wrote there and runs only the rest;
each row records when it finished. The README's PPCA tables come from

    python benchmarks/ppca_convergence.py
    python benchmarks/ppca_convergence.py --tables digits --random 101 102 103 104 105 106 \
        --name ppca_random
    python benchmarks/ppca_convergence.py --tables synthetic-ppca --guides G \
        --random 107 108 109 110 --name ppca_random_more_G
    python benchmarks/ppca_convergence.py --tables small-30 large-64 --guides G \
        --losses iwae miwae ciwae piwae dreg --name ppca_objectives_G
    python benchmarks/ppca_convergence.py --tables synthetic-ppca --name ppca_objectives \
        --losses elbo iwae miwae ciwae piwae dreg
    python benchmarks/ppca_convergence.py --tables synthetic-ppca \
        --random 111 112 113 114 115 116 117 118 119 120 --name ppca_random_check

with G each of ``meanfield`` and ``full``. Gaps and KLs are computed in float64
(:func:`zoo.evaluate.closed_form_metrics`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.data import synthetic_ppca
from zoo.evaluate import evaluate
from zoo.experiment import load_run, make_config, train_run
from zoo.runs import read_config

TABLES: dict[str, dict[str, Any]] = {
    # name: rows, latent size, column scales of W, noise sd, shared direction, scale, shift
    "issue-12": dict(N=3000, M=3, scales=[3, 1.5, 0.8], sigma=0.4, shared=1.0, scale=1.0,
                     shift=0.0, D=12, seed=1),
    "small-30": dict(N=2000, M=5, scales=[2, 1.5, 1, 0.5, 0.3], sigma=0.1, shared=2.0,
                     scale=0.01, shift=0.0, D=30, seed=3),
    "large-64": dict(N=4000, M=8, scales=[8, 5, 3, 2, 1.5, 1, 0.7, 0.5], sigma=0.3, shared=1.5,
                     scale=20.0, shift=50.0, D=64, seed=2),
}
"""Synthetic tables: W has columns of the given lengths along directions g_j + shared * g_0
(g standard normal in R^D), so they are far from orthogonal; x = scale (W z + b + sigma eps)."""

NAMED = {"digits": 5, "synthetic-ppca": 2}
"""The zoo's own data sets this benchmark accepts as tables, with their latent sizes: the
digits' 64 pixels (the one real table) and the default synthetic set (D = 10)."""

LOSSES = {"elbo": {}, "iwae": {"num_particles": 8},
          "miwae": {"num_particles": 8, "num_groups": 2},
          "ciwae": {"num_particles": 8, "beta": 0.5},
          "piwae": {"num_particles": 8, "num_groups": 2},
          "dreg": {"num_particles": 8}}


def random_spec(seed: int) -> dict[str, Any]:
    """A table of :data:`TABLES`' kind with every setting drawn at random (from ``seed``): D in
    4..64, M in 1..min(8, D - 1), column lengths log-uniform in [0.2, 10], noise sd in
    [0.05, 1], shared direction in [0, 3], overall scale log-uniform in [1e-3, 1e3], shifts up
    to 100 scale units, N in 500..5000: tables nobody tuned the defaults for."""
    generator = np.random.default_rng(seed)
    D = int(generator.integers(4, 65))
    M = int(generator.integers(1, min(8, D - 1) + 1))
    return dict(N=int(generator.integers(500, 5001)), M=M,
                scales=sorted(np.exp(generator.uniform(np.log(0.2), np.log(10), M)).round(3)
                              .tolist(), reverse=True),
                sigma=round(float(np.exp(generator.uniform(np.log(0.05), 0))), 3),
                shared=round(float(generator.uniform(0, 3)), 2),
                scale=float(10.0 ** round(float(generator.uniform(-3, 3)), 1)),
                shift=round(float(generator.uniform(0, 100)), 1), D=D, seed=seed)


def write_table(name: str, spec: dict[str, Any], folder: Path) -> tuple[Path, int]:
    """Draw the table ``spec`` (as in :data:`TABLES`) into ``folder/name.csv``; return its path
    and latent size."""
    generator = torch.Generator().manual_seed(spec["seed"])
    shared = torch.randn(spec["D"], 1, generator=generator)
    G = torch.randn(spec["D"], spec["M"], generator=generator) + spec["shared"] * shared
    W = G / G.norm(dim=0) * torch.tensor(spec["scales"], dtype=torch.float32)
    b = spec["shift"] * torch.randn(spec["D"], generator=generator)
    x, _ = synthetic_ppca(spec["N"], spec["scale"] * W, spec["scale"] * b,
                          spec["scale"] * spec["sigma"], seed=spec["seed"])
    path = folder / f"{name}.csv"
    np.savetxt(path, x.numpy(), delimiter=",", comments="",
               header=",".join(f"x{d}" for d in range(spec["D"])))
    return path, spec["M"]


def run_row(table: str, data: dict[str, Any], latent_dim: int, guide: str, loss: str,
            folder: Path) -> dict[str, Any]:
    config = make_config("ppca", guide=guide, options={"latent_dim": latent_dim}, data=data,
                         objective={"name": loss, **LOSSES[loss]})
    started = time.perf_counter()
    run_dir = train_run(config, folder / f"{table}-{guide}-{loss}", quiet=True)
    seconds = time.perf_counter() - started
    experiment = load_run(run_dir)
    x = experiment.data.x_train
    with torch.no_grad():
        metrics = evaluate(experiment.model, experiment.guide, x, num_samples=10, train_x=x)
    summary = read_config(run_dir)["convergence"]
    return {"table": table, "guide": guide, "loss": loss,
            "gap": metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"],
            "kl": metrics["posterior_kl"], "steps": summary["steps"],
            "converged": summary["converged"], "escapes": summary["escapes"], "seconds": seconds,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=[*TABLES, "digits"],
                        choices=[*TABLES, *NAMED])
    parser.add_argument("--guides", nargs="+", default=["meanfield", "full"])
    parser.add_argument("--losses", nargs="+", default=["elbo"], choices=list(LOSSES))
    parser.add_argument("--random", nargs="+", type=int, default=[], metavar="SEED",
                        help="add a table drawn at random from each seed (random_spec)")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    parser.add_argument("--name", default="ppca_convergence",
                        help="the output files' name, without suffix")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows that an interrupted run of the same command wrote "
                             "to NAME.json, and run only the others")
    return parser


def earlier_results(path: Path, specs: dict[str, Any]) -> dict[str, Any]:
    """The results an earlier run of the same command wrote to ``path``. A file written from
    other specs of the same tables is an error, not something to mix in."""
    if not path.exists():
        raise SystemExit(f"--resume: {path} does not exist; run without --resume to start")
    earlier = json.loads(path.read_text())
    # a file written before runs recorded their start: its one session is named by its date
    earlier.setdefault("started", earlier["date"])
    changed = [table for table in specs
               if table in earlier["tables"] and earlier["tables"][table] != specs[table]]
    if changed:
        raise SystemExit(f"--resume: {path} was written for other settings of {changed}; "
                         "choose another --name or run without --resume")
    return earlier


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (table, guide, objective) row, writing the results after each, so that an
    interrupted run keeps the rows it finished (``complete`` says whether all did)."""
    specs = {**{table: TABLES[table] for table in args.tables if table in TABLES},
             **{f"random-{seed}": random_spec(seed) for seed in args.random}}
    tables = [*args.tables, *(f"random-{seed}" for seed in args.random)]
    wanted = [(table, guide, loss)
              for table in tables for guide in args.guides for loss in args.losses]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"started": started, "load_before": os.getloadavg(), "cpus": os.cpu_count(),
              "tables": specs, "rows": [], "sessions": [started]}
    if args.resume:
        earlier = earlier_results(Path(args.out) / f"{args.name}.json", specs)
        result.update(started=earlier["started"], load_before=earlier["load_before"],
                      sessions=[*earlier.get("sessions", [earlier["started"]]), started])
        result["rows"] = [row for row in earlier["rows"]
                          if (row["table"], row["guide"], row["loss"]) in wanted]
    done = {(row["table"], row["guide"], row["loss"]) for row in result["rows"]}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for table in tables:
            if table in NAMED:
                data, latent_dim = {"name": table}, NAMED[table]
            else:
                path, latent_dim = write_table(table, specs[table], folder)
                data = {"file": str(path)}
            for guide in args.guides:
                for loss in args.losses:
                    if (table, guide, loss) in done:
                        continue
                    row = run_row(table, data, latent_dim, guide, loss, folder)
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    write_results(result, len(result["rows"]) == len(wanted), Path(args.out),
                                  args.name)
    result["rows"].sort(key=lambda row: wanted.index((row["table"], row["guide"], row["loss"])))
    write_results(result, len(result["rows"]) == len(wanted), Path(args.out), args.name)
    return result


def write_results(result: dict[str, Any], complete: bool, out: Path, name: str) -> None:
    """``NAME.json`` and ``NAME.md`` in ``out``, with the rows so far."""
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  load_after=os.getloadavg(), complete=complete)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    load = (f"load average {result['load_before'][0]:.1f} before, "
            f"{result['load_after'][0]:.1f} after")
    sessions = result.get("sessions", [result["started"]])
    lines = [f"PPCA defaults on untuned tables ({result['started']} to {result['date']}; one "
             f"thread; {load}, {result['cpus']} CPUs)"
             + ("" if len(sessions) < 2 else
                f"; resumed, in {len(sessions)} sessions starting {', '.join(sessions)}")
             + ("" if complete else "; interrupted: only the rows below finished"), "",
             "| table | guide | objective | gap (nats/point) | KL | steps | converged | escapes "
             "| seconds | finished |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['table']} | {row['guide']} | {row['loss']} | {row['gap']:.4f} | "
              f"{row['kl']:.4f} | {row['steps']} | {row['converged']} | "
              f"{row.get('escapes', '')} | {row['seconds']:.0f} | {row.get('finished', '')} |"
              for row in result["rows"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(build_parser().parse_args())
