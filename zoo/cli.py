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
from zoo.compiled import COMPILE_MIN_STEPS
from zoo.errors import ZooError

LIST_WIDTH = 100
"""``zoo list`` wraps its descriptions at this many characters."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that names the fix, in place of the usage block
    followed by the error."""

    def error(self, message: str):
        self.exit(2, f"zoo: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model name (see zoo list)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN")
    parser.add_argument("--guide", help="guide name (default: the model's first guide)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="named data set (default: the model's own)")
    data.add_argument("--data", metavar="FILE", help="your own table: .csv with a header, or .npy")
    data.add_argument("--data-dir", metavar="DIR",
                      help="folder holding MNIST/raw etc. (default: $ZOO_DATA, else download)")
    data.add_argument("--test-fraction", type=float, metavar="F",
                      help="share of rows held out for testing (default 0.1; 0 for none)")
    data.add_argument("--standardize", action="store_true", default=None,
                      help="shift and scale each column to mean 0, sd 1 (fitted on train)")
    data.add_argument("--drop-constant", action="store_true", default=None,
                      help="leave out the columns constant on the training rows (the digits' "
                           "border pixels, for a gmm)")
    model = parser.add_argument_group("model (each applies to the models that have it)")
    model.add_argument("--latent-dim", type=int, metavar="M", help="latent dimension")
    model.add_argument("--components", type=int, metavar="K", help="mixture components (gmm)")
    model.add_argument("--covariance", help="full or diag component covariances (gmm)")
    model.add_argument("--restarts", type=int, metavar="R",
                       help="independent fits, the best kept (gmm)")
    model.add_argument("--likelihood",
                       help="bernoulli, continuous-bernoulli or gaussian (vae, cvae)")
    model.add_argument("--architecture", help="mlp or conv networks (vae, cvae)")
    model.add_argument("--init", help="how the model's parameters start (ppca: data, "
                                      "closed-form, closed-form-rotated)")
    parser.set_defaults(model_options=[action.dest for action in model._group_actions])
    objective = parser.add_argument_group("objective")
    objective.add_argument("--loss", help="objective name (default elbo; see zoo list)")
    objective.add_argument("--particles", type=int, metavar="P",
                           help="particles drawn per data point, in all (default 1)")
    objective.add_argument("--m", type=int, metavar="M", dest="num_groups",
                           help="miwae, piwae: M groups of K = P / M particles")
    objective.add_argument("--beta", type=float, metavar="B",
                           help="ciwae: weight of the ELBO against the IWAE bound, in [0, 1]")
    objective.add_argument("--anneal-epochs", type=float, metavar="E",
                           help="KL annealing: ramp the latent term's weight from 0 to 1 over "
                                "E epochs")
    objective.add_argument("--free-bits", type=float, metavar="L",
                           help="free bits: at least L nats of KL per latent dimension count")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, help="a fixed budget of epochs")
    train.add_argument("--steps", type=int,
                       help="a fixed budget of optimizer steps (overrides --epochs)")
    train.add_argument("--tolerance", type=float, metavar="T",
                       help="train to convergence: stop once the loss improves by less than T "
                            "nats per data point per epoch (the default for ppca, with "
                            "T = 1e-4, and for expnormal, with T = 1e-5)")
    train.add_argument("--patience", type=int, metavar="E",
                       help="epochs over which that improvement is averaged (default 3 for "
                            "ppca, 25 for expnormal, 10 otherwise)")
    train.add_argument("--passes", type=int, metavar="P",
                       help="passes over the data in one epoch, the unit of --epochs, of "
                            "metrics.csv's rows, checkpoints and convergence checks (default "
                            "50 for ppca, whose full-batch passes are single steps; else 1)")
    train.add_argument("--max-steps", type=int, metavar="S",
                       help="the budget of steps when training to convergence")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--optimizer", help="adam (default), adamw or sgd")
    train.add_argument("--lr-schedule",
                       help="constant, cosine (decay to 0 over the run) or plateau (halve at "
                            "each plateau of the loss; needs --tolerance)")
    train.add_argument("--clip-norm", type=float, help="clip the global gradient norm")
    train.add_argument("--seed", type=int, help="seed for everything (default 0)")
    train.add_argument("--device", help="cpu (default), cuda or auto")
    _add_threads_argument(train)
    train.add_argument("--freeze-model", action="store_true", default=None,
                       help="train the guide alone, the model's parameters held fixed")
    step = train.add_mutually_exclusive_group()
    step.add_argument("--eager", action="store_true",
                      help="train with the plain eager step (breakpoints and prints work); the "
                           f"default compiles the step of runs of {COMPILE_MIN_STEPS} steps "
                           "or more")
    step.add_argument("--compile", action="store_true",
                      help="compile the training step even for a short run")
    step.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="run folder (default runs/<model>-<dataset>-<time>)")
    out.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_nproc_argument(parser)


