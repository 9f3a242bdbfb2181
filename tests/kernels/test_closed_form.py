"""The closed-form per-token loss gradient against autograd on the loss's definition.

`grpo_loss._grpo_grads` (torch) and the Triton row kernel's `_loss_terms` are what the fused pass
runs; `grpo_loss._grpo_core` is the loss written plainly, differentiated here by autograd. Every
loss type with every option: clipping (delta), KL (on / off / no reference), bias-corrected KL,
the rollout IS ratio (per token and per sequence), the entropy bonus, on-policy (no old
log-probs), sequence-level importance sampling (GSPO) where allowed, and all of them together.
"""
import zlib

import pytest
import torch
from triton_loader import DEV, load_backend

from fastmgrpo.kernels.grpo_loss import (LOSS_TYPES, LOSS_VARIANTS, GRPOLossConfig, _grpo_core, _grpo_grads,
                                         _LossTerms, _Norm, _Tokens)

tb = load_backend()
LENGTHS = [7, 1, 12, 0, 5, 9]
OPTIONS = ["base", "no_kl", "delta", "bias_kl", "vllm_token", "vllm_sequence", "entropy", "on_policy", "no_ref",
           "sequence", "all", "sequence_all"]  # all: delta, bias-corrected KL, IS ratio, entropy together
SEQUENCE = ("sequence", "sequence_all")


