"""A 16-bit copy of the policy that only the sampler reads, refreshed in place after each update.

Sampling from fp32 master weights under autocast casts every weight at every decode step (or
hands a captured CUDA graph autocast's cached casts, which are freed when autocast exits). A
persistent copy in the compute dtype is read directly, keys and values come out in that dtype,
and `refresh` writes into the same storage, so a kept CUDA graph's weight pointers stay valid.

Under LoRA the copy holds merged weights, base + B·A·scale, rewritten before each rollout: the
sampler runs a plain model (its captured graphs unchanged, no adapter matmuls per decode step)
for one extra copy of the base in the compute dtype (2 bytes a parameter in bf16: 16 GB at 8B,
which fits beside the 16 GB frozen base on an 80 GB GPU) and one B·A product per adapted weight
per rollout (bench/RESULTS.md, "LoRA"). Decoding unmerged would save that copy but add two
small GEMMs per adapted projection to every decode step; merging in place into the frozen base
and unmerging after would round the base in 16 bits twice per rollout, so it would drift.

The copy's projections that read one input (q/k/v, gate/up) share one weight tensor and run as
one GEMM (`fused_linears`): fewer kernels per decode step, the same bytes.
"""

from __future__ import annotations

import copy

import torch

from .fused_linears import fuse_linears
from .lora import is_lora, merged_weights


class DecodeWeights:
    """`model`, the policy in `dtype` for sampling; the master itself when no cast is needed.

    Parameters are cast; buffers (RoPE inverse frequencies, embedding scales) keep their dtype,
    as `from_pretrained(dtype=...)` leaves them. Create it before FSDP2 shards the master.
    """

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype):
        self.master, self.lora = master, is_lora(master)
        if not self.lora and (dtype == torch.float32 or all(p.dtype == dtype for p in master.parameters())):
            self.model = master
            return
        # A PEFT master's copy is a plain model: its adapted weights hold the merged sum.
        model = copy.deepcopy(master).merge_and_unload() if self.lora else copy.deepcopy(master)
        self.model = model.eval().requires_grad_(False)
        for p in self.model.parameters():  # tied weights are one Parameter: cast once
            p.data = p.data.to(dtype)
        fuse_linears(self.model)  # q/k/v and gate/up as one GEMM each per decode step

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """Copy the master's current weights into `model` in place (under FSDP2: inside
        `full_weights`, on every rank); return `model`. Under LoRA only the adapted weights
        change (the base is frozen): they get the merged sum."""
        if self.lora:
            params = dict(self.model.named_parameters())
            for name, weight in merged_weights(self.master):
                params[name].copy_(weight)
        elif self.model is not self.master:
            for dst, src in zip(self.model.parameters(), self.master.parameters(), strict=True):
                dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)
        return self.model
