"""The ``zoo`` command: ``zoo list | train | evaluate | sample | plot | diagnose | demo``.

Mistakes a user can fix (unknown names, bad values, missing files, bad data, and the
command-line mistakes argparse finds) print one line on stderr and exit with status 2; a
diverged training run exits with 1; an interrupted one with 130; a run of several processes
(torchrun, or ``--nproc N``) one of which stopped exits with 3. Under several processes rank 0
alone prints. Commands that write into a run folder (train, sample, plot and diagnose with
their default outputs) hold its lock.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

from zoo import distributed
from zoo.arguments import build_parser
from zoo.errors import ZooError

LIST_WIDTH = 100
"""``zoo list`` wraps its descriptions at this many characters."""


def _list() -> None:
    from zoo.data import DATASETS
    from zoo.objectives import OBJECTIVES
    from zoo.registry import MODELS

    width = max(map(len, [*MODELS, *DATASETS])) + 2
    indent = " " * (2 + width)

    def row(name: str, text: str) -> str:
        return textwrap.fill(text, LIST_WIDTH, initial_indent=f"  {name:{width}s}",
                             subsequent_indent=indent, break_on_hyphens=False)

    print("models (guides, the default first; default data):")
    for entry in MODELS.values():
        print(row(entry.name, f"{', '.join(entry.guides)}; {entry.default_data}"))
        print(row("", entry.description))
    print("objectives:\n  " + ", ".join(OBJECTIVES))
    print("data sets (or --data FILE for your own .csv/.npy table):")
    for name, description in DATASETS.items():
        print(row(name, description))


def _new_config(args: argparse.Namespace) -> dict:
    from zoo.experiment import make_config

    if args.model is None:
        raise ZooError("name a model to train (see zoo list), or --resume RUN")
    if args.dataset is not None and args.data is not None:
        raise ZooError("give either --dataset NAME or --data FILE, not both")
    return make_config(
        args.model, guide=args.guide,
        options={name: getattr(args, name) for name in args.model_options},
        data={"name": args.dataset, "file": args.data, "data_dir": args.data_dir,
              "test_fraction": args.test_fraction, "standardize": args.standardize,
              "drop_constant": args.drop_constant},
        objective={"name": args.loss, "num_particles": args.particles,
                   "num_groups": args.num_groups, "beta": args.beta,
                   "anneal_epochs": args.anneal_epochs, "free_bits": args.free_bits},
        train={"epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "optimizer": args.optimizer, "lr_schedule": args.lr_schedule,
               "clip_norm": args.clip_norm, "seed": args.seed, "device": args.device,
               "freeze_model": args.freeze_model, "step": _step(args),
               "tolerance": args.tolerance, "patience": args.patience,
               "max_steps": args.max_steps, "passes": args.passes, "threads": args.threads,
               "average_iterates": args.average_iterates})


def _step(args: argparse.Namespace) -> str | None:
    """The training step of ``--eager`` and ``--compile``; ``--jit``, retired, says so."""
    if args.jit:
        warnings.warn("--jit is retired: the training step is compiled by default; --jit now "
                      "means --compile", stacklevel=2)
    return "eager" if args.eager else "compiled" if args.compile or args.jit else None


def _launch(args: argparse.Namespace, device: str, batch_size: int | None = None,
            free_bits: float = 0.0) -> int:
    """Check what can be checked before starting processes, then run the command in
    ``--nproc`` processes; return the exit status."""
    from zoo.train import resolve_device

    if args.nproc < 1:
        raise ZooError(f"--nproc must be at least 1; got {args.nproc}")
    distributed.backend_of(resolve_device(device))
    if batch_size is not None:
        distributed.check(batch_size, free_bits, size=args.nproc)
    return distributed.launch(args.argv, args.nproc)


def _train(args: argparse.Namespace) -> int | None:
    from zoo.experiment import resume_run, train_run
    from zoo.runs import read_config

    if args.resume:
        given = [flag for flag, value in vars(args).items()
                 if value not in (None, False) and flag not in
                 ("command", "resume", "epochs", "steps", "max_steps", "quiet", "threads",
                  "model_options", "nproc", "argv")]
        if given:
            flags = ", ".join("--" + flag.replace("_", "-") if flag != "model" else "MODEL"
                              for flag in given)
            raise ZooError(f"--resume continues a run with its own settings; drop {flags} "
                           f"(only --epochs, --steps, --max-steps, --threads, --quiet and "
                           f"--nproc may change)")
    config = read_config(args.resume) if args.resume else _new_config(args)
    if args.nproc is not None:
        return _launch(args, config["train"]["device"], config["train"]["batch_size"],
                       config["objective"].get("free_bits") or 0.0)
    distributed.check(config["train"]["batch_size"], config["objective"].get("free_bits") or 0.0)
    if args.resume:
        run_dir = resume_run(args.resume, epochs=args.epochs, steps=args.steps or args.max_steps,
                             quiet=args.quiet, threads=args.threads)
    else:
        run_dir = train_run(config, args.out, force=args.force, quiet=args.quiet)
    if distributed.is_main():
        print(run_dir)
    return None


def _evaluate(args: argparse.Namespace) -> int | None:
    from zoo.convergence import describe_convergence
    from zoo.experiment import evaluate_run
    from zoo.runs import read_config

    if args.nproc is not None:
        return _launch(args, args.device)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    result = evaluate_run(args.run, num_samples=args.particles, splits=splits,
                          device=args.device, quiet=args.quiet)
    if not result:
        raise ZooError(f"run {args.run} has no {args.split} split to evaluate")
    if not distributed.is_main():
        return None
    convergence = read_config(args.run).get("convergence")
    if args.json:
        print(json.dumps({**result, "convergence": convergence}))
        return None
    names = list(dict.fromkeys(name for split in result.values() for name in split))
    print(f"{'metric (mean per data point)':30s}" + "".join(f"{s:>14s}" for s in result))
    for name in names:
        print(f"{name:30s}" + "".join(f"{values.get(name, float('nan')):14.4f}"
                                      for values in result.values()))
    if "bic" in names:
        print("(bic is for the whole split: -2 log-likelihood + parameters x log N)")
    if convergence is not None:
        print(describe_convergence(convergence))
    return None


def _writing(run: str, out: str | None = None) -> contextlib.AbstractContextManager:
    """The lock of run folder ``run`` when a command writes into it (``out`` None: its default
    output, or a path inside it); nothing otherwise. An ``out`` that cannot be written is
    refused first."""
    from zoo import runs
    from zoo.validation import check_output

    if out is None:
        return runs.locked(run)
    inside = check_output(out, folder=False).resolve().is_relative_to(Path(run).resolve())
    return runs.locked(run) if inside else contextlib.nullcontext()


def _sample(args: argparse.Namespace) -> None:
    from zoo.generation import sample_run

    with _writing(args.run, args.out):
        print(sample_run(args.run, num_samples=args.n, label=args.label, out=args.out))


def _plot(args: argparse.Namespace) -> None:
    from zoo.experiment import plot_run

    with _writing(args.run, args.out):
        print(plot_run(args.run, args.kind, args.out))


def _diagnose(args: argparse.Namespace) -> None:
    from zoo.diagnostics import diagnose_run

    with _writing(args.run):
        summary = diagnose_run(args.run, num_points=args.points, quiet=args.quiet)
    if args.json:
        print(json.dumps(summary))
        return
    for name, value in summary.items():
        print(f"{name:24s} {value:.4g}" if isinstance(value, float) else f"{name:24s} {value}")


def _demo(args: argparse.Namespace) -> None:
    from zoo.demo import DemoSettings, quick_settings, run_demo

    settings = quick_settings() if args.quick else DemoSettings()
    print(run_demo(args.out, quiet=args.quiet, force=args.force, settings=settings,
                   threads=args.threads))


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads`` for the commands on a trained run, which otherwise use the run's own
    (``train`` and ``demo`` pass theirs to each training run)."""
    import torch

    from zoo.runs import read_config

    if args.command not in ("evaluate", "sample", "plot", "diagnose"):
        return
    threads = (args.threads if args.threads is not None
               else read_config(args.run)["train"].get("threads"))
    if threads is not None and threads < 1:
        raise ZooError(f"--threads must be at least 1; got {threads}")
    if threads is not None:
        torch.set_num_threads(threads)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if distributed.is_main():  # under several processes, rank 0 alone prints
        print(f"zoo: warning: {message}", file=file or sys.stderr)