def _add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="run in N processes on this machine, through torch's launcher "
                             "(the same as torchrun --standalone --nproc-per-node N -m zoo ...)")


def _add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads torch uses (default: 1 for ppca, expnormal and gmm, "
                             "torch's own for the image models; a trained run's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zoo", description="A zoo of latent-variable models: Pyro models with amortized "
                                "guides, trained by SVI and checked against exact posteriors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="models, guides, objectives and data sets")
    _add_train_arguments(commands.add_parser("train", help="train a model into a run folder"))
    evaluate = commands.add_parser("evaluate", help="per-data-point metrics of a trained run")
    evaluate.add_argument("run", metavar="RUN", help="run folder")
    evaluate.add_argument("--particles", type=int, default=1000, metavar="K",
                          help="importance samples per data point (default 1000)")
    evaluate.add_argument("--split", choices=["train", "test", "both"], default="both",
                          help="which split to evaluate (default both; on MNIST the test split "
                               "alone is six times cheaper)")
    evaluate.add_argument("--device", default="cpu",
                          help="cpu (default), cuda or auto: where to evaluate")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_nproc_argument(evaluate)
    _add_threads_argument(evaluate)
    sample = commands.add_parser("sample", help="draw new data from a trained generative model")
    sample.add_argument("run", metavar="RUN", help="run folder")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--label", type=int, metavar="Y", help="class to draw (cvae)")
    sample.add_argument("--out", metavar="FILE",
                        help=".png image grid or .npy array of decoder means "
                             "(default: a new RUN/samples/samples-NNN.png)")
    _add_threads_argument(sample)
    plot = commands.add_parser("plot", help="draw one figure of a trained run")
    plot.add_argument("run", metavar="RUN", help="run folder")
    plot.add_argument("--kind", help="which figure (default: the model's first kind; the "
                                     "kinds are listed when the kind is unknown)")
    plot.add_argument("--out", metavar="FILE", help="image file (default RUN/figures/KIND.png)")
    _add_threads_argument(plot)
    diagnose = commands.add_parser(
        "diagnose", help="approximate against exact posteriors: KL, PSIS, calibration, gaps")
    diagnose.add_argument("run", metavar="RUN", help="run folder")
    diagnose.add_argument("--points", type=int, default=20, metavar="N",
                          help="test points to diagnose (default 20)")
    diagnose.add_argument("--json", action="store_true", help="print one JSON object")
    diagnose.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_argument(diagnose)
    demo = commands.add_parser("demo", help="train every model briefly and write a report")
    demo.add_argument("--out", metavar="DIR", help="report folder (default reports/demo-<time>)")
    demo.add_argument("--force", action="store_true", help="overwrite an existing report")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--quick", action="store_true",
                      help="a few steps per model and small diagnostics: checks that everything "
                           "runs and shows the report in a minute or two, not what the models "
                           "can do")
    _add_threads_argument(demo)
    return parser


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
               "max_steps": args.max_steps, "passes": args.passes, "threads": args.threads})


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
