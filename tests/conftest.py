"""Shared fixtures. Importing zoo keeps Pyro's parameters inside the modules
(``module_local_params``), so tests cannot leak parameters into each other."""

from pathlib import Path

import pytest

import zoo  # noqa: F401


def pytest_addoption(parser):
    parser.addoption("--exhaustive", action="store_true",
                     help="also run the tests marked exhaustive (hours on two cores)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``exhaustive`` (re-statements of reference suites at their full step
    counts) run only with ``--exhaustive``; ``make test`` keeps their fast variants."""
    if config.getoption("--exhaustive"):
        return
    skip = pytest.mark.skip(reason="exhaustive: run with pytest --exhaustive")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def ppca_benchmark():
    """``benchmarks/ppca_convergence.py`` as a module (a script, not part of the package),
    loaded afresh for each test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ppca_convergence", REPO / "benchmarks" / "ppca_convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_ppca_config():
    """A PPCA configuration that trains in well under a second."""
    from zoo.experiment import make_config

    return make_config("ppca", guide="full", data={"name": "synthetic-ppca"},
                       train={"epochs": 6, "steps": None, "batch_size": 100, "lr": 0.01})


@pytest.fixture
def replayed_step(monkeypatch):
    """The compiled training step with its recording replayed as recorded, without inductor's
    compilation (tens of seconds on two cores), and a cache of recordings of its own: what is
    checked is the capture, which decides the values and gradients."""
    from zoo import compiled

    monkeypatch.setattr(compiled, "_inductor", lambda graph, inputs: graph)
    monkeypatch.setattr(compiled, "_GRAPHS", {})
    return compiled
