"""The registry: model name -> its entry (:class:`~zoo.entry.ModelEntry`: how to build the
model and its guides, its default data and settings). Scripts and the ``zoo`` command look
models up here instead of dispatching on names.

Adding a model to the zoo means writing ``models/X.py``, ``guides/X.py`` and its entry
``zoo/entries/X.py``, and listing that entry below (README, "Adding a model").
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.conformance import build_checked, check
from zoo.data import Data
from zoo.entries import cvae, expnormal, fa, gmm, ppca, vae
from zoo.entry import ModelEntry
from zoo.errors import ZooError

MODELS: dict[str, ModelEntry] = {
    entry.name: entry for entry in [ppca.ENTRY, expnormal.ENTRY, vae.ENTRY, cvae.ENTRY,
                                    gmm.ENTRY, fa.ENTRY]
}


def get_model(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names list the valid ones."""
    if name not in MODELS:
        raise ZooError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build(entry: ModelEntry, guide: str | None, data: Data, options: dict[str, Any]
          ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the model and the named guide (the default when None) for ``data``, held to the
    contract (:mod:`zoo.conformance`): a broken one is refused in one line."""
    guide = guide or entry.default_guide
    if guide not in entry.guides:
        raise ZooError(f"unknown guide '{guide}' for model {entry.name}; "
                       f"choose one of: {', '.join(entry.guides)}")
    unknown = set(options) - set(entry.options)
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(unknown))
        raise ZooError(f"{flags} does not apply to model {entry.name}")
    options = {**entry.options, **options}
    model = build_checked(entry.build_model, f"model of {entry.name}", data, **options)
    guide_module = build_checked(entry.guides[guide], f"guide {guide} of {entry.name}", data,
                                 **options)
    check(model, guide_module, entry.inputs(data, "train"))
    if guide in entry.start_guide:
        entry.start_guide[guide](model, guide_module, **options)
    return model, guide_module
