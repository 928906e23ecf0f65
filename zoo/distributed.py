r"""Data parallelism on torch.distributed: N processes train one model and take exactly the
steps that one process takes with the same global batch.

**Launch.** ``torchrun --nproc-per-node N -m zoo train ...`` (or ``zoo train ... --nproc N``,
which calls torch's own launcher, :func:`launch`) starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`setup` joins them into one
process group: backend ``gloo`` on the CPU, ``nccl`` on CUDA with one GPU per local rank.

**One step.** Every process holds the same model, guide, optimizer and random-number states
(the same seed, or the same checkpoint), so all draw the same permutation and the same
binarization, hence the same global batch of B points. Rank r of N takes its share, the points
[r b, (r + 1) b) with b = B / N, computes the objective of its share divided by B, and its
gradient; one all-reduce sums the gradients and the losses (:func:`sum_gradients`), so that
every rank holds

    g = grad (1 / B) sum_{n in batch} loss_n,

the gradient of one process up to the order of the sums, and takes the same optimizer step.
Every objective of the zoo is a sum over data points without a subsampling scale (the engine
passes minibatches unscaled and divides by B) when every latent site lies in the plate
``"data"``, so the shares add up to the global loss. Two things do not split and are refused:
free bits, whose KL term is a mean over the whole minibatch, and global latent variables
(sites outside the data plate), which the objectives weight jointly with the whole batch.

**The same random draws.** One process draws the latent variables of a batch as one tensor of
shape [K, B, ...] (K particles at dim -2, the data plate at dim -1). Rank r draws the same
numbers in the same order, as a tensor of shape [K, N, b, ...] from the distribution of its own
points broadcast over the N shares, and keeps share r (:class:`_SharedDraws`). So each rank
draws, at its points, what one process draws there, and the generators of all ranks stay in
step. A batch that N does not divide (the last of an epoch) is computed whole by every rank and
weighted 1 / N.

Rank 0 alone writes to the run folder; the others wait for it (:func:`from_main`). A rank that
stops brings the others down: the launcher stops them, and a collective that loses its peers or
waits longer than :data:`TIMEOUT` raises :class:`RankFailed`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from zoo.errors import ZooError

TIMEOUT = timedelta(minutes=5)
"""How long a collective waits for the other processes before the run stops."""

_UNEXPANDED = "zoo_unexpanded_fn"
_REPORTED_BY_LAUNCHER = "ZOO_NPROC"
"""Set for the processes that :func:`launch` starts: it reports their failures itself."""
_DATA_PLATE = "data"


class RankFailed(ZooError):
    """Another process of the run stopped, or did not answer within :data:`TIMEOUT`."""

    exit_status = 3


def launched() -> bool:
    """Whether a launcher (torchrun, :func:`launch`) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def started_by_launcher() -> bool:
    """Whether a launcher started this process (even as the only one)."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's rank, 0 for a single process (read from the launcher's environment
    before the process group exists)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in this process's group, 1 outside one."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run folder and prints."""
    return rank() == 0


def reports_lost_ranks() -> bool:
    """Whether this process reports that another one stopped: rank 0, unless :func:`launch`
    started it (the launcher reports instead, naming the process that stopped)."""
    return is_main() and _REPORTED_BY_LAUNCHER not in os.environ


def check(batch_size: int, free_bits: float = 0.0, size: int | None = None) -> None:
    """Refuse, before any process waits for another, what cannot be split over ``size``
    processes (default: those of the launcher)."""
    size = int(os.environ.get("WORLD_SIZE", "1")) if size is None else size
    if batch_size % size:
        raise ZooError(f"--batch-size {batch_size} does not split over {size} processes; "
                       f"choose a batch size that {size} divides")
    if size > 1 and free_bits > 0:
        raise ZooError("--free-bits takes the KL of each latent dimension as a mean over the "
                       "whole minibatch, which does not split over processes: drop --free-bits "
                       "or train in one process")


def backend_of(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: nccl on CUDA, gloo elsewhere, refused
    when this build of torch lacks it."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise ZooError(f"the torch.distributed backend {backend} (for --device {device.type}) "
                       f"is not available in this build of torch; run in one process or "
                       f"install a torch built with {backend}")
    return backend


