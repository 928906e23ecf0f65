"""zoo: latent-variable models as Pyro models with amortized guides, trained by SVI and
checked against exact posteriors wherever one exists.

Models and guides are ``PyroModule`` s whose parameters live in the modules themselves, not in
Pyro's global parameter store, so a checkpoint is a pair of ``state_dict`` s and two models never
share state. Importing ``zoo`` switches Pyro to that mode (``module_local_params=True``).
"""

import pyro

pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
