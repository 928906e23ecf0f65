"""The HTML report: numbers printed as what they are, figures in reading order with a caption
each, wide figures across the page, empty figures replaced by a sentence; and the demo report
rendered by headless Chromium when it is installed."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from zoo import diagnostics
from zoo.demo import figures_in_reading_order, quick_settings, run_demo
from zoo.diagnostics import Gaps, omitted_figures, plot_gaps
from zoo.plots import save_figure
from zoo.registry import MODELS
from zoo.report import CAPTIONS, WIDE_PIXELS, Section, format_value, png_width, write_report


@pytest.mark.parametrize("name, value, total, text", [
    ("num_points", 10, None, "10"),
    ("active_units", 2.0, None, "2"),          # a count that passed through a float
    ("num_draws", 2000, None, "2000"),
    ("sbc_pvalue", 0.4973, None, "0.497"),
    ("sbc_pvalue", 3.2e-9, None, "3.2e-09"),
    ("sbc_pvalue", 0.0, None, "< 5e-324"),     # underflowed: below the smallest float
    ("ess", 37.07, 50, "37.1 of 50"),
    ("ess_mean", 1969.24, 2000, "1969.2 of 2000"),
    ("elbo", -102.5712, None, "-102.5712"),
    ("posterior_kl", 2.3e-5, None, "2.30e-05"),
    ("posterior_kl", 0.0, None, "0.0000"),
    ("khat_max", None, None, "not finite"),
])
def test_format_value(name, value, total, text):
    assert format_value(name, value, total) == text


def _png(path, width_inches):
    figure = Figure(figsize=(width_inches, 2))
    figure.subplots().plot([0, 1], [0, 1])
    return save_figure(figure, path)


def test_wide_figures_take_a_row_and_every_figure_has_its_caption(tmp_path):
    narrow, wide = _png(tmp_path / "loss.png", 5), _png(tmp_path / "diagnostics-sbc.png", 11)
    assert png_width(narrow) < WIDE_PIXELS < png_width(wide)
    page = write_report(tmp_path, "t", [Section(
        "s", "d", {"test split": {"elbo": -1.5, "ess": 40.0, "active_units": 2}},
        figures=[narrow, wide], totals={"ess": 50})]).read_text()
    assert '<figure class="figure"><img src="loss.png"' in page
    assert '<figure class="figure wide"><img src="diagnostics-sbc.png"' in page
    for path in (narrow, wide):
        assert CAPTIONS[path.stem] in page
    assert page.index("loss.png") < page.index("diagnostics-sbc.png")
    assert "<td>ess</td><td>40.0 of 50</td>" in page
    assert "<td>active_units</td><td>2</td>" in page


def test_every_figure_the_zoo_draws_has_a_caption():
    kinds = {"loss", "posterior", *diagnostics.FIGURES, *diagnostics.DIAGNOSTIC_PLOTS}
    for entry in MODELS.values():
        kinds |= set(entry.plots)
    assert kinds <= set(CAPTIONS), kinds - set(CAPTIONS)


def test_figures_in_reading_order(tmp_path):
    """Training curve first, then the model's own figures (samples before reconstructions),
    then the diagnostics in their order, whatever the file names' alphabetical order."""
    folder = tmp_path / "figures"
    folder.mkdir()
    names = ["diagnostics-gaps", "reconstructions", "diagnostics-forest", "loss", "latents",
             "samples", "diagnostics-marginals", "stray"]
    for name in names:
        (folder / f"{name}.png").touch()
    order = [path.stem for path in figures_in_reading_order(tmp_path, MODELS["vae"])]
    assert order == ["loss", "samples", "reconstructions", "latents", "diagnostics-marginals",
                     "diagnostics-forest", "diagnostics-gaps"]


def test_an_empty_gaps_figure_is_a_sentence(tmp_path):
    zero = torch.zeros(3, dtype=torch.float64)
    exact = Gaps(log_likelihood=-zero, elbo=-zero, optimal_elbo=-zero, exact=True)
    assert plot_gaps(exact, np.arange(3), tmp_path / "gaps.png") is None
    assert not (tmp_path / "gaps.png").exists()
    assert omitted_figures({"approximation_gap": 0.0, "amortization_gap": 0.0})
    gap = Gaps(log_likelihood=zero, elbo=zero - 0.1, optimal_elbo=zero - 0.05, exact=True)
    assert plot_gaps(gap, np.arange(3), tmp_path / "gaps.png").exists()
    assert not omitted_figures({"approximation_gap": 0.05, "amortization_gap": 0.05})


# --- the demo report in a browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW_WIDTH = 1400
READABLE_SCALE = 0.75
"""An image drawn at less than this share of its own width has text too small to read."""

MEASURE = """<script>
window.addEventListener("load", () => {
  const rows = [...document.images].map(image => [image.getAttribute("src"), image.complete,
    image.naturalWidth, Math.round(image.getBoundingClientRect().width)].join(" "));
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = rows.join("\\n");
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), quiet=True, settings=quick_settings())


@pytest.mark.slow
def test_demo_report_reads_in_order_with_every_model(quick_demo):
    page = quick_demo.read_text()
    sections = page.split("<section>")[1:]
    assert [re.search(r"<h2>(\w+) ", section).group(1) for section in sections] == list(MODELS)
    for section in sections:
        figures = re.findall(r'src="[^"/]+/figures/([\w-]+)\.png"', section)
        assert figures[0] == "loss"
        first_diagnostic = min(i for i, name in enumerate(figures)
                               if name.startswith("diagnostics-"))
        assert all(name.startswith("diagnostics-") or name in diagnostics.DIAGNOSTIC_PLOTS
                   for name in figures[first_diagnostic:])
        assert "diagnostics: first 4 points" in section and "test split" in section
    gmm = next(section for section in sections if section.startswith("<h2>gmm "))
    assert "diagnostics-gaps" not in gmm and "No gaps figure" in gmm


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_demo_report_in_headless_chromium(quick_demo, tmp_path):
    """Every image of the demo report loads in a real browser at 1400 px and is drawn at no
    less than three quarters of its own width."""
    page = quick_demo.with_name("measured.html")
    page.write_text(quick_demo.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--window-size={WINDOW_WIDTH},1000", "--virtual-time-budget=20000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    measured = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert measured, "the page did not finish loading"
    rows = [line.split() for line in measured.group(1).strip().splitlines()]
    assert len(rows) == quick_demo.read_text().count("<img ") > 20
    for source, complete, natural, shown in rows:
        assert complete == "true" and int(natural) > 0, f"{source} did not load"
        assert int(shown) >= READABLE_SCALE * int(natural), (source, natural, shown)
