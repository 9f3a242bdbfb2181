"""Varlen packing of episodes: no padding, attention restricted to each sequence.

Attention isolation in `packed_hidden_states` comes from the position ids alone: they restart
at 0 for every sequence and the attention mask is None, so transformers (5.x, masking_utils)
detects the packed layout and
  - with sdpa/eager (CPU, or CUDA without flash-attn) builds a block-diagonal causal mask in
    which causality and sliding windows are measured in per-sequence positions;
  - with flash_attention_2 runs the varlen kernel; we pass cu_seqlens/max_seqlen ourselves so
    it need not derive them from the position ids (a device sync);
  - with `fastmgrpo_varlen` (attention.py; what the trainer switches SDPA models to) attends
    within each sequence, so attention costs sum(L_i^2) rather than T^2.
tests/test_packing.py checks the result against each sequence run alone.
"""

from __future__ import annotations

import itertools

import torch

from fastmgrpo.attention import VARLEN
from fastmgrpo.models import decoder
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


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final (normed) hidden states of every packed token, each sequence attending only to itself.

    batch: a PackedBatch on the model's device. Returns (T, H) in the model's compute dtype,
    row t being the state after token t (select `batch.target_rows` for the loss).
    Differentiable (runs under the caller's grad mode).
    """
    impl = model.config._attn_implementation
    kwargs, mask = {}, None  # mask None is what enables transformers' packed-sequence detection
    if impl.startswith("flash_attention") or impl == VARLEN:
        cu = batch.cu_seqlens.to(torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                      max_length_k=batch.max_seqlen)
    if impl == VARLEN:
        # The attention function separates the sequences itself: no (T, T) block-diagonal mask
        # is built only to be ignored. Models with per-layer-type masks (Gemma 3, Qwen) take a
        # ready {type: mask} mapping, which also skips the masks' host syncs; others get an
        # all-ones mask, which turns the packed detection off.
        types = getattr(model.config, "layer_types", None)
        mask = dict.fromkeys(types) if types else torch.ones_like(batch.input_ids)[None]
    out = decoder(model)(
        input_ids=batch.input_ids[None],  # (1, T)
        position_ids=batch.position_ids[None],  # (1, T) restarting at 0 per sequence
        attention_mask=mask,
        use_cache=False,  # a cache would disable packed detection too
        **kwargs,
    )
    return out.last_hidden_state[0]  # (T, H)


def padded_hidden_states(model: torch.nn.Module, episodes: list[Episode]) -> torch.Tensor:
    """Reference for `packed_hidden_states`: the same (T, H) rows computed from a right-padded
    (B, max_len) batch with an attention mask, padding rows dropped."""
    device = model.get_input_embeddings().weight.device
    lengths = [e.num_tokens for e in episodes]
    width = max(lengths)
    ids = torch.zeros((len(episodes), width), dtype=torch.int64)  # (B, L)
    mask = torch.zeros((len(episodes), width), dtype=torch.int64)  # (B, L)
    for r, e in enumerate(episodes):
        ids[r, : lengths[r]] = torch.tensor(e.prompt_ids + e.completion_ids)
        mask[r, : lengths[r]] = 1
    out = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state[mask.to(device).bool()]  # (T, H) row-major = packed order
