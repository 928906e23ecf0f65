"""``zoo demo``: train every registered model briefly on its embedded default data, evaluate
it, diagnose its guide against the exact (or NUTS) posterior, and write a report folder with
``report.html``, ``metrics.json`` and one run folder per model."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo import diagnostics, runs
from zoo.convergence import describe_convergence
from zoo.errors import ZooError
from zoo.experiment import evaluate_run, make_config, train_run
from zoo.progress import progress_bar
from zoo.registry import MODELS, ModelEntry
from zoo.report import Section, write_report
from zoo.validation import check_output


@dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does: ``particles`` importance samples per data point in the
    evaluation, ``points`` test points diagnosed with ``diagnostics``, ``train`` values
    that replace every model's own demo training settings (``ModelEntry.demo``), and model
    ``options`` for the models that have them."""

    particles: int = 500
    points: int = 10
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    diagnostics: diagnostics.DiagnosticSettings = diagnostics.DiagnosticSettings()


def figures_in_reading_order(run_dir: Path, entry: ModelEntry) -> list[Path]:
    """The figures of a demo run: the loss curves, the posterior figure, the model's own
    figures, then the diagnostics, each where it was drawn."""
    names = dict.fromkeys(("loss", "posterior", *entry.figures, *diagnostics.FIGURES,
                           *diagnostics.DIAGNOSTIC_PLOTS))
    paths = (run_dir / runs.FIGURES / f"{name}.png" for name in names)
    return [path for path in paths if path.exists()]


def run_demo(out: str | os.PathLike | None = None, *, quiet: bool = False, force: bool = False,
             settings: DemoSettings = DemoSettings(), threads: int | None = None) -> Path:
    """Run the demo into ``out`` (default ``reports/demo-<timestamp>``); return the report path.
    A progress bar counts the models, with each model's stage, unless ``quiet``. An existing
    report folder is refused unless ``force``, and a run folder always. ``threads`` overrides
    each model's default number of CPU threads."""
    out = check_output(f"reports/demo-{time.strftime('%Y%m%d-%H%M%S')}" if out is None else out,
                       folder=True)
    if (out / runs.CONFIG).exists():
        raise ZooError(f"{out} is a run folder, and zoo demo writes a report folder of its own: "
                       f"choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise ZooError(f"report folder {out} already exists; choose another --out, or pass "
                       f"--force to overwrite it")
    sections, results = [], {}
    bar = progress_bar(len(MODELS), "zoo demo", quiet=quiet, unit="model", leave=True, delay=0)
    with bar:
        for entry in MODELS.values():
            options = {name: value for name, value in settings.options.items()
                       if name in entry.options}
            config = make_config(entry.name, options=options,
                                 train={**entry.demo, **settings.train, "threads": threads})
            started = time.perf_counter()
            bar.set_postfix_str(f"{entry.name}: training")
            run_dir = train_run(config, out / entry.name, force=force, quiet=quiet)
            bar.set_postfix_str(f"{entry.name}: evaluating")
            metrics = evaluate_run(run_dir, num_samples=settings.particles, quiet=quiet)
            bar.set_postfix_str(f"{entry.name}: diagnostics")
            summary = diagnostics.diagnose_run(run_dir, num_points=settings.points,
                                               settings=settings.diagnostics, quiet=quiet)
            seconds = time.perf_counter() - started
            results[entry.name] = {**metrics, "diagnostics": summary, "guide": config["guide"],
                                   "data": config["data"]["name"], "seconds": seconds}
            sections.append(_section(entry, config, run_dir, metrics, summary, seconds,
                                     settings))
            bar.update()
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_report(out, "zoo demo", sections)


def _section(entry: ModelEntry, config: dict[str, Any], run_dir: Path,
             metrics: dict[str, dict[str, float]], summary: dict[str, Any], seconds: float,
             settings: DemoSettings) -> Section:
    """The report's section of one model: a column per split and one for the diagnostics
    points, each labelled with what it averages over."""
    points = summary["num_points"]
    columns = {f"{split} split": values for split, values in metrics.items()}
    columns[f"diagnostics: first {points} points"] = summary
    draws = summary.get("num_draws")
    notes = [
        describe_convergence(runs.read_config(run_dir)["convergence"]),
        f"{seconds:.1f} s; run folder {run_dir.name}/ (its report.html has the diagnostics "
        f"alone).",
        f"The split columns average over every point of the split, log_likelihood estimated "
        f"with {settings.particles} importance samples per point; the diagnostics column "
        f"averages over the first {points} test points, with "
        f"{settings.diagnostics.elbo_particles} draws per point for the ELBO and log p(x) where "
        f"they are estimated, so its elbo and log_likelihood differ from the test split's.",
        *diagnostics.omitted_figures(summary),
    ]
    totals = {"ess": settings.particles, **({"ess_mean": draws} if draws else {})}
    return Section(
        title=f"{entry.name} ({config['guide']} guide, {config['data']['name']} data)",
        description=entry.description, metrics=columns, totals=totals,
        figures=figures_in_reading_order(run_dir, entry), notes=notes)


def quick_settings() -> DemoSettings:
    """A demo that runs in well under a minute: a few training steps and small diagnostics,
    for checking the report itself rather than the models."""
    return DemoSettings(
        particles=20, points=4, train={"steps": 30}, options={"restarts": 1},
        diagnostics=dataclasses.replace(
            diagnostics.DiagnosticSettings(), num_chains=2, num_draws=50, nuts_points=1,
            nuts_chains=1, nuts_warmup=20, nuts_samples=20, sbc_simulations=50, sbc_draws=9,
            sbc_bins=5, local_steps=20, local_particles=4, elbo_particles=50))
