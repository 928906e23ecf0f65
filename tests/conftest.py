"""Shared fixtures. Importing zoo keeps Pyro's parameters inside the modules
(``module_local_params``), so tests cannot leak parameters into each other."""

from pathlib import Path

import pytest

import zoo  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def small_ppca_config():
    """A PPCA configuration that trains in well under a second."""
    from zoo.experiment import make_config

    return make_config("ppca", guide="full", data={"name": "synthetic-ppca"},
                       train={"epochs": 6, "steps": None, "batch_size": 100, "lr": 0.01})
