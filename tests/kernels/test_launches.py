"""What one fused call launches and allocates, counted on CPU (op_count: every dispatched aten op,
every Triton launch), so the CUDA path's launch count and working memory are checked without a GPU.

The Triton backend runs interpreted here, but it dispatches the same op sequence as on CUDA in
fp32 (16-bit inputs add only CPU-side casts: torch on CPU has no fp32-output 16-bit GEMM).
Per-chunk counts are the difference between two budgets (k1 and k2 chunks) over k2 − k1, so
per-call ops (validation, per-token weights, the one metric reduction) cancel.
"""
import collections
import random

import pytest
import torch
from op_count import counting
from test_fused import _problem, _reference_loss, _rel
from triton_loader import DEV, load_backend

from fastmgrpo.kernels import GRPOLossConfig, fused, grpo_loss, packed_grpo_loss

tb = load_backend()
V, H = 128, 16
CHUNK = ["mm", "triton:row_stats_kernel", "triton:dlogits_kernel", "mm", "addmm_"]  # Z, stats+g, dz, d_h, d_W


def _call(d, cfg, backend, weight_grad=True):
    """Launch log and gradients of one packed fp32 call (forward + backward)."""
    h = d["hidden"].float().to(DEV).requires_grad_()
    w = d["weight"].float().to(DEV).requires_grad_(weight_grad)
    args = [d[k].to(DEV) for k in ("targets", "cu", "adv", "old", "ref")]
    with counting(tb if backend == "triton" else None) as log:
        loss, metrics = packed_grpo_loss(h, w, *args, config=cfg, backend=backend, num_tokens=4096,
                                         cu_seqlens_host=d["cu"].tolist(), check_values=False)
        loss.backward()
    return log, loss, metrics, h.grad, w.grad


def _per_chunk(d, cfg_kw, backend, rows=(12, 4), **kw):
    """(Counter of op names per chunk, launches of the k1-chunk call, that call's log)."""
    logs, chunks = [], []
    for r in rows:
        cfg = GRPOLossConfig(memory_budget=r * V * 4, **cfg_kw)
        terms = _SequenceTerms() if grpo_loss._needs_whole_sequences(cfg) else None
        chunks.append(len(fused.chunk_rows(fused.Plan(d["targets"], d["cu"].tolist(), False, 1.0, terms,
                                                      tb if backend == "triton" else fused.torch_backend,
                                                      cfg.memory_budget), V, torch.float32)[0]))
        logs.append(_call(d, cfg, backend, **kw)[0])
    names = [collections.Counter(n for n, _ in log.launches) for log in logs]
    extra = names[1] - names[0]
    assert names[0] - names[1] == collections.Counter() and chunks[1] > chunks[0]
    return {k: v / (chunks[1] - chunks[0]) for k, v in extra.items()}, len(logs[0].launches), logs[0]


TOKEN_LEVEL = [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", beta=0.04, delta=1.5, use_bias_correction_kl=True, entropy_coef=0.01),
    dict(loss_type="cispo", beta=0.0, epsilon_high=3.0),
    dict(loss_type="sapo", beta=0.04),
]


@pytest.mark.parametrize("cfg_kw", TOKEN_LEVEL, ids=lambda c: c["loss_type"])
def test_triton_chunk_is_five_launches(cfg_kw):
    """Token-level losses on the Triton path: each chunk is the Z GEMM, the stats kernel (with the
    closed-form gradient and the metric terms), the dlogits kernel, the d_h and d_W GEMMs; per
    call, a fixed few ops more and one reduction of all metrics."""
    d = _problem(31, H, V, torch.float32, False, lengths=[9, 1, 14, 0, 6, 11])
    per_chunk, total, log = _per_chunk(d, cfg_kw, "triton")
    print("per chunk", per_chunk, "call", total, [n for n, _ in log.launches])
    assert per_chunk == collections.Counter(CHUNK)
    assert sum(per_chunk.values()) <= 10
    assert sum(n == "sum" for n, _ in log.launches) == 1  # the metrics: once per call


SEQUENCE_LEVEL = [
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.04, delta=1.5, use_bias_correction_kl=True, entropy_coef=0.01,
         importance_sampling_level="sequence"),
    dict(loss_type="vespo", beta=0.04, entropy_coef=0.01),
]


@pytest.mark.parametrize("cfg_kw", SEQUENCE_LEVEL, ids=lambda c: c["loss_type"] + "-" + c.get(
    "importance_sampling_level", "token"))
