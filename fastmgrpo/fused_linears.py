"""One GEMM for the projections that read the same input, in the sampler's decode copy.

A decode step's GEMMs are tiny (one row per slot) and a captured graph runs its kernels one
after the other, so the step's time goes by kernel count as much as by bytes: Gemma 3 270M's
step was 254 kernels, 7 of them GEMMs per layer. Attention's q, k and v projections read the
same hidden state, as do the MLP's gate and up projections: here each group's weights live in
one (sum of outputs, in) tensor whose row blocks are the projections' own weights (views, no
copy), and the group's first projection called on an input computes all of them in one GEMM
and hands the others their slices of the output: 4 GEMMs a layer instead of 7, for any model
whose modules are named like Llama's.

Only for a copy that no gradient flows through (`decode_weights.DecodeWeights` makes one): the
fused weight is a plain tensor, not a parameter. Writing into the projections' weights in
place (`DecodeWeights.refresh`) writes into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # attribute names read one input


class _Group:
    """The fused weight (and bias) of one group, and the output of the input it last saw,
    kept until every member has taken its slice (so a prefill's outputs are not held)."""

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.detach() for m in linears])  # (sum out, in)
        self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        self.seen: tuple | None = None  # (input, its output slices, members that took theirs)

    def slice(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member `member`'s projection of x (..., in) -> (..., its out features)."""
        if self.seen is None or self.seen[0] is not x:
            self.seen = (x, F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1), set())
        _, parts, taken = self.seen
        taken.add(member)
        if len(taken) == len(self.sizes):
            self.seen = None
        return parts[member]


class _Member(nn.Module):
    """A projection of a group: its weight (and bias) are views into the group's."""

    def __init__(self, group: _Group, member: int, rows: slice):
        super().__init__()
        self._group = [group]  # in a list: not a submodule, nor its tensors buffers
        self.member = member
        self.weight = nn.Parameter(group.weight[rows], requires_grad=False)
        self.bias = None if group.bias is None else nn.Parameter(group.bias[rows], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].slice(x, self.member)


def fuse_linears(model: nn.Module) -> int:
    """Replace, in place, every module's `GROUPS` of plain nn.Linear attributes that share their
    input size, dtype, device and bias presence by `_Member`s of one fused weight; returns how
    many groups were fused. `model` must need no gradients (its parameters become views)."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("fuse_linears is for a copy that needs no gradients")
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            first = linears[0]
            if any((m.in_features, m.weight.dtype, m.weight.device, m.bias is None)
                   != (first.in_features, first.weight.dtype, first.weight.device, first.bias is None)
                   for m in linears):
                continue
            group, start = _Group(linears), 0
            for i, (name, m) in enumerate(zip(names, linears)):
                setattr(module, name, _Member(group, i, slice(start, start + m.out_features)))
                start += m.out_features
            fused += 1
    return fused
