"""Varlen packing of episodes into micro-batches: no padding, position ids restarting at 0 for
every sequence (what `policy.packed_hidden_states` runs through the model, each sequence
attending only to itself; tests/test_packing.py checks it against each sequence alone).
"""

from __future__ import annotations

import itertools

import torch

from fastmgrpo.types import Episode, PackedBatch


def pack(episodes: list[Episode]) -> PackedBatch:
    """Concatenate episodes (prompt + completion each) into one PackedBatch (see types.py).

    For a sequence at offset o with prompt length p >= 1 and completion length c, target rows
    are o+p-1 ... o+p+c-2 (the rows whose next token is a completion token).
    """
    if not episodes:
        raise ValueError("pack() needs at least one episode")
    ids, pos, rows, old = [], [], [], []
    offset = 0
    for e in episodes:
        p, c = len(e.prompt_ids), len(e.completion_ids)
        if p == 0:
            raise ValueError("an episode needs at least one prompt token")
        if len(e.sampler_logprobs) != c:
            raise ValueError(f"episode has {c} completion tokens but {len(e.sampler_logprobs)} "
                             "sampler_logprobs")
        ids += e.prompt_ids + e.completion_ids
        pos.append(torch.arange(p + c))
        rows.append(torch.arange(offset + p - 1, offset + p + c - 1))
        old += e.sampler_logprobs
        offset += p + c
    lengths = torch.tensor([e.num_tokens for e in episodes])  # (B,)
    comp_lengths = torch.tensor([len(e.completion_ids) for e in episodes])  # (B,)
    cu_targets_host = tuple(itertools.accumulate((len(e.completion_ids) for e in episodes), initial=0))
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),  # (T,)
        position_ids=torch.cat(pos),  # (T,)
        cu_seqlens=_cumsum0(lengths),  # (B+1,)
        max_seqlen=max(e.num_tokens for e in episodes),
        target_rows=torch.cat(rows),  # (M,)
        targets=torch.tensor([t for e in episodes for t in e.completion_ids], dtype=torch.int64),  # (M,)
        cu_targets=_cumsum0(comp_lengths),  # (B+1,)
        sampler_logprobs=torch.tensor(old, dtype=torch.float32),  # (M,)
        advantages=torch.tensor([e.advantage for e in episodes], dtype=torch.float32),  # (B,)
        weights=torch.tensor([e.weight for e in episodes], dtype=torch.float32),  # (B,)
        layers=torch.tensor([e.layer for e in episodes], dtype=torch.int64),  # (B,)
        cu_targets_host=cu_targets_host,
    )


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B+1,) int32 offsets starting at 0."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def microbatches(episodes: list[Episode], token_budget: int) -> list[list[Episode]]:
    """Split episodes into micro-batches of at most `token_budget` tokens each.

    First-fit decreasing: longest first, each into the first micro-batch with room. A sequence
    longer than the budget gets a micro-batch of its own. Every episode appears exactly once.
    """
    bins: list[list[Episode]] = []
    free: list[int] = []  # tokens left per bin
    for e in sorted(episodes, key=lambda e: e.num_tokens, reverse=True):
        for b, room in enumerate(free):
            if e.num_tokens <= room:
                bins[b].append(e)
                free[b] -= e.num_tokens
                break
        else:
            bins.append([e])
            free.append(token_budget - e.num_tokens)
    return bins