def test_triton_sequence_level_chunk_is_six_launches(cfg_kw):
    """Losses whose tokens need their whole sequence (GSPO, VESPO), chunks of whole sequences:
    the five launches of a token-level chunk plus the sequence kernel (one program per sequence)
    between the stats and dlogits kernels; loss and gradients equal the torch backend's (its
    closed form in torch, tested against autograd in test_closed_form)."""
    d = _problem(38, H, V, torch.float32, False, lengths=[9, 1, 14, 0, 6, 11])
    per_chunk, total, log = _per_chunk(d, cfg_kw, "triton", rows=(20, 14))
    print("per chunk", per_chunk, "call", total, [n for n, _ in log.launches])
    assert per_chunk == collections.Counter(CHUNK + ["triton:sequence_terms_kernel"])
    assert sum(n == "sum" for n, _ in log.launches) == 1
    cfg = GRPOLossConfig(memory_budget=14 * V * 4, **cfg_kw)
    _, loss, metrics, d_h, d_w = _call(d, cfg, "triton")
    _, want_loss, want_metrics, want_h, want_w = _call(d, cfg, "torch")
    assert _rel(d_h.cpu(), want_h.cpu()) <= 1e-5 and _rel(d_w.cpu(), want_w.cpu()) <= 1e-5
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    for name, value in want_metrics.items():
        assert abs(metrics[name].item() - value.item()) <= 1e-5 * abs(value.item()) + 1e-7, name


def test_torch_backend_chunk_launches():
    """The torch backend (CPU) runs the closed form as O(R) torch ops between its two row passes:
    more ops per chunk than Triton's five (measured 58 for dapo with KL), still 3 GEMMs."""
    d = _problem(32, H, V, torch.float32, False, lengths=[9, 1, 14, 0, 6, 11])
    per_chunk, _, _ = _per_chunk(d, TOKEN_LEVEL[0], "torch")
    print("torch backend per chunk", sum(per_chunk.values()), per_chunk)
    assert per_chunk["mm"] + per_chunk.get("addmm_", 0) == 3
    assert 5 < sum(per_chunk.values()) <= 70


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sequence_level_gemms_whole_sequences_and_two_pass(backend):
    """GSPO with whole sequences per chunk: 3 GEMMs per chunk. Below one sequence's rows: the
    two-pass fallback, 4 GEMMs per chunk (a log-prob pass, then the gradient pass)."""
    d = _problem(33, H, V, torch.float32, False, lengths=[9, 1, 14, 0, 6, 11])
    cfg_kw = dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence")
    gemms = {}
    for rows in (20, 4):  # 20 rows hold every sequence (3 chunks); 4 rows hold none of the long ones
        plan = fused.Plan(d["targets"], d["cu"].tolist(), False, 1.0, _SequenceTerms(),
                          tb if backend == "triton" else fused.torch_backend, rows * V * 4)
        chunks, two_pass = fused.chunk_rows(plan, V, torch.float32)
        log = _call(d, GRPOLossConfig(memory_budget=rows * V * 4, **cfg_kw), backend)[0]
        n = sum(name in ("mm", "addmm", "addmm_") for name, _ in log.launches)
        gemms[rows] = (n, len(chunks), two_pass)
    assert gemms[20] == (3 * gemms[20][1], gemms[20][1], False)
    assert gemms[4] == (4 * gemms[4][1], gemms[4][1], True), gemms


class _SequenceTerms:
    whole_sequences = True


def test_frozen_head_two_gemms_and_no_weight_grad_buffer():
    """A frozen head (LoRA): each chunk is Z GEMM, stats, dlogits, d_h GEMM: no d_W GEMM, no (V, H)
    buffer allocated; d_hidden still matches float64."""
    d = _problem(34, H, V, torch.float32, False, lengths=[9, 1, 14, 0, 6, 11])
    cfg_kw = dict(loss_type="dapo", beta=0.04)
    per_chunk, _, _ = _per_chunk(d, cfg_kw, "triton", weight_grad=False)
    assert per_chunk == collections.Counter(CHUNK[:4])
    cfg = GRPOLossConfig(memory_budget=5 * V * 4, **cfg_kw)
    log, loss, _, d_h, d_w = _call(d, cfg, "triton", weight_grad=False)
    assert d_w is None and (V, H) not in [shape for shape, _ in log.allocations]
    gold_loss, gold = _reference_loss(d, torch.float64, GRPOLossConfig(memory_budget=5 * V * 4, **cfg_kw))
    assert _rel(d_h.double().cpu(), gold[0]) <= 2e-5
    assert abs(loss.item() - gold_loss.item()) <= 1e-5 * abs(gold_loss.item())


