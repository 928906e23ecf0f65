"""The objectives by name, as ``--loss`` chooses them, and :func:`make_objective`, which builds one
from its options and refuses those that do not apply."""

from __future__ import annotations

import math
from collections.abc import Callable

from pyro.infer import ELBO as PyroELBO

from zoo.errors import ZooError
from zoo.objectives.bounds import CIWAE, ELBO, IWAE, MIWAE, PIWAE, DReG, Objective
from zoo.objectives.discrete import enumerated_elbo, score_function_elbo

OBJECTIVES: dict[str, Callable[..., Objective | PyroELBO]] = {
    "elbo": ELBO, "iwae": IWAE, "miwae": MIWAE, "ciwae": CIWAE, "piwae": PIWAE, "dreg": DReG,
    "enum": enumerated_elbo, "tracegraph": score_function_elbo,
}
"""Objective name -> factory taking keyword options (``num_particles``, ...)."""

_OPTION_FLAGS = {"num_groups": "--m", "beta": "--beta", "anneal_epochs": "--anneal-epochs",
                 "free_bits": "--free-bits", "analytic_kl": "analytic_kl"}
_OPTIONS_OF = {"elbo": {"analytic_kl", "free_bits", "anneal_epochs"},
               "iwae": {"anneal_epochs"}, "dreg": {"anneal_epochs"},
               "miwae": {"num_groups", "anneal_epochs"}, "piwae": {"num_groups", "anneal_epochs"},
               "ciwae": {"beta", "anneal_epochs"}, "enum": set(), "tracegraph": set()}


def make_objective(name: str, num_particles: int = 1, **options) -> Objective | PyroELBO:
    """Build the objective registered under ``name``.

    ``num_particles`` P is always the total number of particles per data point; ``num_groups``
    M (miwae, piwae) splits them into M groups of K = P / M. Options that do not apply to the
    objective, and values out of range, are refused with a message naming the flag.
    """
    if name not in OBJECTIVES:
        raise ZooError(f"unknown objective '{name}'; choose one of: {', '.join(OBJECTIVES)}")
    if num_particles < 1:
        raise ZooError(f"--particles must be at least 1; got {num_particles}")
    for option, value in options.items():
        if option not in _OPTIONS_OF[name]:
            users = [objective for objective, known in _OPTIONS_OF.items() if option in known]
            raise ZooError(f"{_OPTION_FLAGS.get(option, option)} does not apply to --loss {name}"
                           f" (it applies to: {', '.join(users) or 'none'})")
        if not math.isfinite(value):
            raise ZooError(f"{_OPTION_FLAGS[option]} must be a finite number; got {value}")
    num_groups = options.get("num_groups", 1)
    if num_groups < 1 or num_particles % num_groups:
        raise ZooError(f"--m {num_groups} must be a positive divisor of --particles "
                       f"{num_particles} (the particles form M groups of K = P / M)")
    if not 0 <= options.get("beta", 0.5) <= 1:
        raise ZooError(f"--beta must be in [0, 1]; got {options['beta']}")
    if options.get("anneal_epochs", 0) < 0:
        raise ZooError(f"--anneal-epochs must be at least 0; got {options['anneal_epochs']}")
    if options.get("free_bits", 0) < 0:
        raise ZooError(f"--free-bits must be at least 0 nats; got {options['free_bits']}")
    return OBJECTIVES[name](num_particles=num_particles, **options)
