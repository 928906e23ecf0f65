"""zoo: latent-variable models as Pyro models with amortized guides, trained by SVI and
checked against exact posteriors wherever one exists."""

__version__ = "0.1.0"