@pytest.mark.parametrize("beta", [0, 1])
def test_fp32_accumulation_fallback_is_bounded_and_exact(monkeypatch, caplog, beta):
    """Forced fallback of d_W's fp32 accumulation (no in-place fp32-accumulating 16-bit addmm, as
    in torch 2.11): it adds slice by slice of the vocabulary (no (V, H) fp32 product), equals
    float64, and the probe logs which path runs."""
    g = torch.Generator().manual_seed(35)
    Vb, R, Hb = 1000, 24, 40
    a = torch.randn(Vb, R, generator=g).to(torch.bfloat16)
    b = torch.randn(R, Hb, generator=g).to(torch.bfloat16)
    acc = torch.randn(Vb, Hb, generator=g) if beta else torch.full((Vb, Hb), float("nan"))
    want = (acc.double() if beta else 0) + a.double() @ b.double()
    probe = fused._fp32_accumulating_gemm.__wrapped__  # the probe itself, not its cached answer
    monkeypatch.setattr(fused, "_fp32_accumulating_gemm", lambda device, dtype: False)
    monkeypatch.setattr(fused, "_SLICE_BYTES", 64 * 4 * (R + Hb))  # 64 rows per slice
    with counting() as log:
        fused._add_product_fp32(acc, a, b, beta=beta)
    biggest = max(torch.Size(s).numel() * torch.empty((), dtype=t).element_size() for s, t in log.allocations)
    assert biggest <= fused._SLICE_BYTES and (Vb, Hb) not in [s for s, _ in log.allocations]
    assert (acc.double() - want).abs().max() <= 1e-5 * want.abs().max()
    with caplog.at_level("INFO", logger="fastmgrpo.kernels.fused"):
        assert probe(torch.device("cpu"), torch.bfloat16) is False
    assert "vocabulary slices" in caplog.text and "bfloat16" in caplog.text


def test_trainer_head_is_cast_once_per_update_not_per_micro_batch():
    """bf16 compute with fp32 master weights: the trainer's update makes one (V, H) bf16 copy of the
    head (none when the sampler's decode copy is handed in), however many micro-batches it has;
    the loss and gradients are those of a per-call cast."""
    from fastmgrpo.config import MGRPOConfig
    from fastmgrpo.decode_weights import DecodeWeights
    from fastmgrpo.distributed import Dist
    from fastmgrpo.models import lm_head
    from fastmgrpo.policy import Policy, StepStats
    from fastmgrpo.testing import build_tiny_model
    from test_trainer import random_episodes

    model, tok = build_tiny_model(seed=36, vocab_size=640, arch="llama")
    random.seed(36)
    episodes = random_episodes(len(tok), 12)
    cfg = MGRPOConfig(model="tiny", dataset="synthetic", device="cpu", beta=0.0, sampler_is_cap=2.0)
    policy = Policy.build(model, None, cfg, torch.bfloat16, Dist(torch.device("cpu")), tok.pad_token_id)
    plan = policy.plan(episodes, 16)
    assert len(plan) >= 4
    weight = lm_head(model)[0]
    grads = {}
    for how in ("once", "decode", "per_call"):
        model.zero_grad(set_to_none=True)
        decode = DecodeWeights(model, torch.bfloat16).model if how == "decode" else None
        if how == "per_call":  # the previous behaviour: no copy for the update, each call casts
            policy._update_head = lambda model, decode_model: None
        with counting() as log:
            policy.backward(plan, StepStats.start(torch.device("cpu")), decode)
        heads = [1 for shape, dtype in log.allocations if shape == tuple(weight.shape) and dtype == torch.bfloat16]
        grads[how] = (len(heads), weight.grad.clone())
    assert grads["once"][0] == 1 and grads["decode"][0] == 0 and grads["per_call"][0] >= len(plan)
    assert torch.equal(grads["once"][1], grads["per_call"][1]) and torch.equal(grads["decode"][1], grads["once"][1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="bytes are counted by the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_pass_bytes_per_logit(dtype):
    """The row pass reads the fp32 logits twice and writes dlogits once, in the products' dtype:
    4 + 4 + 2 = 10 bytes per logit for 16-bit products (12 for fp32), plus O(1) per row."""
    R, Vb = 6, 2048
    g = torch.Generator().manual_seed(37)
    z = torch.randn(R, Vb, generator=g)
    targets = torch.randint(0, Vb, (R,), generator=g)
    with counting(tb) as log:
        stats = tb.row_stats_(z, targets, True)
        tb.dlogits_(z, targets, stats, torch.randn(R, generator=g), torch.randn(R, generator=g), 1.0, dtype)
    per_logit = {k: {op: n / (R * Vb) for op, n in c.items()} for k, c in log.kernel_bytes.items()}
    print(per_logit)
    out = 2 if dtype == torch.bfloat16 else 4
    assert 4 <= per_logit["row_stats_kernel"]["load"] <= 4.02 and per_logit["row_stats_kernel"]["store"] <= 0.02
    assert 4 <= per_logit["dlogits_kernel"]["load"] <= 4.02
    assert out <= per_logit["dlogits_kernel"]["store"] <= out + 0.02
