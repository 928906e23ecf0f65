"""``zoo demo``: train every registered model briefly on its embedded default data, evaluate
it, diagnose its guide against the exact (or NUTS) posterior, and write a report folder with
``report.html``, ``metrics.json`` and one run folder per model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from zoo import runs
from zoo.diagnostics import diagnose_run
from zoo.experiment import evaluate_run, make_config, train_run
from zoo.registry import MODELS
from zoo.report import Section, write_report
from zoo.train import describe_convergence

DEMO_PARTICLES = 500
DEMO_POINTS = 10


def run_demo(out: str | os.PathLike | None = None, *, quiet: bool = False,
             force: bool = False, threads: int | None = None) -> Path:
    """Run the demo into ``out`` (default ``reports/demo-<timestamp>``); return the report path.
    ``threads`` overrides each model's default number of CPU threads."""
    out = Path(out or f"reports/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    sections, results = [], {}
    for entry in MODELS.values():
        config = make_config(entry.name, train={**entry.demo, "threads": threads})
        started = time.perf_counter()
        run_dir = train_run(config, out / entry.name, force=force, quiet=quiet)
        metrics = evaluate_run(run_dir, num_samples=DEMO_PARTICLES)
        metrics["diagnostics"] = diagnose_run(run_dir, num_points=DEMO_POINTS)
        seconds = time.perf_counter() - started
        training = describe_convergence(runs.read_config(run_dir)["convergence"])
        results[entry.name] = {**metrics, "guide": config["guide"],
                               "data": config["data"]["name"], "seconds": seconds}
        figures = sorted((run_dir / runs.FIGURES).glob("*.png"))
        sections.append(Section(
            title=f"{entry.name} ({config['guide']} guide, {config['data']['name']} data)",
            description=entry.description, metrics=metrics, figures=figures,
            notes=[training,
                   f"{seconds:.1f} s; run folder {run_dir.name}/; log-likelihood estimated with "
                   f"{DEMO_PARTICLES} importance samples per data point; diagnostics on "
                   f"{DEMO_POINTS} test points (run folder's report.html)."]))
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_report(out, "zoo demo", sections)
