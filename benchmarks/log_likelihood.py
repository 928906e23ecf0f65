"""Time and peak memory of the importance-sampled log-likelihood on the MNIST test set.

:func:`zoo.evaluate.log_likelihood` estimates

    log p(x_n) ~= log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n),    z_k ~ q(z | x_n),

for each test image, chunked over images and particles so that memory stays bounded whatever
N and K. This script runs it for the default MNIST VAE (784-200-200-50, Bernoulli decoder) on
the seeded binarization of the test set, K = ``--particles`` (5000, as in Burda et al. 2015)
for each of ``--num-images`` images (all 10,000), and reports the seconds it took and the peak
memory of the process (resident memory sampled every 10 ms; on a GPU also the peak allocated
by torch). With ``--run RUN`` it evaluates a trained run and also prints its mean estimate;
without, the untrained default VAE, whose cost is the same.

    python benchmarks/log_likelihood.py [--particles 5000] [--num-images 10000]
        [--data-dir ../shared/data] [--device cpu] [--run RUN]

It prints one line and writes the numbers to ``--out`` as JSON. Without MNIST in
``DATA_DIR/MNIST/raw`` it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from memory import PeakMemory
from vae_epoch import MNIST_FILES

from zoo.data import binarize, load_data
from zoo.evaluate import log_likelihood
from zoo.experiment import load_run
from zoo.registry import build, get_model
from zoo.train import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=5000, metavar="K")
    parser.add_argument("--num-images", type=int, default=10000, metavar="N")
    parser.add_argument("--data-dir", default=os.environ.get("ZOO_DATA", "../shared/data"),
                        help="folder holding MNIST/raw (default: $ZOO_DATA, else %(default)s)")
    parser.add_argument("--run", metavar="RUN", help="a trained MNIST VAE run folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--out", default="benchmarks/results/log_likelihood.json",
                        metavar="FILE")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    raw = Path(args.data_dir).expanduser() / "MNIST" / "raw"
    if args.run is None and not all((raw / name).is_file() for name in MNIST_FILES):
        print(f"MNIST is not in {raw}/; pass --data-dir DIR. Nothing measured.")
        return None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.run is not None:
        experiment = load_run(args.run)
        model, guide, x = experiment.model, experiment.guide, experiment.inputs("test")[0]
    else:
        data = load_data("mnist", data_dir=str(Path(args.data_dir).expanduser()))
        model, guide = build(get_model("vae"), None, data, {})
        x = binarize(data.x_test, torch.Generator().manual_seed(1))
    x = x[:args.num_images].to(device)
    model.to(device).eval(), guide.to(device).eval()

    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        estimate = log_likelihood(model, guide, x, num_samples=args.particles)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = memory.result()
    results = {
        "particles": args.particles, "num_images": x.shape[0], "seconds": seconds,
        "images_per_second": x.shape[0] / seconds, "peak_rss_mib": peak["peak_rss_mib"],
        "added_rss_mib": peak["training_added_mib"], "peak_cuda_mib": peak["peak_cuda_mib"],
        "mean_log_likelihood": estimate.log_likelihood.mean().item(),
        "mean_ess": estimate.ess.mean().item(), "run": args.run,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.platform(), "cpus": os.cpu_count(),
    }
    cuda = (f", peak CUDA {results['peak_cuda_mib']:.0f} MiB"
            if results["peak_cuda_mib"] is not None else "")
    print(f"log_likelihood: K = {args.particles} on {x.shape[0]} images in {seconds:.1f} s "
          f"({results['images_per_second']:.1f} images/s) on {device}; peak RSS "
          f"{results['peak_rss_mib']:.0f} MiB (+{results['added_rss_mib']:.0f}){cuda}; mean "
          f"{results['mean_log_likelihood']:.2f} nats, ESS {results['mean_ess']:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
