"""The README's diagnostics table: every registered model and guide, trained as ``zoo demo``
trains it (the model's demo settings on its default data), then diagnosed on its first test
points as ``zoo diagnose RUN --points 10`` does.

Each row is one run folder; the numbers are means over the diagnosed points (see the README's
*Diagnostics* for what each means). The runs are seeded, so the numbers do not depend on the
machine's load; the seconds do.

    python benchmarks/diagnostics.py [--models ppca gmm ...] [--points 10]
                                     [--out benchmarks/results] [--runs DIR]

writes ``diagnostics.json`` and ``diagnostics.md`` to the output folder. The run folders go to a
temporary folder unless ``--runs DIR`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from zoo.diagnostics import diagnose_run
from zoo.experiment import make_config, train_run
from zoo.registry import MODELS

COLUMNS = ("posterior_kl", "khat_max", "khat_mean", "ess_mean", "sbc_pvalue",
           "approximation_gap", "amortization_gap")
"""The table's columns, keys of ``zoo diagnose --json``."""


def diagnose(model: str, guide: str, points: int, folder: Path, threads: int) -> dict[str, Any]:
    """Train ``model`` with ``guide`` on its demo settings into ``folder``; its diagnostics."""
    entry = MODELS[model]
    config = make_config(model, guide=guide, train={**entry.demo, "threads": threads})
    started = time.perf_counter()
    run_dir = train_run(config, folder / f"{model}-{guide}", quiet=True)
    summary = diagnose_run(run_dir, num_points=points, quiet=True)
    return {"model": model, "guide": guide, "data": config["data"]["name"],
            "seconds": time.perf_counter() - started, **summary}


def cell(value: Any) -> str:
    """A number as the table prints it: four significant digits, blank when absent."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return ""
    return f"{value:.4g}"


def write_table(result: dict[str, Any], out: Path) -> None:
    """``diagnostics.json`` and ``diagnostics.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(result, indent=2) + "\n")
    load = result["load_before"][0], result["load_after"][0]
    lines = [f"Diagnostics of each model's demo run ({result['date']}; {result['threads']} "
             f"thread(s); {result['points']} test points each; load average {load[0]:.1f} "
             f"before, {load[1]:.1f} after)", "",
             "| model, guide | data | " + " | ".join(COLUMNS) + " | s |",
             "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for row in result["rows"]:
        lines.append(f"| {row['model']}, {row['guide']} | {row['data']} | "
                     + " | ".join(cell(row.get(column)) for column in COLUMNS)
                     + f" | {row['seconds']:.0f} |")
    (out / "diagnostics.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.runs or temporary)
        for model in args.models:
            for guide in MODELS[model].guides:
                row = diagnose(model, guide, args.points, folder, args.threads)
                print(json.dumps({key: row.get(key) for key in
                                  ("model", "guide", *COLUMNS, "seconds")}), flush=True)
                rows.append(row)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "threads": args.threads, "points": args.points, "load_before": load_before,
              "load_after": os.getloadavg(), "cpus": os.cpu_count(), "rows": rows}
    write_table(result, Path(args.out))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--points", type=int, default=10, help="test points diagnosed per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    parser.add_argument("--runs", metavar="DIR", help="keep the run folders in DIR")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
