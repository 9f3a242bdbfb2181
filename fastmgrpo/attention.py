"""Per-sequence attention for packed batches when flash-attn is not installed.

Without flash-attn, transformers runs a packed row (sequences back to back, position ids
restarting at 0) through SDPA with one block-diagonal (T, T) mask: attention costs T² for the
whole micro-batch instead of Σ Lᵢ² — at a 4,096-token budget and ~300-token sequences that is
more than the rest of the forward pass. This attention function takes the sequence boundaries
(`cu_seq_lens_q`, which `packing.packed_hidden_states` passes) and attends within each sequence:
PyTorch's varlen kernel on CUDA when it exists, else one SDPA call per sequence. Every other
call (rollout with padding masks, plain forwards) goes to transformers' SDPA unchanged, so one
model serves sampling and packed training.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

VARLEN = "fastmgrpo_varlen"


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn when it supports causal windows and GQA, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa", "scale"} <= params.keys() else None


_VARLEN_ATTN = _torch_varlen()


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """(L, L) bool: causal and within `window` positions (transformers' sliding-window rule)."""
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def _per_sequence(query, key, value, cu: list[int], scaling, sliding_window) -> torch.Tensor:
    """query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, Hq, T, D), one SDPA per sequence."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for start, end in zip(cu[:-1], cu[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        length = end - start
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = _window_mask(length, sliding_window, query.device)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function (registered as `fastmgrpo_varlen`).

    With `cu_seq_lens_q` ((B+1,) int32 boundaries of a packed (1, T) row): causal attention within
    each sequence, honouring `sliding_window`. Otherwise: transformers' SDPA attention.
    Returns (attn_output (1, T, Hq, D), None).
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    if softcap is not None or dropout:
        raise ValueError("packed attention supports neither attention softcapping nor dropout")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    if _VARLEN_ATTN is not None and query.is_cuda:
        window = (-1 if sliding_window is None else sliding_window - 1, 0)
        out = _VARLEN_ATTN(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                           window_size=window, enable_gqa=query.shape[1] != key.shape[1])  # (T, Hq, D)
        return out[None], None
    out = _per_sequence(query, key, value, cu_seq_lens_q.tolist(), scaling, sliding_window)  # sync point
    return out.transpose(1, 2), None


AttentionInterface.register(VARLEN, varlen_attention)
if VARLEN not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
    # Rollout and plain forwards still need SDPA's padding/causal masks.
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch a model running transformers' SDPA to `fastmgrpo_varlen` (same results, packed
    batches cost Σ Lᵢ² instead of T²). Flash-attention and eager models are left as they are."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(VARLEN)
