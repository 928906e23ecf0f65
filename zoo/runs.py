"""The run folder: what a training run leaves on disk, and how to read it back.

    RUN/config.json      everything needed to rebuild model, guide, data and objective
    RUN/checkpoint.pt    model and guide state dicts, optimizer, epoch, step, RNG states
    RUN/metrics.csv      one row per epoch: epoch, step, train_loss, test_loss, seconds
    RUN/figures/         plots
    RUN/.lock            while a command writes to the run: the process id of its owner

The folder is a small database with one writer at a time: every command that writes to it
holds an exclusive lock (``fcntl.flock`` on ``RUN/.lock``) for as long as it writes. The
operating system drops the lock when its process dies, so a lock file left by a killed
process is stale and the next command takes it over.

Checkpoints are written to a temporary file in the same folder and moved into place with
``os.replace``, so an interruption never leaves a half-written checkpoint (the next writer
removes the temporary file of a killed write); they are read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled code, and checked, so
that every failure to read one is a :class:`~zoo.errors.ZooError` naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.errors import ZooError
from zoo.validation import check_config, check_output

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
FIGURES = "figures"
LOCK = ".lock"
METRIC_COLUMNS = ("epoch", "step", "train_loss", "test_loss", "seconds", "fit_loss", "lr_factor",
                  "improvement", "escaped")


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of an existing run folder while the block runs.

    A second writer is refused at once with the owner's process id. Taking the lock removes
    the temporary files of writes that a killed process left behind.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise ZooError(f"{run_dir} is not a run folder: it does not exist "
                           f"(pass the folder given by --out)") from None
        except OSError as err:
            raise ZooError(f"cannot lock run folder {run_dir} ({err.strerror}); check its "
                           f"permissions") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise ZooError(f"run folder {run_dir} is in use by another zoo command (process "
                           f"{owner}); wait until it ends, or stop it") from None
        # the previous owner removes the file as it lets go: lock only the file at ``path``
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        for name in (CONFIG, CHECKPOINT, METRICS):
            for temporary in run_dir.glob(f".{name}.*.tmp"):
                temporary.unlink(missing_ok=True)
        yield run_dir
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)


def _make_folder(path: str | os.PathLike) -> Path:
    path = check_output(path, folder=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ZooError(f"cannot make run folder {path} ({err.strerror}); choose another --out"
                       ) from None
    return path


def create_run_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Make a fresh run folder, with an empty ``figures/``.

    An existing non-empty folder is refused unless ``force``, and with ``force`` only when it
    is a run folder (it has ``config.json``); its contents are then removed, figures included.
    Where another command may write to the same folder, use :func:`new_run`, which holds the
    folder's lock.
    """
    path = _make_folder(path)
    contents = [entry for entry in path.iterdir() if entry.name != LOCK]
    if contents and not force:
        raise ZooError(f"run folder {path} already exists; choose another --out, pass --force "
                       f"to overwrite it, or continue it with: zoo train --resume {path}")
    if contents and not (path / CONFIG).is_file():
        raise ZooError(f"{path} is not empty and not a run folder (no {CONFIG}); --force only "
                       f"overwrites run folders: choose another --out")
    for entry in contents:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / FIGURES).mkdir()
    return path


@contextlib.contextmanager
def new_run(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Make a fresh run folder (:func:`create_run_dir`) under its lock, held while the block
    runs; the folder is checked against ``force`` once the lock is held."""
    path = _make_folder(path)
    with locked(path):
        yield create_run_dir(path, force=force)


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary sibling, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Atomically write ``config``, checked first by :func:`zoo.validation.check_config`."""
    check_config(config)
    _atomic_write(run_dir / CONFIG,
                  lambda file: file.write(json.dumps(config, indent=2).encode() + b"\n"))


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration of a run folder, checked by :func:`zoo.validation.check_config`;
    a clear error when it is not one."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ZooError(f"{run_dir} is not a run folder: {path} is missing "
                       f"(zoo train writes it; pass the folder given by --out)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZooError(f"{path} is not valid JSON ({err}); fix the file or train a new run"
                       ) from None
    except OSError as err:
        raise ZooError(f"{path} could not be read ({err.strerror})") from None
    if isinstance(config, dict) and isinstance(config.get("train"), dict):
        config["train"].pop("jit", None)  # runs of zoo before the compiled step recorded it
    check_config(config, str(path))
    return config


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically write the training state (tensors, numbers, strings, lists and dicts only)."""
    _atomic_write(run_dir / CHECKPOINT, lambda file: torch.save(state, file))


def rng_state() -> dict[str, Any]:
    """Every random-number state a run draws from, in a form ``weights_only`` loading accepts."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, gauss]}
    if torch.cuda.is_initialized():  # the generator training draws from: the current GPU's
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold a list: the state of every GPU
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list)
                                 else cuda)  # on this rank's GPU, under several processes


