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
from zoo.errors import ZooError
from zoo.experiment import evaluate_run, make_config, train_run
from zoo.registry import MODELS
from zoo.report import Section, write_report
from zoo.validation import check_output

DEMO_PARTICLES = 500
DEMO_POINTS = 10


def run_demo(out: str | os.PathLike | None = None, *, quiet: bool = False,
             force: bool = False) -> Path:
    """Run the demo into ``out`` (default ``reports/demo-<timestamp>``); return the report path.

    An existing report folder is refused unless ``force``, and a run folder always."""
    out = check_output(f"reports/demo-{time.strftime('%Y%m%d-%H%M%S')}" if out is None else out,
                       folder=True)
    if (out / runs.CONFIG).exists():
        raise ZooError(f"{out} is a run folder, and zoo demo writes a report folder of its own: "
                       f"choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise ZooError(f"report folder {out} already exists; choose another --out, or pass "
                       f"--force to overwrite it")
    sections, results = [], {}
    for entry in MODELS.values():
        config = make_config(entry.name, train=entry.demo)
        started = time.perf_counter()
        run_dir = train_run(config, out / entry.name, force=force, quiet=quiet)
        metrics = evaluate_run(run_dir, num_samples=DEMO_PARTICLES)
        metrics["diagnostics"] = diagnose_run(run_dir, num_points=DEMO_POINTS)
        seconds = time.perf_counter() - started
        results[entry.name] = {**metrics, "guide": config["guide"],
                               "data": config["data"]["name"], "seconds": seconds}
        figures = sorted((run_dir / runs.FIGURES).glob("*.png"))
        sections.append(Section(
            title=f"{entry.name} ({config['guide']} guide, {config['data']['name']} data)",
            description=entry.description, metrics=metrics, figures=figures,
            notes=[f"{seconds:.1f} s; run folder {run_dir.name}/; log-likelihood estimated with "
                   f"{DEMO_PARTICLES} importance samples per data point; diagnostics on "
                   f"{DEMO_POINTS} test points (run folder's report.html)."]))
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_report(out, "zoo demo", sections)
