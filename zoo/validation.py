"""Checks that run before anything is allocated or written: the schema of a configuration,
output paths, and the memory and work a command would need.

Every check raises :class:`~zoo.errors.ZooError` with one line that names the bad key, path
or size and the fix; none of them touches the disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.settings import TrainSettings

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: numbers in a configuration must stay below it, since the models
compute in float32."""

_DATA_KEYS = {"name": (str, None), "file": (str, None), "data_dir": (str, None),
              "test_fraction": (float,), "standardize": (bool,), "drop_constant": (bool,),
              "seed": (int,), "num_data": (int, None)}
_OBJECTIVE_KEYS = {"name": (str,), "num_particles": (int,), "num_groups": (int,),
                   "beta": (float,), "anneal_epochs": (float,), "free_bits": (float,),
                   "analytic_kl": (bool,)}
_OPTION_KEYS = {  # the types of the models' options; the registry refuses options a model lacks
    "latent_dim": (int, None), "components": (int,), "restarts": (int,),
                "covariance": (str,), "likelihood": (str,), "architecture": (str,),
                "init": (str,), "prior": (str,)}
_CONVERGENCE_KEYS = {"converged": (bool, None), "steps": (int,), "improvement": (float, None),
                     "standard_error": (float, None), "tolerance": (float, None),
                     "escapes": (int,)}
_TOP_KEYS = {"model": (str,), "guide": (str,), "zoo_version": (str,), "data_fingerprint": (str,)}
_OPTIONAL = {"data_fingerprint", "convergence", "convergence.standard_error",
             "convergence.escapes", "data.num_data",
             "data.drop_constant", "objective.num_groups", "objective.beta",
             "objective.anneal_epochs", "objective.free_bits", "objective.analytic_kl"}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               None: "null", object: "a value"}


def _train_keys() -> dict[str, tuple]:
    """The keys of the ``train`` section, read from :class:`~zoo.settings.TrainSettings` (its
    annotations such as ``int | None``), so that a new setting needs no change here."""
    names = {"int": int, "float": float, "str": str, "bool": bool, "None": None}
    return {field.name: tuple(names.get(part.strip(), object)
                              for part in str(field.type).split("|"))
            for field in dataclasses.fields(TrainSettings) if field.name != "quiet"}


def _has_type(value: Any, types: tuple) -> bool:
    """JSON typing: an integer is a number, but true and false are not numbers; ``object``
    (an annotation this module does not know) admits anything."""
    if object in types:
        return True
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types or float in types
    if isinstance(value, float):
        return float in types
    return str in types and isinstance(value, str)


def _check_section(values: Any, keys: dict[str, tuple], prefix: str, where: str, *,
                   all_optional: bool = False, open_keys: bool = False) -> None:
    if not isinstance(values, dict):
        raise ZooError(f"{where}: '{prefix.rstrip('.')}' must be an object {{...}}, got "
                       f"{type(values).__name__}; fix the file or train a new run")
    for key, value in values.items():
        name = prefix + key
        if key not in keys and not open_keys:
            raise ZooError(f"{where}: unknown key '{name}'; remove it (known keys: "
                           f"{', '.join(keys)})")
        if not _has_type(value, keys.get(key, (object,))):
            wanted = " or ".join(_TYPE_NAMES[kind] for kind in keys[key])
            raise ZooError(f"{where}: '{name}' must be {wanted}, got {json.dumps(value)}; fix "
                           f"the file or train a new run")
        if isinstance(value, float | int) and not isinstance(value, bool) and not (
                -FLOAT32_MAX <= value <= FLOAT32_MAX):
            raise ZooError(f"{where}: '{name}' is {value!r}, beyond the float32 range the "
                           f"models compute in (about 3.4e38); give a smaller value")
    if not all_optional:
        missing = [prefix + key for key in keys
                   if key not in values and prefix + key not in _OPTIONAL]
        if missing:
            raise ZooError(f"{where}: key '{missing[0]}' is missing; fix the file or train a "
                           f"new run")


def check_config(config: Any, where: str = "the configuration") -> None:
    """Check the keys and types of a configuration (the contents of ``config.json``).

    ``where`` names the file in the message. Ranges are checked where the values are used
    (``TrainSettings``, ``make_objective``, the registry); here, that every key is known
    (the model options are left to the registry, which names the ones a model lacks), present
    and of the right JSON type, and that numbers fit in float32.
    """
    sections = {"data": (_DATA_KEYS, False), "objective": (_OBJECTIVE_KEYS, False),
                "train": (_train_keys(), True), "convergence": (_CONVERGENCE_KEYS, False)}
    if not isinstance(config, dict):
        raise ZooError(f"{where} must hold a JSON object {{...}}, got {type(config).__name__}; "
                       f"fix the file or train a new run")
    top = {**_TOP_KEYS, **{name: (dict,) for name in ("options", *sections)}}
    for key in config:
        if key not in top:
            raise ZooError(f"{where}: unknown key '{key}'; remove it (known keys: "
                           f"{', '.join(top)})")
    missing = [key for key in top if key not in config and key not in _OPTIONAL]
    if missing:
        raise ZooError(f"{where}: key '{missing[0]}' is missing; fix the file or train a new run")
    _check_section({key: config[key] for key in _TOP_KEYS if key in config}, _TOP_KEYS, "",
                   where)
    _check_section(config["options"], _OPTION_KEYS, "options.", where, all_optional=True,
                   open_keys=True)
    for name, (keys, all_optional) in sections.items():
        if name not in config:  # an optional section: the convergence of a run still training
            continue
        _check_section(config[name], keys, name + ".", where, all_optional=all_optional)


def check_output(path: str | os.PathLike, *, flag: str = "--out", folder: bool) -> Path:
    """Refuse an output path that cannot be written: empty, a file where a folder is wanted (or
    the reverse), under a file, or in a folder without write permission. Returns the path."""
    if not str(path).strip():
        raise ZooError(f"{flag} is empty: give a {'folder' if folder else 'file'} name")
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ZooError(f"{flag} {path} is a file, not a folder: choose a folder")
    if not folder and path.is_dir():
        raise ZooError(f"{flag} {path} is a folder: give a file name inside it")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ZooError(f"{flag} {path} lies under {existing}, which is a file: choose a path "
                       f"in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ZooError(f"{flag} {path}: the folder {existing} is not writable; choose a folder "
                       f"you can write to")
    return path


def memory_bytes() -> int:
    """The physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


def check_memory(num_numbers: float, what: str, fix: str) -> None:
    """Refuse a computation that holds at least ``num_numbers`` float32 numbers at once when
    they do not fit in the physical memory of this machine; ``what`` says how the count was
    made, ``fix`` what to lower."""
    needed = 4 * num_numbers
    if needed > memory_bytes():
        raise ZooError(f"this needs at least {_size(needed)} of memory ({what}, 4 bytes each), "
                       f"more than the {_size(memory_bytes())} of this machine: {fix}")


MAX_WORK = 1e12
"""The most numbers of the size of x that one ``zoo evaluate`` may compute (particles x data
points x D summed over the splits): the MNIST VAE with the default 1000 particles on both
splits computes 5.5e10, and 1e12 is about twenty times that."""


def check_work(num_numbers: float, what: str, fix: str) -> None:
    """Refuse a computation of more than ``MAX_WORK`` numbers, which would run for hours."""
    if num_numbers > MAX_WORK:
        raise ZooError(f"this computes {num_numbers:.3g} numbers ({what}), more than the "
                       f"{MAX_WORK:.0e} that zoo runs in one command (hours of work): {fix}")
