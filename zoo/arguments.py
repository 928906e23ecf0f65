"""The arguments of the ``zoo`` command, one function per group of flags; :mod:`zoo.cli` runs
the commands."""

from __future__ import annotations

import argparse

from zoo.compiled import COMPILE_MIN_STEPS


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that names the fix, in place of the usage block
    followed by the error."""

    def error(self, message: str):
        self.exit(2, f"zoo: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model name (see zoo list)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN")
    parser.add_argument("--guide", help="guide name (default: the model's first guide)")
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_objective_arguments(parser)
    _add_training_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="run folder (default runs/<model>-<dataset>-<time>)")
    out.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_nproc_argument(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, help="a fixed budget of epochs")
    train.add_argument("--steps", type=int,
                       help="a fixed budget of optimizer steps (overrides --epochs)")
    train.add_argument("--tolerance", type=float, metavar="T",
                       help="train to convergence: stop once the loss improves by less than T "
                            "nats per data point per epoch, with 99%% confidence (the default "
                            "for ppca, with T = 5e-5, and for expnormal, with T = 1e-5)")
    train.add_argument("--patience", type=int, metavar="E",
                       help="the plateau test's two windows of E epochs each; stopping needs "
                            "4 E epochs at the smallest rate (default 3 for ppca, 25 for "
                            "expnormal, 10 otherwise)")
    train.add_argument("--passes", type=int, metavar="P",
                       help="passes over the data in one epoch, the unit of --epochs, of "
                            "metrics.csv's rows, checkpoints and convergence checks (default "
                            "50 for ppca, whose full-batch passes are single steps; else 1)")
    train.add_argument("--average-iterates", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="end each epoch at the mean of its steps' parameters (Polyak "
                            "averaging; the default for ppca)")
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
