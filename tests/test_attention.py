"""The packed-attention dispatch around torch's varlen kernel, on CPU: the kernel itself is
CUDA-only, so stand-ins with the signatures of different torch releases take its place and
compute the attention in float64; what is tested is how we call it (head expansion, one dtype,
causal/window/scale arguments, fallbacks) and the once-per-forward host sync."""

import logging

import pytest
import torch

from fastmgrpo import attention

CU = [0, 5, 6, 13]  # three sequences: 5, 1 and 7 tokens
HQ, HKV, D = 4, 2, 8


def _reference(q, k, v, cu, scale, window):
    """(T, Hq, D) float64: causal attention within each sequence, GQA heads shared."""
    q, k, v = (t.double().transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    return attention._per_sequence(q, k, v, cu, scale, window)[0].transpose(0, 1)


def _stand_in(calls):
    """A varlen_attn in torch 2.13's signature that records how it was called."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        calls.append(dict(dtypes={query.dtype, key.dtype, value.dtype}, heads=(query.shape[1], key.shape[1]),
                          window_size=window_size, enable_gqa=enable_gqa, scale=scale))
        assert window_size[1] == 0, "must be causal"
        window = None if window_size[0] < 0 else window_size[0] + 1
        return _reference(query, key, value, cu_seq_q.tolist(), scale, window).to(query.dtype)

    return varlen_attn


def _stand_in_old(calls):
    """torch 2.10's signature: is_causal only, no scale, window or GQA."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(dict(dtypes={query.dtype, key.dtype, value.dtype}, heads=(query.shape[1], key.shape[1])))
        assert is_causal
        return _reference(query, key, value, cu_seq_q.tolist(), None, None).to(query.dtype)

    return varlen_attn


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, CU[-1], D, generator=gen) for h in (HQ, HKV, HKV))  # (1, H, T, D)
    return q, k, v.bfloat16()  # rope leaves q/k fp32 beside a bf16 v under autocast


def _call(q, k, v, scaling=None, window=None, cu=None):
    cu = torch.tensor(CU, dtype=torch.int32) if cu is None else cu
    out, _ = attention.varlen_attention(None, q, k, v, None, scaling=scaling, sliding_window=window,
                                        cu_seq_lens_q=cu, max_length_q=7)
    return out[0]  # (T, Hq, D)


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "_VARLEN_DEVICES", ("cpu",))
    attention._log_path.cache_clear()


@pytest.mark.parametrize("new_torch", [True, False])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_varlen_call_matches_per_sequence_attention(on_cpu, monkeypatch, new_torch, scaling):
    calls = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", (_stand_in if new_torch else _stand_in_old)(calls))
    q, k, v = _inputs()
    out = _call(q, k, v, scaling=scaling)
    assert len(calls) == 1 and calls[0]["dtypes"] == {torch.bfloat16}
    if new_torch:
        assert calls[0]["heads"] == (HQ, HKV) and calls[0]["enable_gqa"] and calls[0]["scale"] == scaling
        assert calls[0]["window_size"] == (-1, 0)
    else:
        assert calls[0]["heads"] == (HQ, HQ)  # K/V heads expanded: this torch has no enable_gqa
    ref = _reference(*(t[0].transpose(0, 1) for t in (q, k, v)), CU, scaling, None)
    # bf16 rounding of q/k/v (and of a pre-scaled q) only: measured max error 0.0066
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() < 0.02


def test_sliding_window_uses_window_size_or_falls_back_for_that_layer(on_cpu, monkeypatch):
    q, k, v = _inputs(1)
    ref = _reference(*(t[0].transpose(0, 1) for t in (q, k, v)), CU, None, 3)
    calls = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", _stand_in(calls))
    out = _call(q, k, v, window=3)
    assert calls[-1]["window_size"] == (2, 0) and (out.double() - ref).abs().max() < 0.02
    _call(q, k, v, window=7)  # no sequence is longer than the window: plain causal
    assert calls[-1]["window_size"] == (-1, 0)

    old = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", _stand_in_old(old))
    out = _call(q, k, v.float(), window=3)  # per-sequence SDPA (fp32 here: no autocast on CPU)
    assert not old and (out.double() - ref).abs().max() < 1e-5
    _call(q, k, v, window=None)
    assert len(old) == 1  # the full-attention layers still take the kernel


def test_fp32_falls_back_and_boundaries_sync_once_per_forward(on_cpu, monkeypatch, caplog):
    calls, synced = [], []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", _stand_in(calls))
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: synced.append(1) or tolist(t))
    q, k, v = (t.float() for t in _inputs(2))
    cu = torch.tensor(CU, dtype=torch.int32)
    with caplog.at_level(logging.INFO, logger="fastmgrpo.attention"):
        outs = [_call(q, k, v, cu=cu) for _ in range(3)]  # three layers of one forward
    assert not calls  # fp32 keeps SDPA's precision rather than rounding to bf16
    assert len(synced) == 1
    ref = _reference(*(t[0].transpose(0, 1) for t in (q, k, v)), CU, None, None)
    torch.testing.assert_close(outs[0].double(), ref, atol=1e-5, rtol=0)
    assert [r.getMessage() for r in caplog.records] == [
        "packed attention: one SDPA call per sequence (fp32 inputs: varlen_attn needs bf16/fp16)"]
    cu[1] = 4  # in place: the cached list is stale
    _call(q, k, v, cu=cu)
    _call(q, k, v, cu=cu.clone())  # the next forward's tensor
    assert len(synced) == 3
