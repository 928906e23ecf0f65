"""The HTML report: one section per run, with its metrics table and its figures, each figure
with a caption that says what to look for.

Figures are laid out two to a row, at most at their own size; a figure wider than
``WIDE_PIXELS`` (several panels side by side) takes a whole row, so that its panels stay
legible. Numbers are printed as what they are: counts as integers, p-values with three
significant digits (small ones in scientific notation), effective sample sizes with the
number of draws they are out of.
"""

from __future__ import annotations

import html
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

WIDE_PIXELS = 800
"""A figure wider than this many pixels gets a row of its own."""

CAPTIONS = {
    "loss": "Loss per data point over training (train and, where there is one, test split). "
            "Look for a curve that has flattened out; a test curve rising while the train "
            "curve falls is overfitting. A hollow marker is a last epoch cut short by the "
            "number of steps.",
    "posterior": "Exact posteriors p(z|x) (black) and the guide's q(z|x) (red) of six training "
                 "points, as 2-standard-deviation ellipses. A good guide's ellipses lie on the "
                 "black ones; a mean-field guide cannot tilt its ellipses.",
    "posterior-fit": "Exact posterior (black) against the guide (red) for a few x, with the "
                     "posterior mass q misses shaded. The reverse KL lets q miss mass rather "
                     "than put it where p has none.",
    "samples": "New data decoded from prior draws z ~ N(0, I). Look for images that resemble "
               "the data; blurry averages mean the decoder has not learned much yet.",
    "reconstructions": "Test images (top) and their reconstructions from the guide's mean code "
                       "(bottom). Faithful reconstructions mean z carries the image's content.",
    "latents": "The guide's mean codes of test images, coloured by label. Separated classes "
               "mean z has learned the digits without being told them.",
    "analogies": "Each row keeps the style z of one test image and decodes it under every "
                 "label: the label should set the digit and z the handwriting.",
    "interpolation": "Decoded images along straight and spherical paths between two codes. "
                     "Smooth changes mean a smooth latent space.",
    "arithmetic": "Latent arithmetic with class means: decoded sums and differences of codes.",
    "manifold": "Decoded images over a grid of a two-dimensional latent space.",
    "components": "The data coloured by their responsibilities, with each component's "
                  "2-standard-deviation ellipse (the first two principal components beyond "
                  "2-D). Look for one ellipse per cluster.",
    "diagnostics-marginals": "Marginals of q(z|x) (red) over those of the reference posterior "
                             "(black), per point and latent dimension. Look for red on black; "
                             "a red curve narrower than the black one is an overconfident "
                             "guide.",
    "diagnostics-pair": "Joint draws of the first two latent dimensions for one point, q (red) "
                        "over the reference (black). A tilted black cloud under a round red "
                        "one is correlation the guide cannot express.",
    "diagnostics-forest": "Means and 94% intervals of q (red) and the reference (black) per "
                          "point and latent dimension. Pairs of bars should overlap.",
    "diagnostics-khat": "PSIS k-hat per point: below 0.5 q is a good importance proposal for "
                        "p, 0.5-0.7 usable, above 0.7 unreliable (q misses posterior mass).",
    "diagnostics-sbc": "Simulation-based calibration: ranks of prior draws among guide draws. "
                       "A calibrated guide gives flat histograms inside the grey 99% band; a "
                       "U shape means q is too narrow, a hump too wide, a slope biased.",
    "diagnostics-gaps": "log p(x) - ELBO per point, split into the approximation gap (the best "
                        "guide of the family for that x alone) and the amortization gap (the "
                        "cost of one shared encoder).",
}
"""What each figure (by file name, without the suffix) shows and what to look for."""


@dataclass
class Section:
    """One run in the report. ``metrics`` maps a column heading (a split, the diagnostics
    points) to that column's metrics; ``totals`` maps a metric to the count it is out of
    (an ESS to its number of draws)."""

    title: str
    description: str
    metrics: dict[str, dict[str, float | int | None]]
    figures: Sequence[Path] = field(default_factory=list)
    notes: Sequence[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)


INTEGER_METRICS = frozenset({"active_units", "num_points", "num_draws", "khat_exact",
                             "khat_unfitted"})
"""Counts: printed as integers even when they have passed through a float."""


def format_value(name: str, value: float | int | None, total: int | None = None) -> str:
    """A metric as the report prints it: integers as integers, p-values with three significant
    digits (scientific below 0.001; one that underflowed to 0 as below the smallest float),
    a value with a ``total`` as "value of total", other numbers with four decimals (scientific
    when smaller than 0.001)."""
    if value is None:
        return "not finite"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and name in INTEGER_METRICS):
        text = str(int(value))
    elif name.endswith("pvalue"):
        text = f"< {math.ulp(0.0):.0e}" if value == 0 else f"{value:.3g}"
    elif total is not None:
        text = f"{value:.1f}"
    elif value != 0 and abs(value) < 1e-3:
        text = f"{value:.2e}"
    else:
        text = f"{value:.4f}"
    return text if total is None else f"{text} of {total}"


def png_width(path: Path) -> int:
    """The width in pixels of a PNG file, from its header (0 for anything else)."""
    with path.open("rb") as file:
        header = file.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        return 0
    return struct.unpack(">I", header[16:20])[0]


def _table(section: Section) -> str:
    metrics = section.metrics
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    head = "".join(f"<th>{html.escape(column)}</th>" for column in metrics)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(format_value(name, values[name], section.totals.get(name)))}"
                  f"</td>" if name in values else "<td></td>" for values in metrics.values())
        + "</tr>" for name in names)
    return f"<table><tr><th>metric (mean per data point)</th>{head}</tr>{rows}</table>"


def _figure(path: Path, folder: Path) -> str:
    wide = " wide" if png_width(path) > WIDE_PIXELS else ""
    caption = CAPTIONS.get(path.stem, "")
    return (f'<figure class="figure{wide}"><img src="{html.escape(os.path.relpath(path, folder))}"'
            f' alt="{html.escape(path.stem)}"><figcaption><b>{html.escape(path.stem)}</b>. '
            f"{html.escape(caption)}</figcaption></figure>")


def write_report(folder: str | os.PathLike, title: str, sections: Sequence[Section]) -> Path:
    """Write ``folder/report.html`` with figures linked by paths relative to ``folder``, in the
    order each section lists them."""
    folder = Path(folder)
    body = []
    for section in sections:
        figures = "".join(_figure(path, folder) for path in section.figures)
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in section.notes)
        body.append(f"<section><h2>{html.escape(section.title)}</h2>"
                    f"<p>{html.escape(section.description)}</p>{_table(section)}"
                    f'{notes}<div class="figures">{figures}</div></section>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1320px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }}
section {{ border-top: 1px solid #ccc; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.figures {{ display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1.5em; }}
figure {{ margin: 0; }}
figure.wide {{ grid-column: 1 / -1; }}
img {{ display: block; max-width: 100%; height: auto; margin: 0 auto; }}
figcaption {{ font-size: 0.9em; color: #444; margin-top: 0.4em; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{"".join(body)}</body></html>
"""
    path = folder / "report.html"
    path.write_text(page)
    return path