def _case(seed, loss_type, option, dtype=torch.float64, padded=True):
    """(cfg, tokens (logp unset), norm, logp (N,), entropy (N,) or None) for one loss type and option."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(LENGTHS), sum(LENGTHS)
    seg = torch.repeat_interleave(torch.arange(B), torch.tensor(LENGTHS))
    mask = (torch.rand(N, generator=g) > 0.2).to(dtype) if padded else torch.ones(N, dtype=dtype)
    logp = -torch.rand(N, generator=g, dtype=dtype) * 4
    old = logp + 0.3 * torch.randn(N, generator=g, dtype=dtype)  # ratios on both sides of the clip range
    old[::4] = logp[::4]  # ratio exactly 1: the min of the clipped surrogate ties
    ref = logp + 0.5 * torch.randn(N, generator=g, dtype=dtype)
    adv_seq = torch.randn(B, generator=g, dtype=dtype)
    adv_seq[1] = 0.0
    seq_len = torch.zeros(B, dtype=dtype).index_add(0, seg, mask)
    vllm, vllm_log_seq = None, None
    every = option in ("all", "sequence_all")
    if option == "vllm_token" or every:
        vllm = torch.rand(N, generator=g, dtype=dtype) + 0.5
        vllm_log_seq = torch.zeros(B, dtype=dtype).index_add(0, seg, vllm.log())
    elif option == "vllm_sequence":
        per_seq = torch.rand(B, generator=g, dtype=dtype) + 0.5
        vllm, vllm_log_seq = per_seq[seg], per_seq.log()
    entropy = torch.rand(N, generator=g, dtype=dtype) * 3 if option == "entropy" or every else None
    tok_w = mask * (torch.rand(B, generator=g, dtype=dtype) + 0.5)[seg]  # per-sequence weights
    kw = dict(loss_type=loss_type, max_completion_length=16, beta=0.0 if option == "no_kl" else 0.04,
              delta=1.1 if option == "delta" or every else None,
              use_bias_correction_kl=option == "bias_kl" or every,
              entropy_coef=0.01 if option == "entropy" or every else 0.0, epsilon_high=0.25,
              importance_sampling_level="sequence" if option in SEQUENCE else "token")
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1  # an absolute cap of the ratio
    cfg = GRPOLossConfig(**kw)
    tokens = _Tokens(None, None if option == "on_policy" else old, None if option == "no_ref" else ref,
                     adv_seq[seg], adv_seq, seg, mask, seq_len, vllm, vllm_log_seq)
    n_tok = mask.sum()
    norm = _Norm(tok_w=tok_w, luspo_w=tok_w * seq_len[seg] / 12, num_sequences=float(B + 3),
                 num_tokens=n_tok + 5, dapo_norm=n_tok + 7, max_completion_length=16, metric_w=mask,
                 metric_den=n_tok)
    return cfg, tokens, norm, logp, entropy


def _seed(*names) -> int:
    return zlib.crc32(repr(names).encode()) % 1000


def _cases():
    for loss_type in LOSS_TYPES:
        for option in OPTIONS:
            if option in SEQUENCE and LOSS_VARIANTS[loss_type].token_level_only:
                continue
            yield loss_type, option


@pytest.mark.parametrize("loss_type,option", list(_cases()))
def test_closed_form_equals_autograd(loss_type, option):
    """Loss, metrics, ∂loss/∂logp and ∂loss/∂entropy of the closed form equal autograd's on the
    definition, in float64 (formula errors show far above rounding)."""
    cfg, tokens, norm, logp, entropy = _case(_seed(loss_type, option), loss_type, option)
    leaf = logp.clone().requires_grad_()
    ent_leaf = None if entropy is None else entropy.clone().requires_grad_()
    loss, metrics = _grpo_core(tokens.rows(0, logp.shape[0], leaf), norm, cfg, ent_leaf)
    inputs = [leaf] + ([ent_leaf] if ent_leaf is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    w = LOSS_VARIANTS[loss_type].weights(tokens, norm)
    values, g, g_ent = _grpo_grads(tokens.rows(0, logp.shape[0], logp), w, norm.metric_w, cfg, entropy)
    assert abs(loss.detach() - values[0].sum()) <= 1e-12 * (1 + abs(loss.detach()))
    for k, name in enumerate(("kl", "clip_ratio", "ratio_mean") + (("entropy",) if entropy is not None else ())):
        # the definition rounds each metric's terms to fp32 (x.float())
        assert abs(metrics[name] - values[k + 1].sum() / norm.metric_den) <= 1e-6 * abs(metrics[name]) + 1e-12, name
    want = grads[0] if grads[0] is not None else torch.zeros_like(logp)
    assert want.abs().max() > 0
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-14)
    if cfg.entropy_coef != 0.0:
        torch.testing.assert_close(g_ent, grads[1], rtol=1e-12, atol=1e-16)
    else:
        assert g_ent is None


# one loss type per kernel code (the reductions' weights are inputs of the kernel, tested above);
# "all" turns on delta, bias-corrected KL, the IS ratio and the entropy bonus together. GSPO
# (sequence ratio) and VESPO (sequence weight) run the sequence kernel after the row kernel.
KERNEL_CASES = [(lt, op) for lt in ("dapo", "cispo", "sapo") for op in ("base", "all", "no_kl", "on_policy", "no_ref")]
KERNEL_CASES += [("grpo", op) for op in ("sequence", "sequence_all")]
KERNEL_CASES += [("vespo", op) for op in ("base", "all", "vllm_sequence", "on_policy", "no_ref", "entropy")]


@pytest.mark.parametrize("loss_type,option", KERNEL_CASES)
def test_triton_kernels_closed_form_equals_torch(loss_type, option):
    """The Triton kernels' closed form (g, g_entropy and each row's loss / metric terms: folded
    into the stats kernel, or in the sequence kernel for whole-sequence losses) equals the torch
    closed form evaluated on the kernel's own log-probs and entropies. Two chunks split at a
    sequence boundary (an empty sequence on it), as the fused pass runs them."""
    cfg, tokens, norm, _, entropy = _case(_seed(loss_type, option) + 1, loss_type, option,
                                          dtype=torch.float32)
    N, V = sum(LENGTHS), 64
    gen = torch.Generator().manual_seed(len(option))
    z = (torch.randn(N, V, generator=gen) * 3).to(DEV)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEV)
    to_dev = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in vars(tokens).items()}
    tokens = _Tokens(**to_dev)
    norm = _Norm(**{k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in vars(norm).items()})
    with_entropy = entropy is not None
    starts = [0] + torch.tensor(LENGTHS).cumsum(0).tolist()
    terms = _LossTerms(tokens, LOSS_VARIANTS[loss_type].weights(tokens, norm), norm.metric_w,
                       cfg, with_entropy, starts, torch.tensor(starts, device=DEV))
    K = len(terms.names) + 1
    g, g_ent = torch.full((N,), float("nan"), device=DEV), torch.full((N,), float("nan"), device=DEV)
    values = torch.full((K, N), float("nan"), device=DEV)
    logp, ent = torch.empty(N, device=DEV), torch.empty(N, device=DEV) if with_entropy else None
    for r0, r1 in ((0, starts[3]), (starts[3], N)):  # starts[3] == starts[4]: sequence 3 is empty
        args = terms.kernel_args(r0, r1)
        assert (args["sequences"] is not None) == terms.whole_sequences
        tb.row_stats_(z[r0:r1], targets[r0:r1], with_entropy, (logp[r0:r1], None if ent is None else ent[r0:r1]),
                      (args, g[r0:r1], g_ent[r0:r1] if terms.has_entropy_grad else None, values[:, r0:r1]))
    want_values, want_g, want_ge = terms.grads(0, N, logp, ent)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-8)
    assert want_g.abs().max() > 0
    if want_ge is not None:
        torch.testing.assert_close(g_ent, want_ge, rtol=1e-6, atol=0)
