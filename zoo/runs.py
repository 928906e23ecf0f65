"""The run folder: what a training run leaves on disk, and how to read it back.

    RUN/config.json      everything needed to rebuild model, guide, data and objective
    RUN/checkpoint.pt    model and guide state dicts, optimizer, epoch, step, RNG states
    RUN/metrics.csv      one row per epoch: epoch, step, train_loss, test_loss, seconds
    RUN/figures/         plots

Checkpoints are written to a temporary file in the same folder and moved into place with
``os.replace``, so an interruption never leaves a half-written checkpoint; they are read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled code.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
FIGURES = "figures"
METRIC_COLUMNS = ("epoch", "step", "train_loss", "test_loss", "seconds", "fit_loss", "lr_factor",
                  "improvement")


def create_run_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Make a fresh run folder; an existing non-empty one is refused unless ``force``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not force:
        raise ZooError(f"run folder {path} already exists; choose another --out, pass --force "
                       f"to overwrite it, or continue it with: zoo train --resume {path}")
    if force and path.exists():
        for name in (CONFIG, CHECKPOINT, METRICS):
            (path / name).unlink(missing_ok=True)
    (path / FIGURES).mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary sibling, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    _atomic_write(run_dir / CONFIG,
                  lambda file: file.write(json.dumps(config, indent=2).encode() + b"\n"))


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration of a run folder, with a clear error when it is not one."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ZooError(f"{run_dir} is not a run folder: {path} is missing "
                       f"(zoo train writes it; pass the folder given by --out)")
    return json.loads(path.read_text())


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically write the training state (tensors, numbers, strings, lists and dicts only)."""
    _atomic_write(run_dir / CHECKPOINT, lambda file: torch.save(state, file))


def load_checkpoint(run_dir: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ZooError(f"no checkpoint in {run_dir}: {path} is missing "
                       f"(the run stopped before its first epoch ended)")
    return torch.load(path, map_location=map_location, weights_only=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of metrics.csv as dicts of numbers (``nan`` where a value is missing)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{key: float(value) if value else float("nan") for key, value in row.items()}
                for row in csv.DictReader(file)]


def _metric_line(row: dict[str, float]) -> str:
    return ",".join("" if row.get(column) is None else repr(row[column])
                    for column in METRIC_COLUMNS) + "\n"


def write_metrics(run_dir: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite metrics.csv with exactly ``rows`` (used when a resumed run drops rows that
    were written after its checkpoint)."""
    text = ",".join(METRIC_COLUMNS) + "\n" + "".join(_metric_line(row) for row in rows)
    _atomic_write(run_dir / METRICS, lambda file: file.write(text.encode()))


def append_metrics(run_dir: Path, row: dict[str, float]) -> None:
    """Append one epoch's row to metrics.csv, creating it with its header when missing."""
    path = run_dir / METRICS
    if not path.exists():
        write_metrics(run_dir, [])
    with path.open("a") as file:
        file.write(_metric_line(row))
