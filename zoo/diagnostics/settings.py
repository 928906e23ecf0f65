"""How many draws each stage of the diagnostics uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiagnosticSettings:
    """How many draws each diagnostic uses; the defaults suit ``zoo diagnose``."""

    num_chains: int = 4
    num_draws: int = 500
    """Guide and exact draws per chain: num_chains * num_draws importance weights per point."""
    nuts_points: int = 4
    nuts_chains: int = 2
    nuts_warmup: int = 300
    nuts_samples: int = 500
    sbc_simulations: int = 1000
    sbc_draws: int = 99
    sbc_bins: int = 10
    local_steps: int = 500
    local_lr: float = 0.05
    local_particles: int = 64
    """Particles per step when the per-point ELBO has no closed form."""
    elbo_particles: int = 4000
    """Particles of the Monte-Carlo ELBOs and importance-sampled log p(x) of the gaps."""
    quiet: bool = False
    """No progress bars (:mod:`zoo.progress`: one per stage, for NUTS and for the gaps)."""

