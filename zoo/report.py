"""The HTML report: one section per run, with its metrics table and figures."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    """One run in the report. ``metrics`` maps a split (``train``, ``test``) to its metrics."""

    title: str
    description: str
    metrics: dict[str, dict[str, float]]
    figures: Sequence[Path] = field(default_factory=list)
    notes: Sequence[str] = field(default_factory=list)


def _table(metrics: dict[str, dict[str, float]]) -> str:
    splits = list(metrics)
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    head = "".join(f"<th>{html.escape(split)}</th>" for split in splits)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{metrics[split][name]:.4f}</td>" if name in metrics[split]
                  else "<td></td>" for split in splits)
        + "</tr>" for name in names)
    return f"<table><tr><th>metric (per data point)</th>{head}</tr>{rows}</table>"


def write_report(folder: str | os.PathLike, title: str, sections: Sequence[Section]) -> Path:
    """Write ``folder/report.html`` with figures linked by paths relative to ``folder``."""
    folder = Path(folder)
    body = []
    for section in sections:
        figures = "".join(
            f'<img src="{html.escape(os.path.relpath(path, folder))}" alt="{path.stem}">'
            for path in section.figures)
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in section.notes)
        body.append(f"<section><h2>{html.escape(section.title)}</h2>"
                    f"<p>{html.escape(section.description)}</p>{_table(section.metrics)}"
                    f"{notes}<div>{figures}</div></section>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
td:first-child {{ text-align: left; }}
img {{ max-width: 48%; margin: 0.5em; vertical-align: top; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{"".join(body)}</body></html>
"""
    path = folder / "report.html"
    path.write_text(page)
    return path
