"""Data parallelism under torchrun: one process per device, questions sharded across ranks.

`Dist` is the whole process-group surface the trainer uses (rank, world size, reductions,
barrier); with WORLD_SIZE unset it is a single process and every call is a no-op. `wrap` puts
the policy under DDP or FSDP2, `full_weights` lets ranks run different numbers of forwards, and
`Probe` / `equalise` give every rank the same number of micro-batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from . import env
from .metrics import Metric
from .packing import pack
from .types import Episode


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. `device` carries the reductions (cuda for nccl)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> tuple[Dist, torch.device]:
        """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo
        on CPU) and return it with this rank's device (cuda:LOCAL_RANK). One process: no-op."""
        world = env.world_size()
        if world == 1:
            return cls(device), device
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank())
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(device, dist.get_rank(), world), device

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (one float64 all-reduce)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def reduce_metrics(self, metrics: dict) -> dict:
        """Global step metrics: every float must be a `metrics.Metric` and is combined by its
        type (Sum added over ranks, Mean averaged, Max the largest, Same kept); other values
        (the step, flags) are equal on every rank and kept. Returns plain floats."""
        untyped = [k for k, v in metrics.items() if isinstance(v, float) and not isinstance(v, Metric)]
        if untyped:
            raise TypeError(f"step metrics {untyped} must say how ranks combine them: wrap them in "
                            "metrics.Sum, Mean, Max or Same where they are produced")
        by_op = {op: sorted(k for k, v in metrics.items() if getattr(v, "op", None) == op)
                 for op in ("sum", "mean", "max")}
        out = {k: float(v) if isinstance(v, Metric) else v for k, v in metrics.items()}
        if self.world > 1:
            summed = self.sum([out[k] for k in by_op["sum"] + by_op["mean"]])
            out.update(zip(by_op["sum"], summed))
            out.update((k, v / self.world) for k, v in zip(by_op["mean"], summed[len(by_op["sum"]):]))
            out.update(zip(by_op["max"], self.max([out[k] for k in by_op["max"]])))
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def wrap(module: torch.nn.Module, layers, d: Dist, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard unit per decoder layer plus `module` as the root;
    returned as is for one process. `module` must hold every trained parameter."""
    if d.world == 1:
        return module
    if fsdp:
        for layer in layers:
            fully_shard(layer)
        return fully_shard(module)
    # broadcast_buffers off: the models' buffers (rotary tables) are constants, no running stats.
    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   broadcast_buffers=False)


@contextlib.contextmanager
def no_grad_sync(wrapped: torch.nn.Module, skip: bool):
    """With `skip`, backward inside only accumulates local gradients (no all-reduce under DDP,
    no reduce-scatter under FSDP2); the next backward outside reduces the accumulated sum."""
    if not skip or not isinstance(wrapped, (DistributedDataParallel, FSDPModule)):
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_weights(wrapped: torch.nn.Module):
    """FSDP2: every rank holds the full weights inside (no collective per forward), so rollout
    and eval may run a different number of forwards on each rank. No-op otherwise."""
    if not isinstance(wrapped, FSDPModule):
        yield
        return
    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    wrapped.set_reshard_after_forward(False)
    try:
        yield
    finally:
        wrapped.set_reshard_after_forward(True)
        wrapped.set_reshard_after_forward(False, recurse=False)  # the root keeps its default
        for m in units:
            m.reshard()


class Probe:
    """A one-token, zero-weight micro-batch through the wrapped loss `module`.

    It pads a rank's micro-batches to the most any rank has (`equalise`: FSDP2 gathers weights in
    every forward and DDP reduces in every backward, so the counts must agree), and, run once
    here, makes `module` FSDP2's root (FSDP2 takes the first module to run forward as its root;
    rollout would otherwise run the layers first).
    """

    NORM = {"num_sequences": 1, "num_tokens": 1}

    def __init__(self, module: torch.nn.Module, pad_id: int, device: torch.device, with_ref: bool):
        self.module = module
        episode = Episode([pad_id], [pad_id], [0.0], 0.0, False, layer=1, group=0)
        self.args = (pack([episode]).to(device), torch.zeros(1, device=device) if with_ref else None)
        with torch.no_grad(), full_weights(module):  # which also leaves every unit sharded
            module(*self.args, None, self.NORM)

    def backward(self) -> None:
        """Forward and backward of the probe: zero gradients, the collectives every rank makes."""
        loss, _, _ = self.module(*self.args, None, self.NORM)
        (loss * 0.0).backward()


def equalise(plan: list, d: Dist) -> list:
    """`plan` padded with None (probe micro-batches) to the most micro-batches any rank has."""
    return plan + [None] * (int(d.max([len(plan)])[0]) - len(plan))