_CHECKPOINT_TYPES = {"model": dict, "guide": dict, "optimizer": dict, "epoch": int,
                     "step": int, "history": list, "rng": dict}


def load_checkpoint(run_dir: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """The training state of a run, read with ``weights_only=True`` and checked: the keys
    :func:`zoo.train.fit` writes, state dicts of tensors, and finite parameters."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ZooError(f"no checkpoint in {run_dir}: {path} is missing "
                       f"(the run stopped before its first epoch ended)")
    retrain = f"train the run again (zoo train ... --out {run_dir} --force)"
    try:
        with warnings.catch_warnings():  # torch's remarks on foreign files: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported" in str(err):
            raise ZooError(f"{path} holds Python objects other than tensors and numbers, which "
                           f"zoo refuses to load (they could run code); it is not a zoo "
                           f"checkpoint: {retrain}") from None
        raise ZooError(f"{path} is damaged or not a checkpoint ({_first_line(err)}): "
                       f"{retrain}") from None
    except Exception as err:  # torch reports truncated and foreign files in many ways
        raise ZooError(f"{path} is damaged or not a checkpoint ({_first_line(err)}): "
                       f"{retrain}") from None
    if not isinstance(state, dict):
        raise ZooError(f"{path} is not a zoo checkpoint (it holds a {type(state).__name__}): "
                       f"{retrain}")
    for key, kind in _CHECKPOINT_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool):
            problem = "is missing" if key not in state else f"is not a {kind.__name__}"
            raise ZooError(f"{path} is not a zoo checkpoint: '{key}' {problem}: {retrain}")
    for part in ("model", "guide"):
        for name, tensor in state[part].items():
            if not isinstance(tensor, torch.Tensor):
                raise ZooError(f"{path} is not a zoo checkpoint: {part}.{name} is not a tensor: "
                               f"{retrain}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ZooError(f"{path} holds non-finite values in {part}.{name}: {retrain}, "
                               f"with a lower --lr or --clip-norm if it diverged")
    return state


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str,
               run_dir: str | os.PathLike) -> None:
    """Load ``state`` into ``module`` (the run's ``model`` or ``guide``, as ``part`` says),
    refusing, with the first mismatching name, a state of another model or other sizes."""
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected)
    shapes = [f"{name} has shape {tuple(state[name].shape)}, the {part} wants "
              f"{tuple(expected[name].shape)}" for name in expected.keys() & state.keys()
              if state[name].shape != expected[name].shape]
    problems = ([f"{part}.{missing[0]} is missing"] if missing else []) + (
        [f"{part}.{unexpected[0]} is unknown"] if unexpected else []) + shapes[:1]
    if problems:
        raise ZooError(f"{Path(run_dir) / CHECKPOINT} does not match {CONFIG} ({problems[0]}): "
                       f"the checkpoint belongs to another model or other settings; train the "
                       f"run again (zoo train ... --out {run_dir} --force)")
    module.load_state_dict(state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:120] if text else type(error).__name__).rstrip(".")


def fingerprint(*tensors: torch.Tensor | None) -> str:
    """A SHA-256 digest of the values, shapes and types of ``tensors`` (None counts too): the
    data of a run, recorded in its config so that a changed data file is noticed."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype}{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of metrics.csv as dicts of numbers (``nan`` where a value is missing)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{key: float(value) if value else float("nan") for key, value in row.items()}
                for row in csv.DictReader(file)]


def _metric_line(row: dict[str, float]) -> str:
    return ",".join("" if row.get(column) is None else repr(row[column])
                    for column in METRIC_COLUMNS) + "\n"


def write_metrics(run_dir: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite metrics.csv with exactly ``rows`` (used when a resumed run drops rows that
    were written after its checkpoint)."""
    text = ",".join(METRIC_COLUMNS) + "\n" + "".join(_metric_line(row) for row in rows)
    _atomic_write(run_dir / METRICS, lambda file: file.write(text.encode()))


def append_metrics(run_dir: Path, row: dict[str, float]) -> None:
    """Append one epoch's row to metrics.csv, creating it with its header when missing."""
    path = run_dir / METRICS
    if not path.exists():
        write_metrics(run_dir, [])
    with path.open("a") as file:
        file.write(_metric_line(row))
