"""The fused loss (loss and gradients in one forward pass) against a float64 full-logits reference.

Both backends run: torch, and Triton (interpreted on CPU at tiny shapes, compiled on CUDA).
Upstream gradients are at GRPO scale (the loss is normalised by thousands of tokens). Each
gradient is checked by its relative norm error and cosine similarity against float64; the rows
of d_W that no target selects are checked on their own (they are small next to the target rows).
For 16-bit inputs the bound is twice the error of eager full logits in that dtype (the same
formula run in bf16/fp16 on the same rounded inputs) plus a rounding-level floor.
"""
import pytest
import torch
from triton_loader import DEV, load_backend

from fastmgrpo.kernels import GRPOLossConfig, fused, packed_grpo_loss
from fastmgrpo.kernels.reference import reference_linear_logprobs

load_backend()
BACKENDS = ["torch", "triton"]
LENGTHS = [9, 1, 14, 0, 6, 11]
NUM_TOKENS = 4096  # global normaliser: GRPO-scale upstream gradients
NUM_SEQUENCES = 512


def _problem(seed, H, V, dtype, with_bias, lengths=LENGTHS):
    """Packed inputs, rounded to `dtype` and kept in float64 for the references."""
    g = torch.Generator().manual_seed(seed)
    M, B = sum(lengths), len(lengths)
    d = dict(
        hidden=torch.randn(M, H, generator=g, dtype=torch.float64),
        weight=torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5,
        bias=torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None,
    )
    d = {k: None if v is None else v.to(dtype).double() for k, v in d.items()}
    d["targets"] = torch.randint(0, V, (M,), generator=g)
    d["targets"][:3] = torch.tensor([0, V - 1, 1])  # vocabulary edges
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    d["cu"], d["lengths"] = cu, lengths
    d["adv"] = torch.randn(B, generator=g)
    logp, _ = reference_linear_logprobs(d["hidden"], d["weight"], d["targets"], d["bias"])
    d["old"] = (logp + 0.3 * torch.randn(M, generator=g, dtype=torch.float64)).float()  # ratios straddle the clip
    d["ref"] = (logp + 0.3 * torch.randn(M, generator=g, dtype=torch.float64)).float()
    return d


def _reference_loss(d, dtype, cfg: GRPOLossConfig):
    """The loss written out plainly on full logits in `dtype`; returns (loss, [d_h, d_w, d_b]) in float64."""
    leaves = [None if d[k] is None else d[k].to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")]
    logp, ent = reference_linear_logprobs(leaves[0], leaves[1], d["targets"], leaves[2], cfg.temperature)
    logp, ent = logp.double(), ent.double()
    old, ref, adv = d["old"].double(), d["ref"].double(), d["adv"].double()
    total = 0.0
    for i, (s0, s1) in enumerate(zip(d["cu"][:-1].tolist(), d["cu"][1:].tolist())):
        if s1 == s0:
            continue
        lr = logp[s0:s1] - old[s0:s1]
        if cfg.importance_sampling_level == "sequence":
            lr = lr.mean().expand(s1 - s0)
        ratio = torch.exp(lr)
        surrogate = -torch.min(ratio * adv[i], ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * adv[i])
        x = ref[s0:s1] - logp[s0:s1]
        per_token = surrogate + cfg.beta * (torch.exp(x) - x - 1) - cfg.entropy_coef * ent[s0:s1]
        if cfg.loss_type == "grpo":
            total = total + per_token.mean() / NUM_SEQUENCES
        else:  # bnpo
            total = total + per_token.sum() / NUM_TOKENS
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(total, present))
    return total.detach().double(), [None if x is None else next(grads).double() for x in leaves]


def _fused_loss(d, dtype, cfg, backend):
    leaves = [None if d[k] is None else d[k].to(dtype).to(DEV).requires_grad_() for k in ("hidden", "weight", "bias")]
    loss, metrics = packed_grpo_loss(
        leaves[0], leaves[1], d["targets"].to(DEV), d["cu"].to(DEV), d["adv"].to(DEV), d["old"].to(DEV),
        d["ref"].to(DEV), config=cfg, bias=leaves[2], num_sequences=NUM_SEQUENCES, num_tokens=NUM_TOKENS,
        backend=backend,
    )
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, present))
    out = [None if x is None else next(grads) for x in leaves]
    assert all(g is None or g.dtype == dtype for g in out)  # gradients in the inputs' dtype
    return loss.detach().double().cpu(), [None if g is None else g.double().cpu() for g in out], metrics


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _errors(grads, gold, targets):
    """{name: (relative norm error, 1 - cosine)} per gradient, d_W's non-target rows on their own."""
    out = {}
    other = torch.ones(gold[1].shape[0], dtype=torch.bool)
    other[targets.unique()] = False
    for name, a, b in (("d_hidden", grads[0], gold[0]), ("d_weight", grads[1], gold[1]),
                       ("d_weight_non_target", grads[1][other], gold[1][other]), ("d_bias", grads[2], gold[2])):
        if b is not None:
            out[name] = (_rel(a, b), 1 - _cos(a, b))
    return out


