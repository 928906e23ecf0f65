r"""The written contract between the zoo's engine and its models and guides.

A **model** is a ``PyroModule`` whose ``forward(*inputs)`` writes the joint density p(x, z):
``inputs`` is ``(x,)``, or ``(x, y)`` for a model with labels (``ModelEntry.labels``), with
``x: [N, D]``. Inside one plate named :data:`DATA_PLATE` of size N at dim -1 it samples the
latent site :data:`LATENT` (``z: [N, M]`` with ``.to_event(1)``, or ``[N]`` for a discrete z)
and observes the site :data:`OBSERVED` (``x: [N, D]``, ``.to_event(1)``). Outer plates, such as
the engine's particles at dim -2, must broadcast: ``z: [K, N, M]``.

A **guide** q(z | x) is a ``PyroModule`` with the model's call signature that samples the same
latent site in the same plate (an enumerating guide samples nothing and leaves z to the model).

Everything else is optional, and a model or guide says what it offers in one class attribute,

    offers = frozenset({EXACT_MARGINAL, EXACT_POSTERIOR})

naming the :data:`CAPABILITIES` below, each with the methods of its ``Protocol``:

=========================  ==========================================================  =======
capability                  methods (shapes for ``x: [N, D]``)                          on
=========================  ==========================================================  =======
``EXACT_MARGINAL``          ``marginal_log_prob(x) -> [N]``, log p(x_n)                 model
``EXACT_POSTERIOR``         ``posterior(x) -> p(z | x)``, batch [N], event [M]          model
``MAXIMUM_LIKELIHOOD``      ``maximum_likelihood(x) -> model`` at the optimum for x     model
``DISCRETE_POSTERIOR``      ``log_responsibilities(x) -> [N, K]``, log p(z_n = k | x_n)  both
``DECODER``                 ``mean(z, *context) -> [N, D]``, E[x | z]                  model
``DISTRIBUTION``            ``distribution(*inputs) -> q(z | x)``, batch [N], event [M]  guide
``ENUMERATED``              none: samples nothing, z is summed out in the model          guide
=========================  ==========================================================  =======

An ``ENUMERATED`` guide is called only under Pyro's enumeration (``TraceEnum_ELBO``, the
objective ``enum``); it has no q(z | x) to draw from.

The engine asks :func:`offers`, never ``hasattr`` and never a model's name; the conformance
checks (``tests/test_conformance.py``) and :func:`check` hold every registered model to what it
declares.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor
from torch.distributions import Distribution

LATENT = "z"
"""The name of the latent sample site, in model and guide."""
OBSERVED = "x"
"""The name of the observed sample site, in the model."""
DATA_PLATE = "data"
"""The plate over data points, size N at dim -1."""

EXACT_MARGINAL = "exact marginal"
EXACT_POSTERIOR = "exact posterior"
MAXIMUM_LIKELIHOOD = "maximum likelihood"
DISCRETE_POSTERIOR = "discrete posterior"
DECODER = "decoder"
DISTRIBUTION = "distribution"
ENUMERATED = "enumerated"


@runtime_checkable
class Model(Protocol):
    """p(x, z): ``forward(*inputs)`` samples :data:`LATENT` and observes :data:`OBSERVED`."""

    offers: ClassVar[frozenset[str]]

    def forward(self, *inputs: Tensor) -> None: ...


@runtime_checkable
class Guide(Protocol):
    """q(z | x): ``forward(*inputs)`` with the model's signature samples :data:`LATENT`."""

    offers: ClassVar[frozenset[str]]

    def forward(self, *inputs: Tensor) -> None: ...


@runtime_checkable
class ExactMarginal(Protocol):
    def marginal_log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class ExactPosterior(Protocol):
    def posterior(self, x: Tensor) -> Distribution: ...


@runtime_checkable
class MaximumLikelihood(Protocol):
    def maximum_likelihood(self, x: Tensor) -> ExactMarginal: ...


@runtime_checkable
class DiscretePosterior(Protocol):
    def log_responsibilities(self, x: Tensor) -> Tensor: ...

    def responsibilities(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    def mean(self, z: Tensor, *context: Tensor) -> Tensor: ...


@runtime_checkable
class GuideDistribution(Protocol):
    def distribution(self, *inputs: Tensor) -> Distribution: ...


@runtime_checkable
class Enumerated(Protocol):
    """A guide that samples nothing: the model's discrete z is summed out by enumeration."""


CAPABILITIES: dict[str, type] = {
    EXACT_MARGINAL: ExactMarginal,
    EXACT_POSTERIOR: ExactPosterior,
    MAXIMUM_LIKELIHOOD: MaximumLikelihood,
    DISCRETE_POSTERIOR: DiscretePosterior,
    DECODER: Decoder,
    DISTRIBUTION: GuideDistribution,
    ENUMERATED: Enumerated,
}
"""Each capability and the ``Protocol`` whose methods it promises."""


def declared(module: object) -> frozenset[str]:
    """The capabilities a model or guide declares in its class attribute ``offers`` (none when
    it declares nothing)."""
    return frozenset(getattr(type(module), "offers", frozenset()))


def offers(module: object, capability: str) -> bool:
    """Whether ``module`` declares ``capability`` (one of :data:`CAPABILITIES`)."""
    return capability in declared(module)


def broken_promises(module: object) -> list[str]:
    """The capabilities ``module`` declares without their methods, or that are unknown, as
    sentences naming the missing method; empty when it keeps its word."""
    problems = []
    for capability in sorted(declared(module)):
        protocol = CAPABILITIES.get(capability)
        if protocol is None:
            problems.append(f"unknown capability '{capability}' in offers; the known ones are: "
                            f"{', '.join(CAPABILITIES)}")
        elif not isinstance(module, protocol):
            methods = [name for name in vars(protocol) if not name.startswith("_")
                       and not callable(getattr(module, name, None))]
            problems.append(f"offers '{capability}' but has no method {', '.join(methods)}")
    return problems
