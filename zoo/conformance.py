"""Holding a freshly built model and guide to the contract of :mod:`zoo.contract`, so that a
student who edits one learns what broke in one line naming the file, the site and the fix,
instead of a Pyro trace dump deep in training.

:func:`build_checked` wraps the entry's constructors (a constructor whose parameters do not match
what the entry passes); :func:`check` calls model and guide once on a few data points under a
private random stream and checks the sites: names, the data plate, ``.to_event``, and the
methods of every declared capability.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from zoo.contract import DATA_PLATE, ENUMERATED, LATENT, OBSERVED, broken_promises, offers
from zoo.errors import ZooError

CHECK_POINTS = 5
"""Data points model and guide are called on."""
_SIGNATURE = re.compile(r"(__init__|\w+)\(\) (got an unexpected keyword argument|missing \d+ "
                        r"required|takes \d+ positional)")


def source(obj: object) -> str:
    """The file that defines ``obj``'s class (or ``obj`` itself, a function), relative to the
    working directory where possible."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    try:
        path = Path(inspect.getsourcefile(target)).resolve()
    except TypeError:
        return repr(target)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def build_checked(build: Callable[..., torch.nn.Module], what: str, *args, **options
                  ) -> torch.nn.Module:
    """``build(*args, **options)``; a constructor called with arguments it does not take is
    refused in one line (the entry passes the data's size and the model's options)."""
    try:
        return build(*args, **options)
    except TypeError as error:
        if not _SIGNATURE.search(str(error)):
            raise
        raise ZooError(f"{source(getattr(build, 'func', build))}: building the {what} failed: "
                       f"{error}. The entry passes the data and the options "
                       f"{sorted(options) or 'none'}: make the constructor take them"
                       ) from None


def _sites(fn: Callable, inputs: tuple[torch.Tensor, ...], what: str) -> dict[str, dict]:
    """The sample sites of one call of ``fn``; a failing call becomes one line."""
    traced = poutine.trace(poutine.enum(fn, first_available_dim=-2) if offers(fn, ENUMERATED)
                           else fn)
    try:
        trace = traced.get_trace(*inputs)
    except ZooError:
        raise
    except (ValueError, RuntimeError, NotImplementedError) as error:
        message = str(error).splitlines()[0]
        site = re.search(r"site (\w+)", message)
        hint = ""
        if "Shape mismatch inside plate" in message:
            hint = (f"; inside pyro.plate('{DATA_PLATE}') each site needs one value per data "
                    f"point: add .to_event(1) to the distribution of site "
                    f"'{site.group(1) if site else '?'}'")
        raise ZooError(f"{source(fn)}: calling the {what} on {inputs[0].shape[0]} data points "
                       f"failed: {message}{hint}") from None
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _check_site(site: dict, name: str, size: int, file: str) -> None:
    if not any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"]):
        raise ZooError(f"{file}: site '{name}' is outside the plate '{DATA_PLATE}': sample it "
                       f"inside `with pyro.plate(\"{DATA_PLATE}\", x.shape[0]):`")
    batch_shape = tuple(site["fn"].batch_shape)
    if batch_shape != (size,):
        raise ZooError(f"{file}: site '{name}' has batch shape {list(batch_shape)} for "
                       f"{size} data points; it needs [{size}]: add .to_event(1) to its "
                       f"distribution so that the last dimension is one event")


def check(model: torch.nn.Module, guide: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
          ) -> None:
    """Refuse, in one line, a model or guide that breaks the contract on the first
    :data:`CHECK_POINTS` rows of ``inputs`` (torch's and Pyro's random state are left as they
    were)."""
    for module, what in ((model, "model"), (guide, "guide")):
        for problem in broken_promises(module):
            raise ZooError(f"{source(module)}: the {what} {problem}")
    inputs = tuple(tensor[:CHECK_POINTS] for tensor in inputs)
    size = inputs[0].shape[0]
    with torch.random.fork_rng(devices=[]), torch.no_grad(), pyro.validation_enabled(False):
        model_sites = _sites(model, inputs, "model")
        guide_sites = _sites(guide, inputs, "guide")
    file = source(model)
    latent = [name for name, site in model_sites.items() if not site["is_observed"]]
    if latent != [LATENT]:
        raise ZooError(f"{file}: the model's latent sites are {latent}; the engine expects one, "
                       f"named '{LATENT}': rename it")
    if OBSERVED not in model_sites or not model_sites[OBSERVED]["is_observed"]:
        raise ZooError(f"{file}: the model has no observed site '{OBSERVED}': write "
                       f"pyro.sample(\"{OBSERVED}\", ..., obs=x)")
    for name in (LATENT, OBSERVED):
        _check_site(model_sites[name], name, size, file)
    file = source(guide)
    for name, site in guide_sites.items():
        if name != LATENT:
            raise ZooError(f"{file}: the guide samples site '{name}', which the model does not "
                           f"have: name it '{LATENT}' as the model does")
        _check_site(site, name, size, file)
        if site["fn"].event_shape != model_sites[LATENT]["fn"].event_shape:
            raise ZooError(f"{file}: the guide's site '{name}' has event shape "
                           f"{list(site['fn'].event_shape)}, the model's "
                           f"{list(model_sites[LATENT]['fn'].event_shape)}: make them equal")
    if not guide_sites and not offers(guide, ENUMERATED):
        raise ZooError(f"{file}: the guide samples no site '{LATENT}': sample it inside the "
                       f"plate '{DATA_PLATE}', or declare ENUMERATED if z is summed out")


def under_enumeration() -> bool:
    """Whether the caller runs inside Pyro's parallel enumeration (the ``EnumMessenger`` that
    ``TraceEnum_ELBO`` wraps around model and guide): a guide that declares ``ENUMERATED``
    leaves z to be summed out in the model and can check with this that someone sums it."""
    return any(isinstance(handler, EnumMessenger) for handler in _PYRO_STACK)