CASES = [  # dtype, bias, temperature, entropy_coef, loss_type, importance level, budget (rows of logits)
    (torch.float32, True, 0.7, 0.01, "grpo", "token", 5),
    (torch.float32, False, 1.0, 0.0, "bnpo", "sequence", 16),
    (torch.bfloat16, True, 1.3, 0.01, "bnpo", "token", 7),
    (torch.bfloat16, False, 1.0, 0.0, "grpo", "sequence", 1000),
    (torch.float16, True, 0.9, 0.0, "grpo", "token", 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,bias,temp,ent,loss_type,level,rows", CASES)
def test_gradients_match_float64(backend, dtype, bias, temp, ent, loss_type, level, rows):
    V = 301 if backend == "triton" else 1031
    cfg = GRPOLossConfig(beta=0.04, temperature=temp, entropy_coef=ent, loss_type=loss_type,
                         importance_sampling_level=level, memory_budget=rows * V * 4 + 64 * V * 8 * (ent != 0))
    d = _problem(1234, 24, V, dtype, bias)
    gold_loss, gold = _reference_loss(d, torch.float64, cfg)
    loss, grads, metrics = _fused_loss(d, dtype, cfg, backend)
    if dtype == torch.float32:
        assert abs(loss - gold_loss).item() <= 1e-5 * abs(gold_loss).item() + 1e-9
        for name, (rel, one_minus_cos) in _errors(grads, gold, d["targets"]).items():
            assert rel <= 2e-5 and one_minus_cos <= 1e-8, (name, rel, one_minus_cos)
        return
    eager_loss, eager = _reference_loss(d, dtype, cfg)
    assert abs(loss - gold_loss).item() <= 2 * abs(eager_loss - gold_loss).item() + 1e-6 * abs(gold_loss).item()
    ours, theirs = _errors(grads, gold, d["targets"]), _errors(eager, gold, d["targets"])
    for name in ours:
        (rel, omc), (rel_e, omc_e) = ours[name], theirs[name]
        assert rel <= 2 * rel_e + 1e-3 and omc <= 2 * omc_e + 1e-6, (name, ours[name], theirs[name])
    assert set(metrics) == {"kl", "clip_ratio", "ratio_mean"} | ({"entropy"} if ent else set())


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_budget_gives_the_same_result(backend):
    """One row per chunk, a chunk splitting sequences, and one chunk: the same loss, metrics and
    gradients (fp32, summation order only)."""
    V = 97
    d = _problem(7, 16, V, torch.float32, True)
    runs = [_fused_loss(d, torch.float32, GRPOLossConfig(beta=0.1, loss_type="grpo", memory_budget=rows * V * 4),
                        backend) for rows in (1, 5, 10**6)]
    for loss, grads, metrics in runs[1:]:
        assert abs(loss - runs[0][0]).item() <= 1e-5 * abs(runs[0][0]).item() + 1e-9
        for a, b in zip(grads, runs[0][1]):
            assert _rel(a, b) <= 1e-5
        for k in metrics:
            assert abs(metrics[k] - runs[0][2][k]).item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_smaller_than_a_sequence(backend):
    """Token-level losses split a sequence across chunks; sequence-level ones (GSPO here) take the
    two-pass fallback (log-probs first, then the gradient pass): both match float64. No row fits:
    a ValueError naming the budget."""
    V = 64
    d = _problem(3, 8, V, torch.float32, False)
    for level in ("token", "sequence"):
        cfg = GRPOLossConfig(beta=0.04, loss_type="grpo", memory_budget=2 * V * 4, importance_sampling_level=level)
        loss, grads, _ = _fused_loss(d, torch.float32, cfg, backend)
        gold_loss, gold = _reference_loss(d, torch.float64, cfg)
        assert abs(loss - gold_loss).item() <= 1e-5 * abs(gold_loss).item(), level
        for name, (rel, one_minus_cos) in _errors(grads, gold, d["targets"]).items():
            assert rel <= 2e-5 and one_minus_cos <= 1e-8, (level, name, rel)
    with pytest.raises(ValueError, match="holds no row"):
        _fused_loss(d, torch.float32, GRPOLossConfig(beta=0.0, memory_budget=V), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vespo_two_pass_equals_whole_sequences(backend):
    """VESPO's phi needs a whole sequence: at a budget of 3 rows (sequences of up to 14) the two-pass
    fallback gives what one chunk holding everything gives."""
    V = 64
    d = _problem(4, 8, V, torch.float32, False)
    runs = [_fused_loss(d, torch.float32, GRPOLossConfig(beta=0.04, loss_type="vespo", memory_budget=rows * V * 4),
                        backend) for rows in (3, 10**4)]
    (loss, grads, metrics), (loss1, grads1, metrics1) = runs
    # fp32 summation order of terms larger than their sum (seen: 8e-9 on 7e-4)
    assert abs(loss - loss1).item() <= 1e-5 * abs(loss1).item() + 1e-7 and loss1 != 0
    assert _rel(grads[0], grads1[0]) <= 1e-5 and _rel(grads[1], grads1[1]) <= 1e-5
    for k in metrics1:
        assert abs(metrics[k] - metrics1[k]).item() <= 1e-6, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_grad_accumulation(backend):
    """d_W summed over one-row bf16 chunks in an fp32 buffer: returned in bf16, within the bound."""
    V = 257
    d = _problem(11, 16, V, torch.bfloat16, False, lengths=[12] * 5)
    cfg = GRPOLossConfig(beta=0.04, loss_type="bnpo", memory_budget=V * 6, fp32_weight_grad=True)
    _, gold = _reference_loss(d, torch.float64, cfg)
    _, eager = _reference_loss(d, torch.bfloat16, cfg)
    _, grads, _ = _fused_loss(d, torch.bfloat16, cfg, backend)
    assert _rel(grads[1], gold[1]) <= 2 * _rel(eager[1], gold[1]) + 1e-3


def _saved_16bit_heads(fn, shape):
    """fn() run under a saved-tensors hook: how many 16-bit tensors of `shape` autograd kept."""
    kept = []

    def pack(t):
        if tuple(t.shape) == tuple(shape) and t.dtype in (torch.bfloat16, torch.float16):
            kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, len(kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_master_head_gets_its_gradient_in_fp32(backend, monkeypatch):
    """bf16 hidden with the fp32 master head: d_W lands in the fp32 .grad directly (no 16-bit (V, H)
    gradient kept for backward, unlike casting the head first), as accurate as the cast path; a
    16-bit copy the caller already has (weight_16bit) gives the same result without a cast."""
    V, H = 257, 16
    d = _problem(17, H, V, torch.bfloat16, True, lengths=[12, 3, 9, 5])
    cfg = GRPOLossConfig(beta=0.04, loss_type="bnpo", memory_budget=V * 4 * 5)
    args = (d["targets"].to(DEV), d["cu"].to(DEV), d["adv"].to(DEV), d["old"].to(DEV), d["ref"].to(DEV))
    _, gold = _reference_loss(d, torch.float64, cfg)
    _, eager = _reference_loss(d, torch.bfloat16, cfg)
    grads, casts, cast = {}, [], fused.compute_head
    monkeypatch.setattr(fused, "compute_head", lambda w, dtype: casts.append(w.dtype) or cast(w, dtype))
    for path in ("cast", "master", "given"):
        h = d["hidden"].detach().to(torch.bfloat16).to(DEV).requires_grad_()
        w, b = (d[k].detach().float().to(DEV).requires_grad_() for k in ("weight", "bias"))
        head = (w.to(torch.bfloat16), b.to(torch.bfloat16)) if path == "cast" else (w, b)
        given = w.detach().to(torch.bfloat16) if path == "given" else None  # e.g. the sampler's copy
        (loss, _), kept = _saved_16bit_heads(lambda: packed_grpo_loss(
            h, head[0], *args, config=cfg, bias=head[1], num_tokens=NUM_TOKENS, backend=backend,
            weight_16bit=given), (V, H))
        loss.backward()
        assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        grads[path] = (kept, w.grad.double().cpu(), h.grad.double().cpu())
        assert casts.count(torch.float32) == (path == "master"), path  # the given copy is used as is
        casts.clear()
    assert grads["cast"][0] == 1 and grads["master"][0] == grads["given"][0] == 0  # cast: a bf16 d_W kept
    assert all(torch.equal(a, b) for a, b in zip(grads["given"][1:], grads["master"][1:]))
    bound = 2 * _rel(eager[1], gold[1]) + 1e-3
    for path, (_, d_w, d_h) in grads.items():
        assert _rel(d_w, gold[1]) <= bound, path
        assert _rel(d_h, gold[0]) <= 2 * _rel(eager[0], gold[0]) + 1e-3, path
    assert _rel(grads["master"][1], gold[1]) <= _rel(grads["cast"][1], gold[1]) * 1.01  # fp32 sum: no worse


def test_frozen_head_and_no_grad():
    """Only the inputs that need gradients get them; under no_grad the loss is still computed."""
    V = 50
    d = _problem(5, 8, V, torch.float32, True)
    cfg = GRPOLossConfig(beta=0.04, loss_type="bnpo")
    h = d["hidden"].float().requires_grad_()
    w, b = d["weight"].float(), d["bias"].float()
    args = (d["targets"], d["cu"], d["adv"], d["old"], d["ref"])
    loss, _ = packed_grpo_loss(h, w, *args, config=cfg, bias=b, num_tokens=NUM_TOKENS)
    loss.backward()
    gold_loss, gold = _reference_loss(d, torch.float64, cfg)
    assert w.grad is None and _rel(h.grad.double(), gold[0]) <= 2e-5
    with torch.no_grad():
        loss2, _ = packed_grpo_loss(h, w, *args, config=cfg, bias=b, num_tokens=NUM_TOKENS)
    assert loss2.grad_fn is None and abs(loss2.double() - gold_loss).item() <= 1e-5 * abs(gold_loss).item()


def test_grad_output_scales_the_gradients():
    """Backward multiplies the stored gradients by grad_output (e.g. a loss scale)."""
    d = _problem(9, 8, 40, torch.float32, False)
    cfg = GRPOLossConfig(beta=0.0, loss_type="bnpo")
    h = d["hidden"].float().requires_grad_()
    loss, _ = packed_grpo_loss(h, d["weight"].float(), d["targets"], d["cu"], d["adv"], config=cfg)
    (loss * -3.0).backward()
    h2 = d["hidden"].float().requires_grad_()
    loss2, _ = packed_grpo_loss(h2, d["weight"].float(), d["targets"], d["cu"], d["adv"], config=cfg)
    loss2.backward()
    torch.testing.assert_close(h.grad, -3.0 * h2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_logprobs_are_the_rows_logprobs(backend):
    """return_logprobs hands back every row's log-prob from the same pass (across chunks)."""
    V = 97
    d = _problem(13, 16, V, torch.float32, True)
    cfg = GRPOLossConfig(beta=0.04, memory_budget=4 * V * 4, temperature=0.8)
    h = d["hidden"].float().to(DEV).requires_grad_()
    _, metrics = packed_grpo_loss(h, d["weight"].float().to(DEV), d["targets"].to(DEV), d["cu"].to(DEV),
                                  d["adv"].to(DEV), None, d["ref"].to(DEV), config=cfg, bias=d["bias"].float().to(DEV),
                                  return_logprobs=True, backend=backend)
    gold, _ = reference_linear_logprobs(d["hidden"], d["weight"], d["targets"], d["bias"], 0.8)
    assert metrics["logprobs"].shape == gold.shape and metrics["logprobs"].grad_fn is None
    torch.testing.assert_close(metrics["logprobs"].double().cpu(), gold, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp32-accumulating 16-bit GEMMs are CUDA's")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_add_into_fp32_unrounded_on_cuda(dtype):
    """d_W's fp32 accumulation: acc += a @ b with no 16-bit rounding of the product (the error of
    an fp32 sum, far below one 16-bit rounding of the product)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    a = torch.randn(300, 64, device="cuda", generator=g).to(dtype)
    b = torch.randn(64, 200, device="cuda", generator=g).to(dtype)
    acc = torch.randn(300, 200, device="cuda", generator=g)
    want = acc.double() + a.double() @ b.double()
    rounded = acc.double() + (a @ b).double()  # the product rounded to 16 bits first
    fused._add_product_fp32(acc, a, b)
    print("in-place addmm:", fused._fp32_accumulating_gemm(acc.device, dtype),
          "fp32-output mm:", fused._fp32_output_gemm(acc.device, dtype))
    assert _rel(acc.double(), want) <= 0.05 * _rel(rounded, want)
