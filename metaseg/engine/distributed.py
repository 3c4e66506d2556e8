"""One meta-training over several processes with PyTorch's own stack: torchrun + torch.distributed.

``torchrun --nproc_per_node=N -m metaseg.train ...`` starts N copies of the trainer. Each:

1. joins the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): backend ``nccl`` when it trains on CUDA
   (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo`` on the CPU, chosen from the device;
2. draws the same global meta-batch from the shared sampler seed and adapts only its own
   slice (``TaskSampler.sample_batch``): shares are disjoint and together are exactly the tasks
   of a one-process run with the same ``meta.meta_batch``;
3. sums the outer gradients over the processes (``GradSync.reduce``, the hook
   ``Algorithm.finish_step`` calls before unscaling, clipping and the optimizer step), so
   every process takes the same step and keeps identical weights. Every algorithm goes
   through that hook, Reptile's averaged parameter deltas included (they are its surrogate
   gradient).

Why not ``DistributedDataParallel``: higher's patched modules replace the forward of the
wrapped module and DDP's reducer never sees the gradients it expects (higher issue #98), and
one outer step backpropagates several tasks into the same ``.grad``, which DDP would reduce
after every one. So the reduction is explicit: gradients are packed into buckets of
``BUCKET_MB`` and each bucket is all-reduced asynchronously, the next one packed while the
previous is in flight. It starts after the last task's backward (the gradient is complete
only then); overlapping it with that backward is not done.

Only rank 0 writes (checkpoints, tensorboard, metrics, logs above warnings); evaluation
episodes are split over the ranks and gathered (``episode_share``/``gather``), so every rank
ends with the same result and the same best-checkpoint decision.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metaseg.utils.errors import ConfigError

log = logging.getLogger(__name__)
BUCKET_MB = 25.0  # DDP's default bucket size


def env_world_size() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Context:
    """Where this process stands: rank, world size, its device, and whether it opened the group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if ``setup`` opened it (a test's own group is left alone)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device, timeout_s: float = 1800.0) -> Context:
    """Join torchrun's process group (once) and pick this process's device.

    Not under torchrun and no group open: a one-process context, nothing initialised. On CUDA
    each process takes ``cuda:LOCAL_RANK`` (a device named with an index is kept as is).
    """
    if not dist.is_available():
        return Context(device=device)
    owns = False
    if not dist.is_initialized():
        if env_world_size() <= 1:
            return Context(device=device)
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={env_world_size()} is set but {', '.join(missing)} is not: start "
                              f"several processes with torchrun --nproc_per_node=N -m metaseg.train ...")
        if device.type == "cuda" and device.index is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are "
                                  f"visible: lower torchrun --nproc_per_node to the number of GPUs")
            device = torch.device("cuda", local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    ctx = Context(dist.get_rank(), dist.get_world_size(), device, owns)
    if device.type == "cuda" and ctx.world_size > 1 and dist.get_backend() == "nccl":
        torch.cuda.set_device(device)
    return ctx


def check_meta_batch(meta_batch: int, world: int) -> None:
    if world > 1 and meta_batch < world:
        raise ConfigError(f"meta.meta_batch={meta_batch} is smaller than the {world} processes: every process "
                          f"needs at least one task; raise meta.meta_batch to >= {world} or start fewer processes")


def offset_streams(seed: int, step: int, rank_: int) -> None:
    """Give ranks > 0 global random streams of their own (dropout and the like differ per process).

    Rank 0 keeps the run's streams (the ones a checkpoint saves); the others derive theirs from
    (seed, rank, step), so a resume under any world size is reproducible as well.
    """
    if rank_ == 0:
        return
    ss = np.random.SeedSequence([int(seed) % 2**32, rank_, step])
    a, b, c = (int(x) for x in ss.generate_state(3))
    random.seed(a)
    np.random.seed(b)
    torch.manual_seed(c)


def quiet_logging(ctx: Context) -> None:
    """Ranks > 0 only report warnings and errors, so the log reads like a one-process run's."""
    if not ctx.main:
        logging.getLogger("metaseg").setLevel(logging.WARNING)


# -- gradients ------------------------------------------------------------------------------
class GradSync:
    """Sums the outer gradients and task counts over all processes (``metaseg.meta.base.GradSync``).

    A parameter without a gradient on one process (an unused head, all its tasks skipped) but
    with one elsewhere counts as zero there; one without a gradient anywhere keeps ``None``, so
    the optimizer skips it exactly as in a one-process run.
    """

    def __init__(self, bucket_mb: float = BUCKET_MB, group: Optional[Any] = None):
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.group = group

    def reduce(self, params: list[nn.Parameter], n_used: int, n_tasks: int) -> tuple[int, int]:
        device = params[0].device if params else torch.device("cpu")
        head = torch.tensor([float(n_used), float(n_tasks)] + [float(p.grad is not None) for p in params],
                            dtype=torch.float64, device=device)
        dist.all_reduce(head, group=self.group)
        n_used, n_tasks = int(head[0].item()), int(head[1].item())
        present = [p for p, flag in zip(params, head[2:].tolist()) if flag > 0]
        for p in present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket, work, flat in self._launch(present):
            work.wait()
            for g, part in zip((p.grad for p in bucket), torch._utils._unflatten_dense_tensors(flat, [p.grad for p in bucket])):
                g.copy_(part)
        return n_used, n_tasks

    def _launch(self, params: Sequence[nn.Parameter]):
        """Buckets of same-dtype gradients, each all-reduced asynchronously as soon as it is packed."""
        pending, bucket, size = [], [], 0
        for p in params:
            if bucket and (size + p.grad.numel() * p.grad.element_size() > self.bucket_bytes
                           or p.grad.dtype != bucket[0].grad.dtype or p.grad.device != bucket[0].grad.device):
                pending.append(self._send(bucket))
                bucket, size = [], 0
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        if bucket:
            pending.append(self._send(bucket))
        return pending

    def _send(self, bucket: list[nn.Parameter]):
        flat = torch._utils._flatten_dense_tensors([p.grad for p in bucket])
        return bucket, dist.all_reduce(flat, group=self.group, async_op=True), flat

    def mean_stats(self, outcomes) -> dict:
        """Each statistic averaged over the used tasks of every process."""
        sums: dict[str, list[float]] = {}
        for o in outcomes:
            if o.used:
                for k, v in o.stats.items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0] += float(v)
                    acc[1] += 1.0
        gathered: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, sums, group=self.group)
        total: dict[str, list[float]] = {}
        for part in gathered:
            for k, (s, n) in part.items():
                acc = total.setdefault(k, [0.0, 0.0])
                acc[0] += s
                acc[1] += n
        return {k: s / max(n, 1.0) for k, (s, n) in sorted(total.items())}


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values into ``tensors`` on every process (start weights: identical by
    construction from the shared seed, made identical by fiat in case a user's model is not)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


# -- evaluation -----------------------------------------------------------------------------
def episode_share(n: int) -> list[int]:
    """The evaluation episodes this process runs: every world_size-th, from its rank (rank 0 has episode 0)."""
    return list(range(rank(), n, world_size()))


def gather(items: list) -> list:
    """Every process's ``items`` concatenated in rank order (all processes get the result)."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
