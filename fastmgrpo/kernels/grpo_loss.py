"""GRPO-family losses with the LM head fused in: loss and gradients in one forward pass.

The O(N x V) work is ``fused.FusedLinearLoss`` (three matmuls per chunk of rows, gradients
computed in forward). The loss math here is O(N) PyTorch on per-token log-probs, written on a
flat "token view" of the batch (N positions, each with a sequence id) so that the padded
Liger-shaped form and the packed (cu_seqlens) form share one implementation. Each loss is
written twice, side by side: its definition (``_grpo_core`` and the per-token losses, the
reference, differentiated by autograd in the tests) and its closed-form gradient
(``_grpo_grads`` and the ``*_grad`` functions), which the fused pass runs on one chunk of rows at
a time (``_Tokens.rows``), in torch or folded into the Triton row kernel (``_LossTerms``).
Semantics follow ``liger_kernel.chunked_loss.grpo_loss`` (Liger 0.8.5) and TRL's GRPOTrainer.
"""

import bisect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from . import fused
from .dispatch import _validate, check_memory_budget, forward_logprobs, resolve_backend

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_LOG_EPS = math.log(1e-8)


@dataclass(frozen=True)
class GRPOLossConfig:
    """All loss options; defaults equal ``LigerFusedLinearGRPOLoss``'s (plus entropy_coef=0).

    beta: k3 KL weight (0 disables the penalty and the "kl" Liger metric).
    epsilon_low / epsilon_high: ratio clip range [1-eps_low, 1+eps_high]; for cispo
        epsilon_high is the absolute upper bound of the detached weight (e.g. 5.0).
    loss_type: one of LOSS_TYPES. max_completion_length: needed by dr_grpo.
    importance_sampling_level: "token" or "sequence" (GSPO; not with cispo/sapo/vespo).
    sapo_temperature_pos / _neg: SAPO gate temperatures (> 0).
    temperature: logits divisor (> 0). delta: optional upper clamp of the ratio (INTELLECT-2).
    use_bias_correction_kl: multiply the KL by the (unclipped) importance ratio (DeepSeek-V3.2).
    vespo_*: VESPO gamma-weight shape/rate for non-negative / negative advantages.
    entropy_coef: loss -= entropy_coef * entropy (aggregated like the loss); not a Liger option.
    memory_budget: bytes of working memory of the fused pass (one chunk of fp32 logits); the
        result does not depend on it. Sequence-level losses need a whole sequence per chunk.
    fp32_weight_grad: accumulate the LM head's gradient across chunks in an fp32 (V, H) buffer
        (V*H*4 more bytes) instead of in the weight's dtype; see fused.py.
    overlap_streams: on CUDA, run each chunk's logits GEMM on a second stream while the previous
        chunk's row pass and gradient GEMMs run (two buffers of half the budget; overlap.py). Off
        by default until a GPU run shows it pays; no effect without CUDA.
    """

    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    temperature: float = 1.0
    delta: float | None = None
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    memory_budget: int = fused.DEFAULT_MEMORY_BUDGET
    fp32_weight_grad: bool = False
    overlap_streams: bool = False

    def __post_init__(self):
        check_memory_budget(self.memory_budget)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} is not one of "
                f"{list(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        if self.importance_sampling_level == "sequence" and LOSS_VARIANTS[self.loss_type].token_level_only:
            raise ValueError(
                f"importance_sampling_level='sequence' is not supported for loss_type={self.loss_type!r} "
                "(use 'token')"
            )
        for name in ("beta", "epsilon_low", "epsilon_high", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                     "vespo_lambda_neg", "entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        for name in ("beta", "epsilon_low", "epsilon_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and self.delta > 0):
            raise ValueError(f"delta must be None or > 0, got {self.delta!r}")
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0):
            raise ValueError(f"max_completion_length must be a positive int or None, got {mcl!r}")
        if LOSS_VARIANTS[self.loss_type].needs_max_completion_length and mcl is None:
            raise ValueError(f"loss_type={self.loss_type!r} requires max_completion_length")


# --------------------------------------------------------------------------------------------
# Flat token view shared by both public forms
# --------------------------------------------------------------------------------------------


@dataclass
class _Tokens:
    """N positions of B sequences (padding positions allowed, with mask 0)."""

    logp: torch.Tensor | None  # (N,) fp32, differentiable; None until a chunk's rows are taken
    old: torch.Tensor | None  # (N,) fp32, None = on-policy (old = logp.detach())
    ref: torch.Tensor | None  # (N,) fp32
    adv: torch.Tensor  # (N,) fp32 advantage of each position's sequence
    adv_seq: torch.Tensor  # (B,) fp32
    seg: torch.Tensor  # (N,) int64 sequence id
    mask: torch.Tensor  # (N,) fp32, 1 for completion tokens
    seq_len: torch.Tensor  # (B,) fp32 completion tokens per sequence
    vllm: torch.Tensor | None  # (N,) fp32 rollout-mismatch IS ratio per position
    vllm_log_seq: torch.Tensor | None  # (B,) clamped log IS ratio summed per sequence (VESPO)

    def rows(self, r0: int, r1: int, logp: torch.Tensor) -> "_Tokens":
        """The view of positions [r0, r1) with their (r1 - r0,) log-probs; per-sequence fields stay whole."""
        def cut(x):
            return None if x is None else x[r0:r1]

        old = logp.detach() if self.old is None else self.old[r0:r1]
        return _Tokens(logp, old, cut(self.ref), self.adv[r0:r1], self.adv_seq, self.seg[r0:r1], self.mask[r0:r1],
                       self.seq_len, cut(self.vllm), self.vllm_log_seq)