def _close_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that Python's own flush at exit, which would
    fail again on a closed pipe or a full disk, has nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if distributed.started_by_launcher() and getattr(args, "nproc", None) is not None:
        args.nproc = None  # this process is one of those that --nproc (or torchrun) started
    args.argv = argv
    warnings.showwarning = _show_warning
    from zoo.train import TrainingDiverged

    try:
        _set_threads(args)
        status = {"list": lambda _: _list(), "train": _train, "evaluate": _evaluate,
                  "sample": _sample, "plot": _plot, "diagnose": _diagnose,
                  "demo": _demo}[args.command](args) or 0
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader of stdout has gone (zoo list | head -1): nothing more to say to anyone
        _close_stdout()
        return 0
    except TrainingDiverged as error:
        if distributed.is_main():
            print(f"zoo: {error}", file=sys.stderr)
        return 1
    except distributed.RankFailed as error:
        if distributed.reports_lost_ranks():
            print(f"zoo: error: {error}", file=sys.stderr)
        return error.exit_status
    except ZooError as error:
        # raised inside a model or guide, Pyro re-raises it with the trace's shapes appended
        # (from the original): the original message is the one line for the user
        while isinstance(error.__cause__, ZooError):
            error = error.__cause__
        if distributed.is_main():
            print(f"zoo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # training says what it kept
        if distributed.is_main():
            print("zoo: interrupted" + (f"; {interrupt}" if str(interrupt) else ""),
                  file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"zoo: error: cannot write {error.filename or 'the output'}: {error.strerror}; "
              f"free some space or write elsewhere", file=sys.stderr)
        _close_stdout()
        return 1
    finally:
        distributed.shutdown()