def setup(device: torch.device) -> torch.device:
    """Join the process group of the launcher, when there is one, and return this rank's
    device: ``device`` itself on the CPU, GPU ``LOCAL_RANK`` for CUDA."""
    if not launched():
        return device
    backend = backend_of(device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ZooError(f"process {local_rank} on this machine has no GPU of its own (torch "
                           f"sees {torch.cuda.device_count()}); start at most that many "
                           f"processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(operation: Callable[..., Any], *args: Any) -> Any:
    try:
        return operation(*args)
    except RuntimeError as error:
        raise RankFailed(f"another process of the run stopped or did not answer within "
                         f"{TIMEOUT.seconds} s; the checkpoint of the last finished epoch is "
                         f"kept: continue with zoo train --resume RUN, with any number of "
                         f"processes") from error


def sum_gradients(parameters: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``parameters`` and the value ``loss`` over the ranks, in one
    all-reduce; return the summed loss (``loss`` itself in one process).

    Every rank runs the same code, so the parameters without a gradient are the same on all.
    """
    if world_size() == 1:
        return loss
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    flat = torch.cat([loss.detach().reshape(1), *(grad.reshape(-1) for grad in gradients)])
    _collective(dist.all_reduce, flat)
    for grad, summed in zip(gradients, flat[1:].split([grad.numel() for grad in gradients]),
                            strict=True):
        grad.copy_(summed.view_as(grad))
    return flat[0]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the ranks (``tensor`` in one process)."""
    if world_size() > 1:
        _collective(dist.all_reduce, tensor)
    return tensor


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank; the others wait here until rank 0 arrives."""
    if world_size() == 1:
        return value
    values = [value]
    _collective(dist.broadcast_object_list, values, 0)
    return values[0]


def mine(items: Sequence[Any]) -> Sequence[Any]:
    """This rank's share of ``items``, dealt round-robin: items r, r + N, r + 2N, ..."""
    return items[rank()::world_size()]


class _Unexpanded(Messenger):
    """Keeps, at each latent site of the data plate, the guide's distribution as it is before a
    particle plate outside the guide broadcasts it (the batch shape of the data alone)."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):  # a plate's indices
            return
        if not any(frame.name == _DATA_PLATE for frame in msg["cond_indep_stack"]):
            raise ZooError(f"latent site '{msg['name']}' lies outside the plate "
                           f"'{_DATA_PLATE}': a global latent variable is shared by every data "
                           f"point, so its term does not split over processes; train this model "
                           f"in one process")
        msg["infer"] = {**(msg["infer"] or {}), _UNEXPANDED: msg["fn"]}


class _SharedGuide(torch.nn.Module):
    """The guide, with its latent sites' distributions kept for :class:`_SharedDraws`; the same
    parameters under the names ``guide.*``."""

    def __init__(self, guide: torch.nn.Module) -> None:
        super().__init__()
        self.guide = guide

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _Unexpanded():
            return self.guide(*args, **kwargs)


class _SharedDraws(Messenger):
    """Draws each latent site of this rank's share as one process draws the global batch.

    The site's distribution, batch shape [..., b] with the data plate at dim d, is broadcast to
    [..., N, b] in place of the global [..., B = N b]; the draw takes the same numbers from the
    generator, in the same order, and share r of it is this rank's. Sites whose value is
    already set (replayed, enumerated) draw nothing.
    """

    def __init__(self, rank: int, size: int) -> None:
        super().__init__()
        self.rank, self.size = rank, size

    def _pyro_sample(self, msg: dict) -> None:
        unexpanded = (msg["infer"] or {}).get(_UNEXPANDED)
        if unexpanded is None or msg["value"] is not None:
            return
        shape = msg["fn"].batch_shape
        data = next(frame.dim for frame in msg["cond_indep_stack"] if frame.name == _DATA_PLATE)
        d = len(shape) + data
        outer = unexpanded.batch_shape[:len(unexpanded.batch_shape) - len(shape[d:])]
        if any(size != 1 for size in outer):
            raise ZooError(f"the guide's site '{msg['name']}' has batch dimensions outside the "
                           f"data plate of its own (batch shape {list(unexpanded.batch_shape)}); "
                           f"its draws cannot be split over processes: train in one process")
        draws = unexpanded.expand(shape[:d] + (self.size,) + shape[d:])
        sample = draws.rsample if msg["fn"].has_rsample else draws.sample
        msg["value"] = sample(*msg["args"], **msg["kwargs"]).select(d, self.rank)


def share_guide(guide: torch.nn.Module) -> torch.nn.Module:
    """The guide that :func:`share_loss` needs: ``guide`` itself in one process."""
    return guide if world_size() == 1 else _SharedGuide(guide)


def share_loss(loss: Callable[..., torch.Tensor], batch: Sequence[torch.Tensor]
               ) -> torch.Tensor:
    """This rank's part of ``loss(*batch)``, a sum over the data points of ``batch``: the loss
    of its share, with the draws of the whole batch (``loss`` must use :func:`share_guide`);
    or, when the ranks do not divide the batch, ``loss(*batch) / N``. The parts of all ranks
    add up to ``loss(*batch)``."""
    size = world_size()
    if size == 1:
        return loss(*batch)
    if batch[0].shape[0] % size:
        return loss(*batch) / size
    share = batch[0].shape[0] // size
    begin = rank() * share
    with _SharedDraws(rank(), size):
        return loss(*(tensor[begin:begin + share] for tensor in batch))


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m zoo ARGV`` in ``nproc`` processes on this machine through torch's
    launcher (what ``torchrun --standalone --nproc-per-node NPROC`` does) and return the exit
    status: 0, that of rank 0 when it stopped with a message, else 3.

    The processes share the machine's cores: each gets ``OMP_NUM_THREADS`` = cores / nproc
    unless it is set. A failure of a process stops the others. When rank 0 stopped with a
    message of its own (exit status 1, 2 or 130) it has printed it; any other failure gets one
    line here.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[_REPORTED_BY_LAUNCHER] = str(nproc)
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):  # zoo says in one line what failed
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"zoo-{os.getpid()}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "zoo", *argv)
    except SignalException:  # Ctrl-C: the launcher passed it on, and rank 0 said what is kept
        return 130
    except ChildFailedError as error:
        main = error.failures.get(0)
        if main is not None and main.exitcode in (1, 2, 130):  # rank 0 printed why
            return main.exitcode
        failed, failure = error.get_first_failure()
        how = (f"was stopped by signal {failure.signal_name()}" if failure.exitcode < 0
               else "lost contact with the others" if failure.exitcode == RankFailed.exit_status
               else f"exited with status {failure.exitcode}")
        print(f"zoo: error: process {failed} of {nproc} {how}, and the others were stopped; "
              f"the checkpoint of the last finished epoch is kept: continue with "
              f"zoo train --resume RUN, with any number of processes", file=sys.stderr)
        return RankFailed.exit_status
    return 0
