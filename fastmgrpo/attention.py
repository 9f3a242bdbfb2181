"""Per-sequence attention for packed batches when flash-attn is not installed.

Without flash-attn, transformers runs a packed row (sequences back to back, position ids
restarting at 0) through SDPA with one block-diagonal (T, T) mask: attention costs T² for the
whole micro-batch instead of Σ Lᵢ² — at a 4,096-token budget and ~300-token sequences that is
more than the rest of the forward pass. This attention function takes the sequence boundaries
(`cu_seq_lens_q`, which `policy.packed_hidden_states` passes) and attends within each sequence:
PyTorch's varlen kernel on CUDA for 16-bit compute, whichever of scale/window/GQA arguments the
installed torch has (K/V heads copied where it lacks GQA; sliding-window layers fall back where it
lacks windows), else one SDPA call per sequence with the boundaries synced to the host once per
forward. The path taken is logged once (INFO). Every other
call (rollout with padding masks, plain forwards) goes to transformers' SDPA unchanged, so one
model serves sampling and packed training.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

VARLEN = "fastmgrpo_varlen"
_log = logging.getLogger(__name__)


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN_ATTN = _torch_varlen()
_VARLEN_DEVICES = ("cuda",)  # its flash kernel has no CPU implementation
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _keywords(fn) -> frozenset[str]:
    # torch releases differ: 2.13 has window_size, scale and enable_gqa; 2.10 only is_causal.
    return frozenset(inspect.signature(fn).parameters)


@functools.cache  # each message once per process: this runs in every layer of every forward
def _log_path(message: str) -> None:
    _log.info("packed attention: %s", message)


_BOUNDS: tuple[weakref.ref, int, list[int]] | None = None


def _host_bounds(cu: torch.Tensor) -> list[int]:
    """cu.tolist(), synced once per forward rather than once per layer: every layer of one
    forward gets the same cu_seq_lens tensor object, so the list is cached on it (weakly, and
    invalidated by in-place writes through the tensor's version counter)."""
    global _BOUNDS
    if _BOUNDS is None or _BOUNDS[0]() is not cu or _BOUNDS[1] != cu._version:
        _BOUNDS = (weakref.ref(cu), cu._version, cu.tolist())  # sync point
    return _BOUNDS[2]


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
    out = _varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling, sliding_window)
    if out is None:
        out = _per_sequence(query, key, value, _host_bounds(cu_seq_lens_q), scaling, sliding_window).transpose(1, 2)
    return out, None


def _varlen(query, key, value, cu, max_len, scaling, sliding_window) -> torch.Tensor | None:
    """(1, T, Hq, D) from torch's varlen kernel, or None where it cannot serve this call."""
    if _VARLEN_ATTN is None or query.device.type not in _VARLEN_DEVICES or max_len is None:
        _log_path("one SDPA call per sequence (no torch varlen_attn on this device)")
        return None
    keywords = _keywords(_VARLEN_ATTN)
    if sliding_window is not None and sliding_window >= max_len:
        sliding_window = None  # no sequence is longer than the window: plain causal attention
    if not {"window_size", "is_causal"} & keywords:
        _log_path("one SDPA call per sequence (this torch's varlen_attn cannot mask causally)")
        return None
    if sliding_window is not None and "window_size" not in keywords:
        _log_path("torch varlen_attn, one SDPA call per sequence for sliding-window layers "
                  "(this torch's varlen_attn has no window_size)")
        return None
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    else:
        dtype = next((t.dtype for t in (value, query, key) if t.dtype in _HALF), None)
    if dtype not in _HALF:  # the flash kernel is 16-bit only; fp32 keeps SDPA's precision
        _log_path("one SDPA call per sequence (fp32 inputs: varlen_attn needs bf16/fp16)")
        return None
    _log_path("torch varlen_attn")
    # (T, H, D) each; rope leaves q/k in fp32 beside a bf16 v under autocast, which the fused
    # op rejects, so all three share one 16-bit dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    extra = {}
    if k.shape[1] != q.shape[1]:  # GQA: torch versions without enable_gqa need the heads copied
        if "enable_gqa" in keywords:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in keywords:  # (left, right); transformers' window counts the query itself
        extra["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:
        extra["is_causal"] = True
    if scaling is not None:
        if "scale" not in keywords:
            q = q * (scaling * q.shape[-1] ** 0.5)  # the kernel's default scale is 1/sqrt(D)
        else:
            extra["scale"] = scaling
    return _VARLEN_ATTN(q, k, v, cu, cu, max_len, max_len, **extra)[None]  # (1, T, Hq, D)


@functools.cache
def register() -> None:
    """Make `fastmgrpo_varlen` known to transformers (once; importing this module registers nothing)."""
    AttentionInterface.register(VARLEN, varlen_attention)
    if VARLEN not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        # Rollout and plain forwards still need SDPA's padding/causal masks.
        AttentionMaskInterface.register(VARLEN, sdpa_mask)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Register `fastmgrpo_varlen` and switch a model running transformers' SDPA to it (same
    results, packed batches cost Σ Lᵢ² instead of T²). Flash-attention and eager models are left
    as they are."""
    if model.config._attn_implementation == "sdpa":
        register()
        model.set_attn_implementation(VARLEN)
