"""Readable full-logits references, for tests and as the "eager PyTorch" benchmark peer.

Everything here materialises the (N, V) logits on purpose; use ``fastmgrpo.kernels`` for real work.
"""

import torch


def _full_log_softmax(hidden, weight, bias, temperature):
    """(N, V) log-probabilities; in-place bias/temperature as eager trainers (TRL) do."""
    logits = hidden @ weight.T  # (N, V): the N x V tensor the fused kernels avoid
    if bias is not None:
        logits += bias
    logits /= temperature
    return torch.log_softmax(logits, dim=-1)  # (N, V)


def reference_linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0):
    """Naive log-prob and entropy of `targets`, computed in the inputs' dtype (pass float64 for a gold ref).

    Args:
        hidden: (N, H); weight: (V, H); targets: (N,) int; bias: (V,) or None; temperature: float.

    Returns:
        logp (N,), entropy (N,) in hidden's dtype.
    """
    logprobs = _full_log_softmax(hidden, weight, bias, temperature)  # (N, V)
    logp = logprobs.gather(-1, targets.long()[:, None]).squeeze(-1)  # (N,)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (N,)
    return logp, entropy


def _k3(ref, logp):
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    d = ref - logp
    return torch.exp(d) - d - 1.0


def reference_grpo_loss(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    bias=None,
    ref_logps=None,
    old_logps=None,
    vllm_is_ratio=None,
    num_items_in_batch=None,
    *,
    beta=0.04,
    epsilon_low=0.2,
    epsilon_high=0.2,
    loss_type="dapo",
    max_completion_length=None,
    importance_sampling_level="token",
    temperature=1.0,
    delta=None,
    use_bias_correction_kl=False,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
):
    """Eager padded GRPO loss (TRL/Liger semantics, single process) with full (B, T, V) logits.

    Covers grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo (token / sequence importance sampling);
    vllm_is_ratio is (B, T) or (B, 1). Returns (loss scalar, kl metric, clip_ratio metric).
    """
    B, T, H = hidden.shape
    logprobs = _full_log_softmax(hidden.reshape(B * T, H), weight, bias, temperature)  # (B*T, V)
    logp = logprobs.gather(-1, targets.reshape(-1, 1).long()).float().reshape(B, T)  # (B, T)
    mask = mask.float()
    adv = advantages.float()[:, None]  # (B, 1)
    old = logp.detach() if old_logps is None else old_logps.float()
    ref = logp.detach() if ref_logps is None else ref_logps.float()
    log_ratio = logp - old  # (B, T)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (B, 1)
    coef = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef, max=epsilon_high).detach() * adv * logp
        clipped = (coef > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        gate = lambda t: torch.sigmoid(t * (coef - 1)) * 4 / t  # noqa: E731
        per_token = -torch.where(adv > 0, gate(sapo_temperature_pos), gate(sapo_temperature_neg)) * adv
        clipped = torch.zeros_like(coef, dtype=torch.bool)
    else:
        lo, hi = 1 - epsilon_low, 1 + epsilon_high
        c1 = coef if delta is None else coef.clamp(max=delta)
        per_token = -torch.min(c1 * adv, coef.clamp(lo, hi) * adv)
        clipped = ((coef < lo) & (adv < 0)) | ((coef > hi) & (adv > 0))
    if vllm_is_ratio is not None:
        per_token = per_token * vllm_is_ratio.float()
    kl = _k3(ref, logp)
    if use_bias_correction_kl:
        kl = kl * coef
    if beta != 0.0:
        per_token = per_token + beta * kl
    per_token = per_token.expand(B, T) if per_token.shape[1] == 1 else per_token
    n_tok = mask.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / B
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / n_tok
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (B * max_completion_length)
    elif loss_type in ("dapo", "cispo"):
        norm = n_tok if num_items_in_batch is None else torch.tensor(float(num_items_in_batch)).clamp(min=1.0)
        loss = (per_token * mask).sum() / norm
    elif loss_type == "luspo":  # TRL: (per_token_loss * lengths).mean(), padding positions included
        loss = (per_token * mask.sum(-1, keepdim=True)).mean()
    else:
        raise ValueError(f"reference_grpo_loss: unsupported loss_type {loss_type!r}")
    kl_metric = (kl.expand(B, T) * mask).sum() / n_tok
    clip_metric = (clipped.expand(B, T) * mask).sum() / n_tok
    return loss, kl_metric, clip_metric
