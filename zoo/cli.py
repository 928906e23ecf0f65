"""The ``zoo`` command: ``zoo list | train | evaluate | demo``.

Mistakes a user can fix (unknown names, bad values, missing files, bad data) print one line on
stderr and exit with status 2; a diverged training run exits with 1; an interrupted one with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from zoo.errors import ZooError


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
    model = parser.add_argument_group("model")
    model.add_argument("--latent-dim", type=int, metavar="M", help="latent dimension")
    objective = parser.add_argument_group("objective")
    objective.add_argument("--loss", help="objective name (default elbo; see zoo list)")
    objective.add_argument("--particles", type=int, metavar="P",
                           help="particles drawn per data point (default 1)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int)
    train.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--optimizer", help="adam (default), adamw or sgd")
    train.add_argument("--lr-schedule", help="constant or cosine (decay to 0 over the run)")
    train.add_argument("--clip-norm", type=float, help="clip the global gradient norm")
    train.add_argument("--seed", type=int, help="seed for everything (default 0)")
    train.add_argument("--device", help="cpu (default), cuda or auto")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="run folder (default runs/<model>-<dataset>-<time>)")
    out.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo", description="A zoo of latent-variable models: Pyro models with amortized "
                                "guides, trained by SVI and checked against exact posteriors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="models, guides, objectives and data sets")
    _add_train_arguments(commands.add_parser("train", help="train a model into a run folder"))
    evaluate = commands.add_parser("evaluate", help="per-data-point metrics of a trained run")
    evaluate.add_argument("run", metavar="RUN", help="run folder")
    evaluate.add_argument("--particles", type=int, default=1000, metavar="K",
                          help="importance samples per data point (default 1000)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    demo = commands.add_parser("demo", help="train every model briefly and write a report")
    demo.add_argument("--out", metavar="DIR", help="report folder (default reports/demo-<time>)")
    demo.add_argument("--force", action="store_true", help="overwrite an existing report")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _list() -> None:
    from zoo.data import DATASETS
    from zoo.objectives import OBJECTIVES
    from zoo.registry import MODELS

    print("models (guides, the default first; default data):")
    for entry in MODELS.values():
        print(f"  {entry.name:14s} {', '.join(entry.guides)}; {entry.default_data}")
        print(f"  {'':14s} {entry.description}")
    print("objectives:\n  " + ", ".join(OBJECTIVES))
    print("data sets (or --data FILE for your own .csv/.npy table):")
    for name, description in DATASETS.items():
        print(f"  {name:14s} {description}")


def _train(args: argparse.Namespace) -> None:
    from zoo.experiment import make_config, resume_run, train_run

    if args.resume:
        given = [flag for flag, value in vars(args).items()
                 if value not in (None, False) and flag not in
                 ("command", "resume", "epochs", "steps", "quiet")]
        if given:
            flags = ", ".join("--" + flag.replace("_", "-") if flag != "model" else "MODEL"
                              for flag in given)
            raise ZooError(f"--resume continues a run with its own settings; drop {flags} "
                           f"(only --epochs, --steps and --quiet may change)")
        run_dir = resume_run(args.resume, epochs=args.epochs, steps=args.steps, quiet=args.quiet)
    else:
        if args.model is None:
            raise ZooError("name a model to train (see zoo list), or --resume RUN")
        if args.dataset is not None and args.data is not None:
            raise ZooError("give either --dataset NAME or --data FILE, not both")
        config = make_config(
            args.model, guide=args.guide,
            options={"latent_dim": args.latent_dim},
            data={"name": args.dataset, "file": args.data, "data_dir": args.data_dir,
                  "test_fraction": args.test_fraction, "standardize": args.standardize},
            objective={"name": args.loss, "num_particles": args.particles},
            train={"epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size,
                   "lr": args.lr, "optimizer": args.optimizer, "lr_schedule": args.lr_schedule,
                   "clip_norm": args.clip_norm, "seed": args.seed, "device": args.device})
        run_dir = train_run(config, args.out, force=args.force, quiet=args.quiet)
    print(run_dir)


def _evaluate(args: argparse.Namespace) -> None:
    from zoo.experiment import evaluate_run

    result = evaluate_run(args.run, num_samples=args.particles)
    if args.json:
        print(json.dumps(result))
        return
    names = list(dict.fromkeys(name for split in result.values() for name in split))
    print(f"{'metric (nats per data point)':30s}" + "".join(f"{s:>14s}" for s in result))
    for name in names:
        print(f"{name:30s}" + "".join(f"{values.get(name, float('nan')):14.4f}"
                                      for values in result.values()))


def _demo(args: argparse.Namespace) -> None:
    from zoo.demo import run_demo

    print(run_demo(args.out, quiet=args.quiet, force=args.force))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"zoo: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    from zoo.train import TrainingDiverged

    try:
        {"list": lambda _: _list(), "train": _train, "evaluate": _evaluate,
         "demo": _demo}[args.command](args)
    except TrainingDiverged as error:
        print(f"zoo: {error}", file=sys.stderr)
        return 1
    except ZooError as error:
        print(f"zoo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted; the checkpoint of the last finished epoch is kept "
              "(continue with zoo train --resume RUN)", file=sys.stderr)
        return 130
    return 0