@dataclass
class _Norm:
    """Normalisers of the reductions (global counts make micro-batch losses add up)."""

    tok_w: torch.Tensor  # (N,) weight of each position in masked sums: mask * seq_weight
    luspo_w: torch.Tensor  # (N,) LUSPO length weight (see _reduce_luspo)
    num_sequences: float
    num_tokens: torch.Tensor  # () bnpo normaliser
    dapo_norm: torch.Tensor  # () dapo / cispo / vespo normaliser
    max_completion_length: int | None
    metric_w: torch.Tensor  # (N,) weight of each position in the metrics
    metric_den: torch.Tensor  # () metric normaliser

    def rows(self, r0: int, r1: int) -> "_Norm":
        """The normalisers of positions [r0, r1) (global counts stay global)."""
        return _Norm(self.tok_w[r0:r1], self.luspo_w[r0:r1], self.num_sequences, self.num_tokens, self.dapo_norm,
                     self.max_completion_length, self.metric_w[r0:r1], self.metric_den)


def _segment_sum(x: torch.Tensor, seg: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """(N,) -> (B,) sum per sequence (differentiable, no Python loop)."""
    return x.new_zeros(num_seqs).index_add(0, seg, x)


def _k3(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) (http://joschu.net/blog/kl-approx.html)."""
    d = ref - logp
    return torch.exp(d) - d - 1.0


# ---- per-token losses: (tokens, coef, log_ratio, cfg) -> (loss (N,), is_clipped (N,) bool) ----
# Each is followed by its closed form, (tokens, coef, log_ratio, cfg) -> (loss (N,), ∂loss/∂coef,
# ∂loss/∂logp at fixed coef (None where 0), is_clipped): what the fused pass runs (no autograd),
# tested against autograd on the loss above it. Where autograd's rule is a convention (the
# derivative at a kink), the closed form takes autograd's.


def _clipped_surrogate(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """PPO clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo), with optional delta clamp."""
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    coef_1 = coef if cfg.delta is None else torch.clamp(coef, max=cfg.delta)
    loss = -torch.min(coef_1 * t.adv, torch.clamp(coef, lo, hi) * t.adv)
    clipped = ((coef < lo) & (t.adv < 0)) | ((coef > hi) & (t.adv > 0))
    return loss, clipped


def _clipped_surrogate_grad(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """Closed form of _clipped_surrogate. clamp passes the gradient on its closed range; where
    the min ties (the ratio inside the clip range), each side gets half (torch.minimum)."""
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    adv = t.adv
    coef_1 = coef if cfg.delta is None else torch.clamp(coef, max=cfg.delta)
    a, b = coef_1 * adv, torch.clamp(coef, lo, hi) * adv
    da = adv if cfg.delta is None else torch.where(coef <= cfg.delta, adv, 0.0)
    db = torch.where((coef >= lo) & (coef <= hi), adv, 0.0)
    d_min = torch.where(a < b, da, torch.where(a > b, db, 0.5 * (da + db)))
    clipped = ((coef < lo) & (adv < 0)) | ((coef > hi) & (adv > 0))
    return -torch.minimum(a, b), -d_min, None, clipped


def _cispo(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """CISPO: detached weight min(ratio, epsilon_high) times the log-prob."""
    weight = torch.clamp(coef, max=cfg.epsilon_high).detach()
    return -weight * t.adv * t.logp, (coef > cfg.epsilon_high) & (t.adv > 0)


def _cispo_grad(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """Closed form of _cispo: the weight is detached, so only the log-prob carries a gradient."""
    weight_adv = torch.clamp(coef, max=cfg.epsilon_high) * t.adv
    return -weight_adv * t.logp, None, -weight_adv, (coef > cfg.epsilon_high) & (t.adv > 0)


def _sapo(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """SAPO: smooth sigmoid gate 4/tau * sigmoid(tau * (ratio - 1)) instead of hard clipping."""

    def gate(tau: float) -> torch.Tensor:
        return torch.sigmoid(tau * (coef - 1)) * 4 / tau

    gated = torch.where(t.adv > 0, gate(cfg.sapo_temperature_pos), gate(cfg.sapo_temperature_neg))
    return -gated * t.adv, torch.zeros_like(coef, dtype=torch.bool)


def _sapo_grad(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """Closed form of _sapo: d/dr [4/tau · sigmoid(tau (r − 1))] = 4 · s (1 − s)."""
    tau = torch.full_like(t.adv, cfg.sapo_temperature_neg).masked_fill_(t.adv > 0, cfg.sapo_temperature_pos)
    s = torch.sigmoid(tau * (coef - 1))
    return -s * 4 / tau * t.adv, -4 * s * (1 - s) * t.adv, None, torch.zeros_like(coef, dtype=torch.bool)


@torch.no_grad()
def _vespo_phi(t: _Tokens, log_ratio, cfg: GRPOLossConfig) -> torch.Tensor:
    """VESPO detached gamma weight per sequence, phi(w) = e^lam w^k e^(-lam w): (B,)."""
    num_seqs = t.adv_seq.shape[0]
    log_w = _segment_sum(torch.clamp(log_ratio, -20.0, 20.0) * t.mask, t.seg, num_seqs)  # (B,)
    if t.vllm_log_seq is not None:
        log_w = log_w + t.vllm_log_seq
    log_w = torch.clamp(log_w, _LOG_EPS, 20.0)
    nonneg = t.adv_seq >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """VESPO: -phi(seq ratio) * A * logp; the rollout IS ratio is folded into phi."""
    phi = _vespo_phi(t, log_ratio, cfg)[t.seg]  # (N,)
    return -phi * t.adv * t.logp, torch.zeros_like(coef, dtype=torch.bool)


def _vespo_grad(t: _Tokens, coef, log_ratio, cfg: GRPOLossConfig):
    """Closed form of _vespo: phi is detached (it needs the whole sequence's log-ratios)."""
    phi_adv = _vespo_phi(t, log_ratio, cfg)[t.seg] * t.adv
    return -phi_adv * t.logp, None, -phi_adv, torch.zeros_like(coef, dtype=torch.bool)


# ---- reductions: (per-token values (N,), tokens, norm) -> scalar; each is linear, Σ w·x, and its
# weights w (N,) follow it (what the closed form uses) ----


def _reduce_seq_mean(x, t: _Tokens, n: _Norm):
    """grpo / sapo: mean over each sequence's tokens, summed, / num_sequences."""
    per_seq = _segment_sum(x * n.tok_w, t.seg, t.seq_len.shape[0]) / t.seq_len.clamp(min=1.0)
    return per_seq.sum() / n.num_sequences


def _weights_seq_mean(t: _Tokens, n: _Norm):
    return n.tok_w / (t.seq_len.clamp(min=1.0)[t.seg] * n.num_sequences)


def _reduce_bnpo(x, t: _Tokens, n: _Norm):
    return (x * n.tok_w).sum() / n.num_tokens


def _weights_bnpo(t: _Tokens, n: _Norm):
    return n.tok_w / n.num_tokens


def _reduce_dr_grpo(x, t: _Tokens, n: _Norm):
    return (x * n.tok_w).sum() / (n.num_sequences * n.max_completion_length)


def _weights_dr_grpo(t: _Tokens, n: _Norm):
    return n.tok_w / (n.num_sequences * n.max_completion_length)


def _reduce_dapo(x, t: _Tokens, n: _Norm):
    return (x * n.tok_w).sum() / n.dapo_norm


def _weights_dapo(t: _Tokens, n: _Norm):
    return n.tok_w / n.dapo_norm


def _reduce_luspo(x, t: _Tokens, n: _Norm):
    """luspo: sum_i len_i * (sequence loss) / num_sequences (TRL: (loss * lengths).mean())."""
    return (x * n.luspo_w).sum() / n.num_sequences


def _weights_luspo(t: _Tokens, n: _Norm):
    return n.luspo_w / n.num_sequences


@dataclass(frozen=True)
class LossVariant:
    """Everything that tells one loss_type from another, in one registry entry.

    per_token: (tokens, coef, log_ratio, cfg) -> (loss (N,), is_clipped (N,) bool).
    grad: its closed form (see the per-token losses).
    reduce: (per-token values (N,), tokens, norm) -> () scalar, equal to Σ weights(tokens, norm)·x.
    kernel: the per-token loss's code in the Triton kernels (triton_backend.LOSS_CODES): the row
        kernel's, or the sequence kernel's where a token's gradient needs its whole sequence.
    token_level_only: sequence-level importance sampling is refused (as Liger does).
    whole_sequences: a token's gradient depends on its whole sequence, so a chunk of the fused
        pass must hold whole sequences (also the case for any sequence-level IS).
    folds_is_ratio: the rollout IS ratio enters per_token itself, not as a per-token factor.
    needs_max_completion_length: the reduction divides by max_completion_length.
    """

    per_token: Callable
    grad: Callable
    reduce: Callable
    weights: Callable
    kernel: str | None
    token_level_only: bool = False
    whole_sequences: bool = False
    folds_is_ratio: bool = False
    needs_max_completion_length: bool = False


LOSS_VARIANTS = {
    "grpo": LossVariant(_clipped_surrogate, _clipped_surrogate_grad, _reduce_seq_mean, _weights_seq_mean, "clip"),
    "bnpo": LossVariant(_clipped_surrogate, _clipped_surrogate_grad, _reduce_bnpo, _weights_bnpo, "clip"),
    "dr_grpo": LossVariant(_clipped_surrogate, _clipped_surrogate_grad, _reduce_dr_grpo, _weights_dr_grpo, "clip",
                           needs_max_completion_length=True),
    "dapo": LossVariant(_clipped_surrogate, _clipped_surrogate_grad, _reduce_dapo, _weights_dapo, "clip"),
    "cispo": LossVariant(_cispo, _cispo_grad, _reduce_dapo, _weights_dapo, "cispo", token_level_only=True),
    "sapo": LossVariant(_sapo, _sapo_grad, _reduce_seq_mean, _weights_seq_mean, "sapo", token_level_only=True),
    "luspo": LossVariant(_clipped_surrogate, _clipped_surrogate_grad, _reduce_luspo, _weights_luspo, "clip"),
    "vespo": LossVariant(_vespo, _vespo_grad, _reduce_dapo, _weights_dapo, "vespo", token_level_only=True,
                         whole_sequences=True, folds_is_ratio=True),
}
LOSS_TYPES = tuple(LOSS_VARIANTS)


def _grpo_core(t: _Tokens, n: _Norm, cfg: GRPOLossConfig, entropy: torch.Tensor | None):
    """Loss and metric tensors from the token view. Returns (loss, metrics dict)."""
    log_ratio = t.logp - t.old  # (N,)
    if cfg.importance_sampling_level == "sequence":  # GSPO: masked mean log-ratio per sequence
        seq_lr = _segment_sum(log_ratio * t.mask, t.seg, t.seq_len.shape[0]) / t.seq_len.clamp(min=1.0)
        log_w = seq_lr[t.seg]  # (N,)
    else:
        log_w = log_ratio
    coef = torch.exp(log_w)  # (N,) importance ratio
    variant = LOSS_VARIANTS[cfg.loss_type]
    per_token, clipped = variant.per_token(t, coef, log_ratio, cfg)
    if t.vllm is not None and not variant.folds_is_ratio:
        per_token = per_token * t.vllm
    kl = _k3(t.ref if t.ref is not None else t.logp.detach(), t.logp)  # (N,)
    if cfg.use_bias_correction_kl:
        kl = kl * coef
    if cfg.beta != 0.0:
        per_token = per_token + cfg.beta * kl
    reduce = variant.reduce
    loss = reduce(per_token, t, n)
    if entropy is not None and cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * reduce(entropy, t, n)

    def metric(x):
        return ((x.detach().float() * n.metric_w).sum() / n.metric_den).detach()

    metrics = {"kl": metric(kl), "clip_ratio": metric(clipped), "ratio_mean": metric(coef)}
    if entropy is not None:
        metrics["entropy"] = metric(entropy)
    return loss, metrics


METRIC_NAMES = ("kl", "clip_ratio", "ratio_mean")  # then "entropy" when computed


def _grpo_grads(t: _Tokens, w: torch.Tensor, m: torch.Tensor, cfg: GRPOLossConfig, entropy: torch.Tensor | None):
    """Closed form of _grpo_core (no autograd) on rows whose log-probs are t.logp (R,) fp32.

    w, m: (R,) loss and metric weights of the rows (LossVariant.weights; metric_w: the metric
    sums are divided by metric_den once per call).
    Sequence-level ratios need the rows of whole sequences. Returns (values (K, R): each row's
    term of the loss, then of each metric in METRIC_NAMES (+ entropy), so that sums over rows
    give _grpo_core's; g_logp (R,) = ∂loss/∂logp; g_entropy (R,) = ∂loss/∂entropy or None).
    """
    logp = t.logp
    log_ratio = logp - t.old
    sequence = cfg.importance_sampling_level == "sequence"
    if sequence:  # coef_s = exp(Σ_s mask·log_ratio / len_s): ∂coef_s/∂logp_j = coef_s·mask_j / len_s
        num_seqs = t.seq_len.shape[0]
        inv_len = 1.0 / t.seq_len.clamp(min=1.0)
        log_w = (_segment_sum(log_ratio * t.mask, t.seg, num_seqs) * inv_len)[t.seg]
    else:
        log_w = log_ratio
    coef = torch.exp(log_w)
    variant = LOSS_VARIANTS[cfg.loss_type]
    per_token, d_coef, d_logp, clipped = variant.grad(t, coef, log_ratio, cfg)
    if t.vllm is not None and not variant.folds_is_ratio:
        per_token = per_token * t.vllm
        d_coef = None if d_coef is None else d_coef * t.vllm
        d_logp = None if d_logp is None else d_logp * t.vllm
    zero = torch.zeros_like(logp)
    d_coef = zero if d_coef is None else d_coef
    d_logp = zero if d_logp is None else d_logp
    kl = zero  # k3 against ref = logp.detach() when there is no reference: 0, and so is its gradient
    if t.ref is not None:
        e = torch.exp(t.ref - logp)
        kl, d_kl = e - (t.ref - logp) - 1.0, 1.0 - e
        if cfg.use_bias_correction_kl:  # ∂(kl·coef) = coef·∂kl + kl·∂coef
            if cfg.beta != 0.0:
                d_coef = d_coef + cfg.beta * kl
            d_kl = d_kl * coef
            kl = kl * coef
        if cfg.beta != 0.0:
            per_token = per_token + cfg.beta * kl
            d_logp = d_logp + cfg.beta * d_kl
    w_coef = w * d_coef * coef
    if sequence:
        g = (_segment_sum(w_coef, t.seg, num_seqs) * inv_len)[t.seg] * t.mask + w * d_logp
    else:
        g = w_coef + w * d_logp
    loss = w * per_token
    g_entropy = None
    if entropy is not None and cfg.entropy_coef != 0.0:
        g_entropy = -cfg.entropy_coef * w
        loss = loss + g_entropy * entropy
    values = [loss, m * kl, m * clipped, m * coef] + ([m * entropy] if entropy is not None else [])
    return torch.stack(values), g, g_entropy


@dataclass(frozen=True)
class _LossTerms:
    """One call's loss as the fused pass sees it (fused.Plan.terms): per-row closed-form gradient
    and value terms, in torch (`grads`) or as arguments of the Triton row kernel (`kernel_args`)."""

    tokens: _Tokens
    w: torch.Tensor  # (N,) loss weights
    m: torch.Tensor  # (N,) metric weights (metric_w; sums divided by metric_den once per call)
    cfg: GRPOLossConfig
    with_entropy: bool
    seq_starts: list[int] | None = None  # host row offsets (B+1,): where whole-sequence chunks start
    starts: torch.Tensor | None = None  # the same on the device, int64, for the sequence kernel

    @property
    def names(self) -> tuple[str, ...]:
        return METRIC_NAMES + (("entropy",) if self.with_entropy else ())

    @property
    def whole_sequences(self) -> bool:
        """A token's gradient needs its whole sequence's log-probs (GSPO's ratio, VESPO's phi)."""
        return _needs_whole_sequences(self.cfg)

    @property
    def has_entropy_grad(self) -> bool:
        return self.with_entropy and self.cfg.entropy_coef != 0.0

    def grads(self, r0: int, r1: int, logp, entropy):
        """(values (K, R), g_logp (R,), g_entropy (R,) | None) of rows [r0, r1) (see _grpo_grads)."""
        return _grpo_grads(self.tokens.rows(r0, r1, logp), self.w[r0:r1], self.m[r0:r1], self.cfg, entropy)

    def kernel_args(self, r0: int, r1: int) -> dict | None:
        """Rows [r0, r1)'s inputs and options for the Triton row pass's closed form. Losses that
        need whole sequences (the chunk then holds whole sequences) add "sequences": what the
        sequence kernel reads; None where the sequence offsets are not known."""
        t, c = self.tokens, self.cfg

        def cut(x):
            return None if x is None else x[r0:r1]

        variant = LOSS_VARIANTS[c.loss_type]
        # a loss that folds the rollout IS ratio into itself (VESPO: its summed log) takes no per-token factor
        vllm = None if variant.folds_is_ratio else cut(t.vllm)
        args = dict(loss=variant.kernel, old=cut(t.old), ref=cut(t.ref), adv=t.adv[r0:r1],
                    w=self.w[r0:r1], m=self.m[r0:r1], vllm=vllm, eps_low=c.epsilon_low,
                    eps_high=c.epsilon_high, delta=c.delta, tau_pos=c.sapo_temperature_pos,
                    tau_neg=c.sapo_temperature_neg, beta=c.beta, bias_correction=c.use_bias_correction_kl,
                    entropy_coef=c.entropy_coef if self.has_entropy_grad else 0.0, sequences=None)
        if not self.whole_sequences:
            return args
        if self.starts is None:
            return None
        # the chunk's sequences: those lying in [r0, r1) (an empty one on a boundary in both: no rows)
        s0, s1 = bisect.bisect_left(self.seq_starts, r0), bisect.bisect_right(self.seq_starts, r1) - 1
        vllm_log = t.vllm_log_seq if variant.folds_is_ratio else None
        args["sequences"] = dict(
            starts=self.starts[s0:s1 + 1], row0=r0, mask=t.mask[r0:r1], lengths=t.seq_len[s0:s1],
            adv=t.adv_seq[s0:s1], vllm_log=None if vllm_log is None else vllm_log[s0:s1],
            ratio=c.importance_sampling_level == "sequence",
            vespo=dict(k_pos=c.vespo_k_pos, lam_pos=c.vespo_lambda_pos, k_neg=c.vespo_k_neg,
                       lam_neg=c.vespo_lambda_neg, log_eps=_LOG_EPS))
        return args


def _needs_whole_sequences(cfg: GRPOLossConfig) -> bool:
    """Losses whose per-token gradient depends on the whole sequence (GSPO's ratio, VESPO's phi)."""
    return cfg.importance_sampling_level == "sequence" or LOSS_VARIANTS[cfg.loss_type].whole_sequences


def _fused_grpo(hidden, weight, bias, targets, seq_starts, tokens: _Tokens, norm: _Norm, cfg: GRPOLossConfig,
                want_entropy: bool, backend, names: dict, keep_logprobs: bool = False, check_values: bool = True,
                weight_16bit=None):
    """Loss and metrics of the token view through the fused pass (gradients computed in forward).

    hidden (N, H), targets (N,) int, seq_starts: host list (B+1,) of sequence row offsets.
    Returns (loss () fp32, {metric: () fp32}, plus "logprobs": (N,) fp32 when keep_logprobs).
    """
    _validate(hidden, weight, targets, bias, cfg.temperature, names, check_values)
    if weight_16bit is not None and (weight_16bit.shape != weight.shape or weight_16bit.dtype != hidden.dtype
                                     or weight.dtype != torch.float32):
        raise ValueError(f"weight_16bit must be a {tuple(weight.shape)} {hidden.dtype} copy of an fp32 weight, "
                         f"got {tuple(weight_16bit.shape)} {weight_16bit.dtype} for {weight.dtype}")

    weights = LOSS_VARIANTS[cfg.loss_type].weights(tokens, norm).float()
    starts = None
    if _needs_whole_sequences(cfg):  # one small host-to-device copy per call, for the sequence kernel
        starts = torch.tensor(seq_starts, dtype=torch.int64).to(hidden.device, non_blocking=True)
    terms = _LossTerms(tokens, weights, norm.metric_w.float(), cfg, want_entropy, seq_starts, starts)
    plan = fused.Plan(targets.long(), seq_starts, want_entropy, float(cfg.temperature), terms,
                      resolve_backend(backend, hidden), cfg.memory_budget, cfg.fp32_weight_grad, keep_logprobs,
                      None if weight_16bit is None else weight_16bit.detach(), cfg.overlap_streams)
    loss, metrics, logp = fused.FusedLinearLoss.apply(hidden, weight, bias, plan)
    # Σ x·metric_w / metric_den as the definition divides: a ratio of exactly 1 averages to 1.0
    out = dict(zip(terms.names, (metrics / norm.metric_den).unbind()))
    if keep_logprobs:
        out["logprobs"] = logp
    return loss, out


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_tensor(name, x, shape, floating: bool | None = True):
    """Type/shape check; floating=True needs a float dtype, False an integer one, None any."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if floating is True and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def _check_config(config):
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config must be a GRPOLossConfig, got {type(config).__name__}")


def _positive_count(name, value, default):
    if value is None:
        return float(default)
    if isinstance(value, torch.Tensor):
        value = value.item()  # host sync (a scalar)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Padded (Liger-shaped) form
# --------------------------------------------------------------------------------------------


def _dapo_normalizer(mask: torch.Tensor, num_items_in_batch, process_group) -> torch.Tensor:
    """Liger's DAPO normaliser: num_items_in_batch / world, else the token count summed over
    `process_group` / world (world = its size; 1 and no communication when it is None); >= 1."""
    dist = torch.distributed
    world = 1 if process_group is None else dist.get_world_size(process_group)
    if num_items_in_batch is not None:
        norm = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).float()
        return torch.clamp(norm / world, min=1.0)
    norm = mask.sum()
    if process_group is not None:
        dist.all_reduce(norm, op=dist.ReduceOp.SUM, group=process_group)
    return torch.clamp(norm / world, min=1.0)


def _padded_ref_logps(ids, ref_per_token_logps, ref_input, ref_weight, ref_bias, use_ref_model, config, backend):
    """Reference log-probs (B*T,) or None, following Liger's use_ref_model rules."""
    if not use_ref_model:
        if ref_per_token_logps is not None or ref_input is not None:
            raise ValueError("ref_per_token_logps / ref_input were given but use_ref_model=False")
        return None
    if ref_per_token_logps is None and ref_input is None:
        raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input (with ref_weight)")
    if ref_per_token_logps is not None:
        if ref_input is not None:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
        return ref_per_token_logps.reshape(-1).float()
    if ref_weight is None:
        raise ValueError("ref_input requires ref_weight")
    if config.beta == 0.0:  # the KL is neither in the loss nor in Liger's metrics: skip the pass
        return None
    ref, _ = forward_logprobs(
        ref_input.reshape(ids.shape[0], -1), ref_weight, ids, ref_bias, config.temperature, False, backend,
        {"hidden": "ref_input", "weight": "ref_weight", "targets": "selected_token_ids", "bias": "ref_bias"},
        config.memory_budget,
    )
    return ref


def _padded_vllm(vllm_is_ratio, B, T):
    """(B,), (B, 1) or (B, T) -> per-position (B*T,) ratio and VESPO's summed log ratio (B,)."""
    if vllm_is_ratio is None:
        return None, None
    if not isinstance(vllm_is_ratio, torch.Tensor) or vllm_is_ratio.dim() not in (1, 2):
        raise ValueError("vllm_is_ratio must be a tensor of shape (B,), (B, 1) or (B, T)")
    v = vllm_is_ratio.float()
    v = v[:, None] if v.dim() == 1 else v
    if v.shape[0] != B or v.shape[1] not in (1, T):
        raise ValueError(f"vllm_is_ratio shape must be ({B},), ({B}, 1) or ({B}, {T}), got {tuple(vllm_is_ratio.shape)}")
    log_seq = torch.clamp(torch.log(v), _LOG_EPS, 20.0).sum(-1)  # (B,), all T positions (as Liger)
    return v.expand(B, T).reshape(-1), log_seq


def fused_linear_grpo_loss(
    _input,
    lin_weight,
    selected_token_ids,
    attention_mask,
    advantages,
    bias=None,
    ref_per_token_logps=None,
    old_per_token_logps=None,
    ref_input=None,
    ref_weight=None,
    ref_bias=None,
    vllm_is_ratio=None,
    num_items_in_batch=None,
    *,
    config: GRPOLossConfig,
    use_ref_model: bool = True,
    backend: str | None = None,
    process_group=None,
):
    """Padded GRPO loss with the LM head fused in; same semantics as Liger's GRPO loss.

    Runs the fused primitive once over all B*T rows (padding rows too: Liger's luspo counts them).
    Targets at padding positions may be any id (out-of-range ones are replaced by 0).

    Args:
        _input: (B, T, H) hidden states, row (b, t) predicts selected_token_ids[b, t].
        lin_weight: (V, H) LM head, same dtype as _input. bias: (V,) or None.
        selected_token_ids: (B, T) int token ids. attention_mask: (B, T) 0/1 completion mask.
        advantages: (B,) float.
        ref_per_token_logps / old_per_token_logps: (B, T) float or None (old None = on-policy).
        ref_input / ref_weight / ref_bias: (B, T, H) / (V, H) / (V,) reference hidden states and
            head, used (without grad) when use_ref_model and ref_per_token_logps is None.
        vllm_is_ratio: (B,), (B, 1) or (B, T) rollout/trainer IS ratio, or None.
        num_items_in_batch: global completion-token count (dapo/cispo/vespo normaliser), or None.
        config: GRPOLossConfig. use_ref_model: as Liger's. backend: "torch", "triton" or "auto".
        process_group: a torch.distributed group, or None. dapo/cispo/vespo without
            num_items_in_batch divide by the completion tokens all-reduced over it, over its size
            (the one collective here; Liger does it over the whole world). None: local tokens.

    Returns:
        loss: () fp32 scalar.
        metrics: tuple of detached () fp32 tensors in Liger's order: (kl if beta != 0,
            clip_ratio), then mean entropy when config.entropy_coef != 0 (our addition).
    """
    _check_config(config)
    if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
        raise ValueError("_input must be a (B, T, H) tensor")
    B, T, H = _input.shape
    _check_tensor("selected_token_ids", selected_token_ids, (B, T), floating=False)
    _check_tensor("attention_mask", attention_mask, (B, T), floating=None)
    _check_tensor("advantages", advantages, (B,))
    for name, x in (("ref_per_token_logps", ref_per_token_logps), ("old_per_token_logps", old_per_token_logps)):
        if x is not None:
            _check_tensor(name, x, (B, T))
    if ref_input is not None and use_ref_model and ref_per_token_logps is None:
        _check_tensor("ref_input", ref_input, (B, T, H))
    if not isinstance(lin_weight, torch.Tensor) or lin_weight.dim() != 2:
        raise ValueError("lin_weight must be a (V, H) tensor")
    mask = attention_mask.reshape(-1).float()  # (N,)
    ids = selected_token_ids.reshape(-1).long()  # (N,)
    ids = torch.where(mask > 0, ids, ids.clamp(0, lin_weight.shape[0] - 1))
    vllm, vllm_log_seq = _padded_vllm(vllm_is_ratio, B, T)  # checks first, the costly passes after
    ref = _padded_ref_logps(ids, ref_per_token_logps, ref_input, ref_weight, ref_bias, use_ref_model, config, backend)
    want_entropy = config.entropy_coef != 0.0
    seg = torch.arange(B, device=_input.device).repeat_interleave(T)  # (N,)
    seq_len = mask.view(B, T).sum(-1)  # (B,)
    adv = advantages.float()
    old = None if old_per_token_logps is None else old_per_token_logps.reshape(-1).float()
    tokens = _Tokens(None, old, ref, adv[seg], adv, seg, mask, seq_len, vllm, vllm_log_seq)
    n_tok = mask.sum().clamp(min=1.0)
    norm = _Norm(
        tok_w=mask, luspo_w=seq_len[seg] / T, num_sequences=float(B), num_tokens=n_tok,
        dapo_norm=_dapo_normalizer(mask, num_items_in_batch, process_group), max_completion_length=config.max_completion_length,
        metric_w=mask, metric_den=n_tok,
    )
    loss, m = _fused_grpo(_input.reshape(B * T, H), lin_weight, bias, ids, list(range(0, B * T + 1, T)) if T else
                          [0] * (B + 1), tokens, norm, config, want_entropy, backend,
                          {"hidden": "_input", "weight": "lin_weight", "targets": "selected_token_ids"})
    metrics = ((m["kl"],) if config.beta != 0.0 else ()) + (m["clip_ratio"],)
    return loss, metrics + ((m["entropy"],) if want_entropy else ())


# --------------------------------------------------------------------------------------------
# Packed (cu_seqlens) form
# --------------------------------------------------------------------------------------------


def _packed_segments(cu_seqlens, num_rows: int, num_seqs: int, host=None):
    """Validate cu_seqlens and return (seg (M,) int64, lengths (B,) int64, offsets host list).
    host: the same offsets as a host sequence (else read back: one host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32/int64 tensor")
    if tuple(cu_seqlens.shape) != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens must have shape ({num_seqs + 1},) (B+1 with B=len(advantages)), "
                         f"got {tuple(cu_seqlens.shape)}")
    # the chunk plan needs the offsets on the host
    starts = list(host) if host is not None else cu_seqlens.tolist()
    if starts[0] != 0 or starts[-1] != num_rows or any(b < a for a, b in zip(starts[:-1], starts[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at M={num_rows}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]  # (B,)
    seg = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lengths, output_size=num_rows)
    return seg, lengths, starts


def _packed_vllm(vllm_is_ratio, seg, num_rows: int, num_seqs: int):
    """(B, 1) per-sequence or (M,) per-token ratio -> per-token (M,) and VESPO's log sum (B,)."""
    if vllm_is_ratio is None:
        return None, None
    shape = tuple(vllm_is_ratio.shape) if isinstance(vllm_is_ratio, torch.Tensor) else None
    if shape not in ((num_seqs, 1), (num_rows,)):
        raise ValueError(f"vllm_is_ratio must have shape (B={num_seqs}, 1) or (M={num_rows},), got {shape}")
    v = vllm_is_ratio.float()
    log_v = torch.clamp(torch.log(v), _LOG_EPS, 20.0)
    if v.dim() == 2:  # per sequence
        return v[:, 0][seg], log_v[:, 0]
    return v, _segment_sum(log_v, seg, num_seqs)


def packed_grpo_loss(
    hidden,
    weight,
    targets,
    cu_seqlens,
    advantages,
    old_logprobs=None,
    ref_logprobs=None,
    *,
    config: GRPOLossConfig,
    bias=None,
    seq_weights=None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    vllm_is_ratio=None,
    return_entropy: bool = False,
    return_logprobs: bool = False,
    backend: str | None = None,
    cu_seqlens_host=None,
    check_values: bool = True,
    weight_16bit=None,
):
    """GRPO loss on packed sequences (no padding), LM head fused in.

    Sum the returned losses (and metrics) of micro-batches built with the same global
    num_sequences / num_tokens to get exactly the full-batch loss: grpo/sapo = sum_i mean_t(l) /
    num_sequences; bnpo/dapo/cispo/vespo = sum l / num_tokens; dr_grpo = sum l / (num_sequences *
    max_completion_length); luspo = sum_i len_i * mean_t(l) / num_sequences. No implicit
    all-reduce: for data parallelism pass global counts and scale by world size as needed.

    Args:
        hidden: (M, H) rows of all sequences back to back; row i predicts targets[i].
        weight: (V, H) LM head in hidden's dtype, or the fp32 master weight of 16-bit hidden (d_W
            then accumulates and comes back in fp32). bias: (V,) or None.
        targets: (M,) int token ids in [0, V).
        cu_seqlens: (B+1,) int32 offsets (0, ..., M); empty sequences allowed.
        advantages: (B,) float, one per sequence.
        old_logprobs: (M,) float or None (on-policy: old = logp.detach()).
        ref_logprobs: (M,) float or None (required when config.beta != 0).
        config: GRPOLossConfig.
        seq_weights: (B,) float multiplying each sequence's loss contribution, or None.
        num_sequences / num_tokens: global counts across micro-batches and ranks (default local).
        vllm_is_ratio: (B, 1) per-sequence or (M,) per-token rollout IS ratio, or None.
        return_entropy: also report the mean entropy (always when config.entropy_coef != 0).
        return_logprobs: also return every token's current log-prob (metrics["logprobs"], (M,)
            fp32, detached): the old log-probs of later updates, at no extra cost.
        backend: "torch", "triton" or "auto" (see dispatch.resolve_backend).
        cu_seqlens_host: cu_seqlens as a host list, when the caller has it (saves a host sync).
        check_values: raise on out-of-range targets / non-finite hidden (one host sync); see
            token_logprobs.
        weight_16bit: with an fp32 `weight`, a copy of it in hidden's dtype that the caller keeps
            anyway (e.g. the sampler's decode weights, equal to `weight`): the products use it
            instead of casting `weight` for the call (V*H*2 bytes less at the peak).

    Returns:
        loss: () fp32 scalar.
        metrics: dict of detached () fp32 tensors, each sum over local tokens / num_tokens:
            "kl", "clip_ratio", "ratio_mean" and "entropy" (when computed). Unweighted by seq_weights.
            With return_logprobs, also "logprobs" (M,) fp32.
    """
    _check_config(config)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden must be a (M, H) tensor")
    M = hidden.shape[0]
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        raise ValueError("advantages must be a (B,) tensor")
    B = advantages.shape[0]
    _check_tensor("advantages", advantages, (B,))
    _check_tensor("targets", targets, (M,), floating=False)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            _check_tensor(name, x, (M,))
    if seq_weights is not None:
        _check_tensor("seq_weights", seq_weights, (B,))
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when config.beta != 0")
    seg, lengths, starts = _packed_segments(cu_seqlens, M, B, cu_seqlens_host)
    n_seq = _positive_count("num_sequences", num_sequences, B)
    n_tok = _positive_count("num_tokens", num_tokens, max(M, 1))
    vllm, vllm_log_seq = _packed_vllm(vllm_is_ratio, seg, M, B)
    want_entropy = bool(return_entropy) or config.entropy_coef != 0.0
    adv = advantages.float()
    old = None if old_logprobs is None else old_logprobs.float()
    ref = None if ref_logprobs is None else ref_logprobs.float()
    ones = torch.ones(M, device=hidden.device)
    tokens = _Tokens(None, old, ref, adv[seg], adv, seg, ones, lengths.float(), vllm, vllm_log_seq)
    tok_w = ones if seq_weights is None else seq_weights.float()[seg]
    n_tok_t = ones.new_tensor(n_tok)
    norm = _Norm(
        tok_w=tok_w, luspo_w=tok_w, num_sequences=n_seq, num_tokens=n_tok_t, dapo_norm=n_tok_t,
        max_completion_length=config.max_completion_length, metric_w=ones, metric_den=n_tok_t,
    )
    return _fused_grpo(hidden, weight, bias, targets, starts, tokens, norm, config, want_entropy, backend, {},
                       bool(return_logprobs), check_values, weight_16bit)


# --------------------------------------------------------------------------------------------
# nn.Module drop-in and log-prob helper
# --------------------------------------------------------------------------------------------


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (same constructor,
    forward arguments and ``(loss, metrics)`` return).

    `compiled` is accepted and has no effect: nothing here is torch.compile'd (the loss math is
    O(N) elementwise). `chunk_size` (Liger: sequences per chunk, a memory bound) must be a positive
    int and does not change results: chunks come from `memory_budget` (bytes, extra) instead.
    `backend` (extra) picks the backend. Attributes may be changed after construction as in Liger.
    Like Liger, under an initialised torch.distributed the DAPO-family token normaliser is
    all-reduced over the world group (fused_linear_grpo_loss's `process_group`).
    """

    # Liger's constructor, argument for argument (the drop-in contract): these names and defaults
    # repeat GRPOLossConfig's on purpose; `config` maps them back by name.
    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        backend: str | None = None,
        memory_budget: int = fused.DEFAULT_MEMORY_BUDGET,
    ):
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.backend, self.memory_budget = backend, memory_budget
        self.config  # validate now

    @property
    def config(self) -> GRPOLossConfig:
        """The current attributes as a validated GRPOLossConfig."""
        return GRPOLossConfig(**{f.name: getattr(self, f.name) for f in fields(GRPOLossConfig) if hasattr(self, f.name)})

    # Liger's forward arguments, in Liger's order (the drop-in contract): fused_linear_grpo_loss
    # takes the same list, which is why the two signatures repeat each other.
    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        """See fused_linear_grpo_loss. Returns (loss (), metrics tuple in Liger's order)."""
        return fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
            ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
            vllm_is_ratio, num_items_in_batch,
            config=self.config, use_ref_model=self.use_ref_model, backend=self.backend,
            process_group=_world_group(),
        )


def _world_group():
    """The default process group when torch.distributed is initialised, else None."""
    dist = torch.distributed
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
