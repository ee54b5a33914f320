"""Data-parallel training on torch.distributed, as `torchrun` launches it: NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node 4 train.py --batch 2 ...     # 4 processes, global batch 8

Every rank holds the whole model and the same adapters; a training step splits one global batch over the
ranks. A 2-process run with per-rank batch b computes what a 1-process run with batch 2b computes:
- Every rank walks the same epoch permutation and draws the *global* batch's latents, noise and t from the
  same seeded generator (a cheap CPU draw), then keeps its own rows (`shard`). So the data, the noise and the
  generator's state are those of the single-process run, whatever the number of ranks.
- After backward, `average_gradients` replaces each adapter gradient by the global batch's: the ranks'
  gradients weighted by their share of the batch, summed with one all-reduce. Every rank then holds the same
  gradient and takes the same optimizer step, so the adapters stay identical without any broadcast.
- Methods that decide from gradients decide identically: AdaLoRA's importance and LoRA^2's rates read the
  averaged gradients, DyLoRA's b and SeLoRA's candidate K are drawn from (seed, step), and SeLoRA sums its
  Fisher statistics over the ranks (`all_reduce_sum`) before forming the FI-ratio.

Why not DistributedDataParallel: DDP registers the parameters' shapes once, and SeLoRA, AdaLoRA and LoRA^2
change those shapes during training (expansion, truncation), which would mean re-wrapping the model after
every change. Only the adapters train, their gradients are small (under 1 % of the UNet), and one explicit
all-reduce after backward is what DDP would do for them, minus the overlap with backward, which matters
little at this size.

Outside torchrun (no RANK / WORLD_SIZE in the environment) every function here is the identity, so a
single-process run computes exactly what it did before any of this existed.
"""
from __future__ import annotations

import datetime
import os
import signal
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

_device = torch.device("cpu")  # where collectives run: this rank's GPU with NCCL, the CPU with gloo


class Stopped(RuntimeError):
    """Another rank failed, a collective timed out, or the launcher stopped this rank: the run cannot go on."""


def _collective(op, *args) -> None:
    """Run a torch.distributed collective; its failure (a peer that died: gloo's "Connection closed by peer",
    NCCL's errors, a timeout) becomes `Stopped`, which train.py reports with how to resume."""
    try:
        op(*args)
    except RuntimeError as err:
        raise Stopped(f"rank {rank()}: {op.__name__} failed: {err}") from err


def launched() -> bool:
    """True when torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0 writes the run folder (logs, figures, checkpoints, adapters); the others only compute."""
    return rank() == 0


def init(device: str, timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun set up and return this rank's device; without torchrun, torch.device(device).

    `device` "cuda" becomes cuda:LOCAL_RANK, one GPU per process (NCCL); a CPU device uses gloo. A collective
    that waits longer than `timeout_minutes` for another rank fails instead of hanging. The launcher's SIGTERM
    (torchrun sends it to the survivors when one rank dies) becomes a `Stopped` error, so the run ends with a
    message rather than silently. Calling it again returns the same device.
    """
    global _device
    dev = torch.device(device)
    if not launched():
        return dev
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return dev
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise SystemExit(f"rank {rank()}: LOCAL_RANK {dev.index} but this machine has {torch.cuda.device_count()} "
                             "GPUs: give torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    _device = dev if backend == "nccl" else torch.device("cpu")

    def stopped(signum, frame):
        raise Stopped(f"rank {rank()} received {signal.Signals(signum).name} from the launcher, which stops every "
                      "rank when one of them fails")
    signal.signal(signal.SIGTERM, stopped)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        _collective(dist.barrier)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writing a split or a cache), then the others run it (reading them)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor on tensor's device); `tensor` itself in one process."""
    if world_size() == 1 or not dist.is_initialized():
        return tensor
    out = tensor.to(_device, copy=True)
    _collective(dist.all_reduce, out)
    return out.to(tensor.device)


def all_reduce_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over all ranks, with one all-reduce of their concatenation (one collective however
    many tensors: SeLoRA sums a few per layer at every test); the tensors themselves in one process."""
    if world_size() == 1 or not dist.is_initialized():
        return tensors
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sum_over_processes(parts: dict[str, list[torch.Tensor]], reduce=all_reduce_sums) -> dict[str, list[torch.Tensor]]:
    """Every tensor of `parts` ({key: tensors}, the same keys in the same order on every process) summed over the
    processes with one collective (`reduce`, `all_reduce_sums`), in the same layout; `parts` itself in one process."""
    flat = reduce([t for tensors in parts.values() for t in tensors])
    out, i = {}, 0
    for key, tensors in parts.items():
        out[key], i = flat[i:i + len(tensors)], i + len(tensors)
    return out


def shard(batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's rows of a global batch: contiguous slices whose sizes differ by at most one, in rank order.

    A rank gets no row when the batch has fewer samples than there are ranks (an epoch's short last batch).
    """
    n, ranks, r = len(batch[0]), world_size(), rank()
    size, extra = divmod(n, ranks)
    start = r * size + min(r, extra)
    return [x[start:start + size + (r < extra)] for x in batch]


def average_gradients(params: Sequence[torch.nn.Parameter], loss: torch.Tensor | None, n: int, total: int) -> float:
    """Make every rank's `params` gradients those of the global batch's mean loss; return that loss.

    loss: this rank's mean loss over its n samples (None when n = 0); total: the global batch's size. The
    gradient of the global mean is sum_r (n_r / total) grad_r, one all-reduce over a flat buffer. A parameter
    that no rank gave a gradient keeps None, as in a single process (the optimizer then skips it). The
    gradient of a data-independent penalty added to every rank's loss stays itself, since the weights sum to 1.
    """
    if world_size() == 1:
        return loss.item()
    weight = n / total
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    stats = torch.tensor([0.0 if loss is None else loss.item() * n]
                         + [float(p.grad is not None) for p in params], dtype=torch.float64)
    flat, stats = all_reduce_sum(flat), all_reduce_sum(stats)
    for p, g, seen in zip(params, flat.split([p.numel() for p in params]), stats[1:].tolist()):
        p.grad = g.view_as(p) if seen else None
    return stats[0].item() / total
