"""A 16-bit copy of the policy that only the sampler reads, refreshed in place after each update.

Sampling from fp32 master weights under autocast casts every weight at every decode step (or
hands a captured CUDA graph autocast's cached casts, which are freed when autocast exits). A
persistent copy in the compute dtype is read directly, keys and values come out in that dtype,
and `refresh` writes into the same storage, so a kept CUDA graph's weight pointers stay valid.
"""

from __future__ import annotations

import copy

import torch


class DecodeWeights:
    """`model`, the policy in `dtype` for sampling; the master itself when no cast is needed.

    Parameters are cast; buffers (RoPE inverse frequencies, embedding scales) keep their dtype,
    as `from_pretrained(dtype=...)` leaves them. Create it before FSDP2 shards the master.
    """

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype):
        self.master = master
        if dtype == torch.float32 or all(p.dtype == dtype for p in master.parameters()):
            self.model = master
            return
        self.model = copy.deepcopy(master).eval().requires_grad_(False)
        for p in self.model.parameters():  # tied weights are one Parameter: cast once
            p.data = p.data.to(dtype)

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """Copy the master's current weights into `model` in place (under FSDP2: inside
        `full_weights`, on every rank); return `model`."""
        if self.model is not self.master:
            for dst, src in zip(self.model.parameters(), self.master.parameters(), strict=True):
                dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)
        return self.model
