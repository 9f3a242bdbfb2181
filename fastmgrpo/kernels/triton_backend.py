"""Triton backend: the forward-only fused log-prob kernel and the row pass of the fused loss.

Forward-only (``linear_logprob_fwd``, for old/ref/rollout log-probs under no_grad): one matmul
with the log-sum-exp fused in, never holding the N×V logits. A flattened 1-D grid over
(splits × m_blocks): program (s, m) walks the vocabulary range of split s in BLOCK_V steps (each
a K loop over H) and keeps, per row, an online running max m, s = Σ exp(z − m) and
t = Σ exp(z − m)·(z − m) (the shifted form keeps the entropy free of the lse − Σpz
cancellation), plus the target logit. The (SPLITS, N) partials merge in O(N·SPLITS) torch ops.

Row pass of the fused loss (``row_stats_`` / ``dlogits_``, same contract as
``torch_backend``): on a chunk z (R, V) of fp32 h·Wᵀ + b written by cuBLAS, one program per row
  1. reads z once, times 1/T as it loads it: max, log-sum-exp, target log-prob, entropy (online,
     fp32), and the per-token loss gradient g in closed form (``_loss_terms``; losses whose
     tokens need their whole sequence, GSPO and VESPO, take it from ``_sequence_terms_kernel``,
     one program per sequence, launched between the two row kernels);
  2. reads z again (times 1/T) and writes dlogits = (g·(onehot − p) − g_H·p·(z − lse + H)) / T
     in the products' dtype *into z's own storage*: a 16-bit row r lands in the first half of fp32 row
     r's bytes, so the result is a (R, V) view with row stride 2V that cuBLAS reads directly.
     Block j's 16-bit store covers fp32 elements [j·B/2, (j+1)·B/2) of the row; a barrier
     between each block's loads and its store makes them all read by then, across warps too
     (the argument is written beside ``_dlogits_kernel``).

Under TRITON_INTERPRET=1 (CPU tests) 16-bit dots are done on fp32-upcast operands and the row
reductions go through tl.reduce directly (see _mma, _rsum). Grids are 1-D (axis 0 allows
2^31 − 1 programs), so there is no cap on sequence length; pointer offsets are int64.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .torch_backend import RowStats

__all__ = ["TritonOptions", "linear_logprob_fwd", "row_stats_", "sequence_terms_", "dlogits_", "extra_bytes_per_row"]


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """Tuning knobs of the forward-only kernel; None picks the default for the device.

    splits: vocabulary splits (parallelism for short sequences); block_*: tile sizes.
    """
    splits: int | None = None
    block_m: int | None = None
    block_v: int | None = None
    block_k: int | None = None


DEFAULT_OPTIONS = TritonOptions()


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (decided at import)."""
    return _INTERPRETED


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _rsum(x, axis: tl.constexpr, INTERP: tl.constexpr):
    """tl.sum; under the interpreter, tl.reduce with the standard combine function directly:
    tl.sum itself is a @jit function that only runs interpreted if TRITON_INTERPRET was set
    before triton was first imported in the process, this form works either way."""
    if INTERP:
        return tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        return tl.sum(x, axis)


@triton.jit
def _rmax(x, axis: tl.constexpr, INTERP: tl.constexpr):
    """tl.max (see _rsum)."""
    if INTERP:
        return tl.reduce(x, axis, tl.standard._elementwise_max)
    else:
        return tl.max(x, axis)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter only) multiplies 16-bit operands in
    fp32: exact products, the same result as the tensor-core path up to summation order
    (the interpreter's numpy matmul reads bf16 as raw uint16 otherwise)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, H, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z tile (BLOCK_M, BLOCK_V) = (h[offs_m]·W[offs_v]ᵀ + b[offs_v]) · inv_temp in fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * H  # (BLOCK_M, 1) row pointers
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * H  # (BLOCK_V, 1) row pointers
    acc = tl.full((BLOCK_M, BLOCK_V), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        h = tl.load(h_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_temp


@triton.jit
def _linear_logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,          # (N, H), (V, H), (V,), (N,) int64
    m_out, s_out, t_out, zt_out,           # (SPLITS, N) fp32 partials
    N, V, H, inv_temp, m_blocks, blocks_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    # split-major order: programs running at the same time stream the same rows of W
    pid_s = pid // m_blocks
    pid_m = pid % m_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    tgt = tl.load(tgt_ptr + offs_m, mask=mask_m, other=-1)

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: keeps (m_old − m_new)·s = 0
    s_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    t_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    zt_i = tl.full((BLOCK_M,), 0.0, tl.float32)

    v_lo = pid_s * blocks_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, H, inv_temp,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, _rmax(z, 1, INTERP))
        alpha = tl.exp(m_i - m_new)
        zs = z - m_new[:, None]                                # (BLOCK_M, BLOCK_V), ≤ 0
        p = tl.exp(zs)                                         # 0 on masked columns
        if WITH_ENTROPY:
            pz = p * tl.where(mask_v[None, :], zs, 0.0)        # no 0·(−inf) on masked columns
            t_i = alpha * (t_i + (m_i - m_new) * s_i) + _rsum(pz, 1, INTERP)
        s_i = alpha * s_i + _rsum(p, 1, INTERP)
        m_i = m_new
        hit = offs_v[None, :] == tgt[:, None]
        zt_i += _rsum(tl.where(hit, z, 0.0), 1, INTERP)

    out = pid_s.to(tl.int64) * N + offs_m
    tl.store(m_out + out, m_i, mask=mask_m)
    tl.store(s_out + out, s_i, mask=mask_m)
    tl.store(zt_out + out, zt_i, mask=mask_m)
    if WITH_ENTROPY:
        tl.store(t_out + out, t_i, mask=mask_m)


_INTERPRETED = type(_linear_logprob_fwd_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------
# Launchers: reshape, allocate, choose grid / blocks / warps
# --------------------------------------------------------------------------------------
def _config(dtype: torch.dtype, device: torch.device, opts: TritonOptions):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) for this device and dtype."""
    if device.type != "cuda" or interpreting():
        bm, bv, bk, warps, stages = 16, 32, 32, 4, 1
    elif dtype == torch.float32:
        bm, bv, bk, warps, stages = 64, 64, 32, 8, 2    # ieee fp32 dot (no tensor cores)
    else:
        # Hopper bf16/fp16: sm_90 AOT compile (H % 16 == 0) gives 182 (fwd), 202 (gemm bwd),
        # 255 (atomic bwd) registers/thread, no spills, 96-160 KB smem
        bm, bv, bk, warps, stages = 128, 128, 64, 8, 3
    return (opts.block_m or bm, opts.block_v or bv, opts.block_k or bk, warps, stages)


def _dot_args(dtype: torch.dtype) -> dict:
    """DOT_PRECISION ("ieee" keeps fp32 inputs exact; ignored for 16-bit) and UPCAST."""
    upcast = interpreting() and dtype != torch.float32
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32",
                UPCAST=upcast, INTERP=interpreting())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_logprob_fwd(hidden, weight, bias, targets, temperature, with_entropy,
                       opts: TritonOptions = DEFAULT_OPTIONS):
    """Log-probs of targets without gradients: contiguous hidden (N, H), weight (V, H), bias
    (V,) or None, targets (N,) int64. Returns (logp (N,) fp32, entropy (N,) fp32 or None)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        empty = hidden.new_empty((0,), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    bm, bv, bk, warps, stages = _config(hidden.dtype, hidden.device, opts)
    m_blocks = triton.cdiv(N, bm)
    v_blocks = triton.cdiv(V, bv)
    # enough programs to fill the GPU ~8 times over (short tail), never an empty split
    splits = opts.splits or max(1, min(v_blocks, triton.cdiv(8 * _num_sms(hidden.device), m_blocks)))
    blocks_per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, blocks_per_split)
    part = torch.empty((4, splits, N), device=hidden.device, dtype=torch.float32)
    m_p, s_p, t_p, zt_p = part.unbind(0)                        # each (SPLITS, N)
    grid = (m_blocks * splits,)
    _linear_logprob_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        m_p, s_p, t_p, zt_p,
        N, V, H, 1.0 / temperature, m_blocks, blocks_per_split,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **_dot_args(hidden.dtype),
        num_warps=warps, num_stages=stages,
    )
    # merge the split partials: O(N·SPLITS)
    m = m_p.amax(0)                                             # (N,)
    scale = torch.exp(m_p - m)                                  # (SPLITS, N)
    s = (s_p * scale).sum(0)                                    # (N,)
    lse = m + torch.log(s)
    logp = zt_p.sum(0) - lse
    if with_entropy:
        t = (scale * (t_p + (m_p - m) * s_p)).sum(0)            # Σ exp(z − m)·(z − m)
        return logp, torch.log(s) - t / s
    return logp, None


# --------------------------------------------------------------------------------------
# Row pass of the fused loss
# --------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(z_ptr, z_stride, tgt_ptr, lse_ptr, logp_ptr, ent_ptr, V, inv_temp,
                      old_ptr, ref_ptr, adv_ptr, w_ptr, m_ptr, vllm_ptr, g_ptr, ge_ptr, val_ptr, val_stride,
                      eps_low, eps_high, delta, tau_pos, tau_neg, beta, entropy_coef,
                      WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, INTERP: tl.constexpr,
                      FOLD: tl.constexpr, LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                      HAS_VLLM: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BETA: tl.constexpr,
                      BIAS_CORRECTION: tl.constexpr, HAS_GENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * z_stride
    offs = tl.arange(0, BLOCK_V)
    m_i = tl.full((BLOCK_V,), -1.0e30, tl.float32)  # per-lane online stats, merged at the end
    s_i = tl.full((BLOCK_V,), 0.0, tl.float32)
    t_i = tl.full((BLOCK_V,), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + offs < V
        z = tl.load(base + v0 + offs, mask=mask, other=-float("inf")) * inv_temp
        m_new = tl.maximum(m_i, z)
        alpha = tl.exp(m_i - m_new)
        zs = tl.where(mask, z - m_new, 0.0)
        p = tl.where(mask, tl.exp(zs), 0.0)
        if WITH_ENTROPY:
            t_i = alpha * (t_i + (m_i - m_new) * s_i) + p * zs
        s_i = alpha * s_i + p
        m_i = m_new
    m = _rmax(m_i, 0, INTERP)
    scale = tl.exp(m_i - m)
    s = _rsum(s_i * scale, 0, INTERP)
    lse = m + tl.log(s)
    logp = tl.load(base + tl.load(tgt_ptr + row)) * inv_temp - lse
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    entropy = 0.0
    if WITH_ENTROPY:
        t = _rsum(scale * (t_i + (m_i - m) * s_i), 0, INTERP)  # Σ exp(z − m)·(z − m)
        entropy = tl.log(s) - t / s
        tl.store(ent_ptr + row, entropy)
    if FOLD:
        _loss_terms(row, logp, entropy, old_ptr, ref_ptr, adv_ptr, w_ptr, m_ptr, vllm_ptr, g_ptr, ge_ptr,
                    val_ptr, val_stride, eps_low, eps_high, delta, tau_pos, tau_neg, beta, entropy_coef,
                    WITH_ENTROPY, LOSS, HAS_OLD, HAS_REF, HAS_VLLM, HAS_DELTA, HAS_BETA, BIAS_CORRECTION, HAS_GENT)


@triton.jit
def _token_terms(logp, coef, adv, phi, ref, vllm, eps_low, eps_high, delta, tau_pos, tau_neg, beta,
                 LOSS: tl.constexpr, HAS_REF: tl.constexpr, HAS_VLLM: tl.constexpr, HAS_DELTA: tl.constexpr,
                 HAS_BETA: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """The per-token part of grpo_loss._grpo_grads, on a scalar (one row) or a block of tokens:
    (loss term, ∂/∂coef, ∂/∂logp at fixed coef, clipped (0/1), kl). coef: the importance ratio
    (the token's, or GSPO's sequence ratio); phi: VESPO's sequence weight (LOSS 3 only); ref and
    vllm are read only when HAS_REF / HAS_VLLM."""
    zero = 0.0 * logp
    d_logp = zero
    clipped = zero
    if LOSS == 0:  # clipped surrogate; at a tie of the min each side gets half (torch.minimum)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        coef_1 = coef
        da = adv + zero
        if HAS_DELTA:
            coef_1 = tl.minimum(coef, delta)
            da = tl.where(coef <= delta, adv, 0.0)
        a = coef_1 * adv
        b = tl.minimum(tl.maximum(coef, lo), hi) * adv
        db = tl.where((coef >= lo) & (coef <= hi), adv, 0.0)
        per_token = -tl.minimum(a, b)
        d_coef = -tl.where(a < b, da, tl.where(a > b, db, 0.5 * (da + db)))
        clipped = tl.where(((coef < lo) & (adv < 0)) | ((coef > hi) & (adv > 0)), 1.0, 0.0)
    elif LOSS == 1:  # cispo: detached min(ratio, eps_high) times the log-prob
        weight_adv = tl.minimum(coef, eps_high) * adv
        per_token = -weight_adv * logp
        d_coef = zero
        d_logp = -weight_adv
        clipped = tl.where((coef > eps_high) & (adv > 0), 1.0, 0.0)
    elif LOSS == 2:  # sapo: 4/tau · sigmoid(tau (ratio − 1))
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        sg = 1.0 / (1.0 + tl.exp(tau * (1.0 - coef)))  # sigmoid (tl.sigmoid is a @jit: see _rsum)
        per_token = -sg * 4.0 / tau * adv
        d_coef = -4.0 * sg * (1.0 - sg) * adv
    else:  # vespo: the detached sequence weight phi times A·logp (the rollout IS ratio is in phi)
        per_token = -phi * adv * logp
        d_coef = zero
        d_logp = -phi * adv
    if HAS_VLLM:
        per_token = per_token * vllm
        d_coef = d_coef * vllm
        d_logp = d_logp * vllm
    kl = zero
    if HAS_REF:
        x = ref - logp
        e = tl.exp(x)
        kl = e - x - 1.0
        d_kl = 1.0 - e
        if BIAS_CORRECTION:
            if HAS_BETA:
                d_coef = d_coef + beta * kl
            d_kl = d_kl * coef
            kl = kl * coef
        if HAS_BETA:
            per_token = per_token + beta * kl
            d_logp = d_logp + beta * d_kl
    return per_token, d_coef, d_logp, clipped, kl


@triton.jit
def _store_terms(idx, valid, g, per_token, w, mw, kl, clipped, coef, entropy, g_ptr, ge_ptr, val_ptr, val_stride,
                 entropy_coef, WITH_ENTROPY: tl.constexpr, HAS_GENT: tl.constexpr):
    """Store g = ∂loss/∂logp, ∂loss/∂entropy and the loss / kl / clipped / ratio (/ entropy) terms
    of tokens idx (columns of the (K, N) values) where `valid` (None: all)."""
    tl.store(g_ptr + idx, g, mask=valid)
    loss = w * per_token
    if HAS_GENT:
        ge = -entropy_coef * w
        tl.store(ge_ptr + idx, ge, mask=valid)
        loss = loss + ge * entropy
    tl.store(val_ptr + idx, loss, mask=valid)
    tl.store(val_ptr + val_stride + idx, mw * kl, mask=valid)
    tl.store(val_ptr + 2 * val_stride + idx, mw * clipped, mask=valid)
    tl.store(val_ptr + 3 * val_stride + idx, mw * coef, mask=valid)
    if WITH_ENTROPY:
        tl.store(val_ptr + 4 * val_stride + idx, mw * entropy, mask=valid)


@triton.jit
def _loss_terms(row, logp, entropy, old_ptr, ref_ptr, adv_ptr, w_ptr, m_ptr, vllm_ptr, g_ptr, ge_ptr,
                val_ptr, val_stride, eps_low, eps_high, delta, tau_pos, tau_neg, beta, entropy_coef,
                WITH_ENTROPY: tl.constexpr, LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                HAS_VLLM: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BETA: tl.constexpr,
                BIAS_CORRECTION: tl.constexpr, HAS_GENT: tl.constexpr):
    """One token's closed-form loss gradient and terms, token-level importance sampling
    (grpo_loss._grpo_grads is the reference; both are tested against autograd)."""
    coef = 1.0 + 0.0 * logp  # on-policy (no old log-probs): the ratio is exactly 1
    if HAS_OLD:
        coef = tl.exp(logp - tl.load(old_ptr + row))
    ref = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + row)
    vllm = 1.0
    if HAS_VLLM:
        vllm = tl.load(vllm_ptr + row)
    w = tl.load(w_ptr + row)
    per_token, d_coef, d_logp, clipped, kl = _token_terms(
        logp, coef, tl.load(adv_ptr + row), 0.0, ref, vllm, eps_low, eps_high, delta, tau_pos, tau_neg, beta,
        LOSS, HAS_REF, HAS_VLLM, HAS_DELTA, HAS_BETA, BIAS_CORRECTION)
    _store_terms(row, None, w * d_coef * coef + w * d_logp, per_token, w, tl.load(m_ptr + row), kl, clipped, coef,
                 entropy, g_ptr, ge_ptr, val_ptr, val_stride, entropy_coef, WITH_ENTROPY, HAS_GENT)


@triton.jit
def _block_terms(rows, valid, seq_log_ratio, phi, logp_ptr, old_ptr, ref_ptr, adv_ptr, vllm_ptr, eps_low,
                 eps_high, delta, tau_pos, tau_neg, beta, LOSS: tl.constexpr, SEQ_RATIO: tl.constexpr,
                 HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_VLLM: tl.constexpr, HAS_DELTA: tl.constexpr,
                 HAS_BETA: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    """_token_terms of a block of one sequence's tokens: (logp, coef, per_token, d_coef, d_logp,
    clipped, kl), 0 where not valid."""
    logp = tl.load(logp_ptr + rows, mask=valid, other=0.0)
    if SEQ_RATIO:  # GSPO: every token takes its sequence's ratio
        coef = tl.exp(seq_log_ratio + 0.0 * logp)
    else:
        coef = 1.0 + 0.0 * logp
        if HAS_OLD:
            coef = tl.exp(logp - tl.load(old_ptr + rows, mask=valid, other=0.0))
    ref = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=valid, other=0.0)
    vllm = 1.0
    if HAS_VLLM:
        vllm = tl.load(vllm_ptr + rows, mask=valid, other=1.0)
    adv = tl.load(adv_ptr + rows, mask=valid, other=0.0)
    per_token, d_coef, d_logp, clipped, kl = _token_terms(
        logp, coef, adv, phi, ref, vllm, eps_low, eps_high, delta, tau_pos, tau_neg, beta,
        LOSS, HAS_REF, HAS_VLLM, HAS_DELTA, HAS_BETA, BIAS_CORRECTION)
    return logp, coef, per_token, d_coef, d_logp, clipped, kl


@triton.jit
def _sequence_terms_kernel(starts_ptr, row0, logp_ptr, ent_ptr, old_ptr, ref_ptr, adv_ptr, tmask_ptr, w_ptr, m_ptr,
                           vllm_ptr, len_ptr, adv_seq_ptr, vlog_ptr, g_ptr, ge_ptr, val_ptr, val_stride,
                           eps_low, eps_high, delta, tau_pos, tau_neg, beta, entropy_coef,
                           k_pos, lam_pos, k_neg, lam_neg, log_eps,
                           WITH_ENTROPY: tl.constexpr, LOSS: tl.constexpr, SEQ_RATIO: tl.constexpr,
                           HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_VLLM: tl.constexpr,
                           HAS_VLOG: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BETA: tl.constexpr,
                           BIAS_CORRECTION: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr,
                           INTERP: tl.constexpr):
    """Closed-form gradient and terms of losses whose tokens need their whole sequence (GSPO's
    sequence ratio, VESPO's phi): one program per sequence of the chunk, over its tokens in
    blocks: (1) the masked sum of log-ratios; (2, GSPO) Σ w·∂loss/∂coef·coef, which reaches every
    token of the sequence through the shared ratio; (3) each token's g and terms. Token arrays are
    the chunk's (rows from 0), sequence arrays start at the chunk's first sequence."""
    s = tl.program_id(0)
    a = tl.load(starts_ptr + s) - row0
    b = tl.load(starts_ptr + s + 1) - row0
    offs = tl.arange(0, BLOCK)
    inv_len = 1.0 / tl.maximum(tl.load(len_ptr + s), 1.0)
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for r in range(a, b, BLOCK):
        rows = r + offs
        valid = rows < b
        log_ratio = 0.0 * offs
        if HAS_OLD:
            log_ratio = tl.load(logp_ptr + rows, mask=valid, other=0.0) - tl.load(old_ptr + rows, mask=valid, other=0.0)
        if LOSS == 3:
            log_ratio = tl.minimum(tl.maximum(log_ratio, -20.0), 20.0)
        acc += log_ratio * tl.load(tmask_ptr + rows, mask=valid, other=0.0)
    total = _rsum(acc, 0, INTERP)
    phi = 0.0
    if LOSS == 3:  # phi(w) = e^lam w^k e^(-lam w) of the clamped sequence ratio; 0 where not finite
        log_w = total
        if HAS_VLOG:
            log_w = log_w + tl.load(vlog_ptr + s)
        log_w = tl.minimum(tl.maximum(log_w, log_eps), 20.0)
        nonneg = tl.load(adv_seq_ptr + s) >= 0
        k = tl.where(nonneg, k_pos, k_neg)
        lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4)
        phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
        phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)
    seq_log_ratio = total * inv_len
    shared = 0.0
    if SEQ_RATIO:
        acc = tl.full((BLOCK,), 0.0, tl.float32)
        for r in range(a, b, BLOCK):
            rows = r + offs
            valid = rows < b
            _, coef, _, d_coef, _, _, _ = _block_terms(
                rows, valid, seq_log_ratio, phi, logp_ptr, old_ptr, ref_ptr, adv_ptr, vllm_ptr, eps_low, eps_high,
                delta, tau_pos, tau_neg, beta, LOSS, SEQ_RATIO, HAS_OLD, HAS_REF, HAS_VLLM, HAS_DELTA, HAS_BETA,
                BIAS_CORRECTION)
            acc += tl.load(w_ptr + rows, mask=valid, other=0.0) * d_coef * coef
        shared = _rsum(acc, 0, INTERP) * inv_len
    for r in range(a, b, BLOCK):
        rows = r + offs
        valid = rows < b
        _, coef, per_token, d_coef, d_logp, clipped, kl = _block_terms(
            rows, valid, seq_log_ratio, phi, logp_ptr, old_ptr, ref_ptr, adv_ptr, vllm_ptr, eps_low, eps_high,
            delta, tau_pos, tau_neg, beta, LOSS, SEQ_RATIO, HAS_OLD, HAS_REF, HAS_VLLM, HAS_DELTA, HAS_BETA,
            BIAS_CORRECTION)
        w = tl.load(w_ptr + rows, mask=valid, other=0.0)
        if SEQ_RATIO:
            g = shared * tl.load(tmask_ptr + rows, mask=valid, other=0.0) + w * d_logp
        else:
            g = w * d_coef * coef + w * d_logp
        entropy = 0.0
        if WITH_ENTROPY:
            entropy = tl.load(ent_ptr + rows, mask=valid, other=0.0)
        _store_terms(rows, valid, g, per_token, w, tl.load(m_ptr + rows, mask=valid, other=0.0), kl, clipped, coef,
                     entropy, g_ptr, ge_ptr, val_ptr, val_stride, entropy_coef, WITH_ENTROPY, HAS_GENT)


# Why the in-place write is safe (16-bit output into the fp32 row it reads). Iteration j of a row
# program loads fp32 elements [j·B, (j+1)·B) and stores 16-bit elements [j·B, (j+1)·B), i.e. the
# bytes of fp32 elements [j·B/2, (j+1)·B/2) ⊂ [0, (j+1)·B): every byte a store clobbers belongs
# to a block loaded in this iteration or an earlier one, never a later one. The warps of a
# program run unsynchronised, though: without a barrier, warp w may store block j's dz while
# warp ⌊w/2⌋ has not loaded its part of block j (or even of block j − 1) yet. So each iteration
# loads its whole block, then `tl.debug_barrier()` (bar.sync: every thread of the program has
# performed all its earlier memory accesses, CTA-wide), then stores. By induction over j, when
# block j's store runs, every load of iterations 0..j has been performed by every warp, so no
# load can see a clobbered byte. Software pipelining can only move loads earlier (never a store
# before the barrier), which keeps the argument. Rows are disjoint across programs (row stride
# ≥ V fp32 elements). The fp32 output (same thread, same element) needs no barrier but keeps it.
@triton.jit
def _dlogits_kernel(z_ptr, z_stride, tgt_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,
                    V, inv_temp, OUT_DTYPE: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    # one pointer for both (a second, aliasing argument would be copied apart by the interpreter)
    out_row = z_row.to(tl.pointer_type(OUT_DTYPE), bitcast=True)
    lse = tl.load(lse_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    g = tl.load(g_ptr + row) * inv_temp
    if HAS_GENT:
        ge = tl.load(ge_ptr + row) * inv_temp
        shift = tl.load(ent_ptr + row) - lse  # log p + H = z − lse + H
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0) * inv_temp  # the logits (h·Wᵀ + b) / T
        p = tl.exp(z - lse)
        coef = g
        if HAS_GENT:
            coef = g + ge * (z + shift)
        dz = tl.where(cols == tgt, g, 0.0) - coef * p
        tl.debug_barrier()  # every warp's loads of blocks 0..j precede any store of block j (above)
        tl.store(out_row + cols, dz.to(OUT_DTYPE), mask=mask)


_ROW_BLOCK = 1024  # vocabulary entries per step of a row program
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def extra_bytes_per_row(vocab: int, dtype: torch.dtype) -> int:
    """dlogits are written into the logits' own storage: nothing beyond the fp32 logits."""
    return 0


LOSS_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}  # the per-token losses _token_terms knows
FOLDS_LOSS = True  # row_stats_ computes the loss's closed-form gradient (token-level losses)


def row_stats_(z: torch.Tensor, targets: torch.Tensor, with_entropy: bool, out=None, fold=None,
               inv_t: float = 1.0) -> RowStats:
    """Per-row log-prob of targets (R,) int64 (and entropy) from fp32 logits z·inv_t, z (R, V)
    (scaled as it is loaded: no pass of its own); z is kept.

    out: (logp (R,), entropy (R,) or None) fp32 to write them into (else new tensors).
    fold: None, or (args, g (R,), g_entropy (R,) or None, values (K, R) with unit column stride):
    the same launch also computes each row's closed-form loss gradient and terms
    (grpo_loss._LossTerms.kernel_args gives `args`); for losses that need whole sequences
    (`args["sequences"]`), a second launch after it, one program per sequence."""
    R, V = z.shape
    logp_out, ent_out = out if out is not None else (None, None)
    lse = torch.empty(R, device=z.device, dtype=torch.float32)
    logp = torch.empty_like(lse) if logp_out is None else logp_out
    entropy = (torch.empty_like(lse) if ent_out is None else ent_out) if with_entropy else None
    if R:
        dummy = torch.empty(1, device=z.device, dtype=torch.float32)
        per_sequence = fold is not None and fold[0].get("sequences") is not None
        _row_stats_kernel[(R,)](z, z.stride(0), targets, lse, logp, entropy if with_entropy else dummy, V, inv_t,
                                **_fold_args(None if per_sequence else fold, dummy),
                                FOLD=fold is not None and not per_sequence, WITH_ENTROPY=with_entropy,
                                BLOCK_V=_ROW_BLOCK, INTERP=interpreting(), num_warps=8)
        if per_sequence:
            sequence_terms_(fold, logp, entropy)
    return RowStats(logp, entropy, lse)


def sequence_terms_(fold, logp: torch.Tensor, entropy: torch.Tensor | None) -> None:
    """The closed form of losses whose tokens need their whole sequence, on R rows of S whole
    sequences whose log-probs logp (R,) (and entropy) are known: one launch of
    _sequence_terms_kernel, one program per sequence. fold: as row_stats_'s, with
    fold[0]["sequences"]: starts (S+1,) int64 row offsets on the device, row0 (the rows' first
    row), mask (R,) fp32 completion-token mask, lengths / adv / vllm_log (S,) fp32 (vllm_log may
    be None), ratio (GSPO's sequence ratio) and the VESPO constants."""
    seq = fold[0]["sequences"]
    num_seqs = seq["starts"].shape[0] - 1
    if num_seqs:
        dummy = torch.empty(1, device=logp.device, dtype=torch.float32)
        _sequence_terms_kernel[(num_seqs,)](
            seq["starts"], seq["row0"], logp, dummy if entropy is None else entropy, tmask_ptr=seq["mask"],
            len_ptr=seq["lengths"], adv_seq_ptr=seq["adv"], vlog_ptr=dummy if seq["vllm_log"] is None else seq["vllm_log"],
            **{k: float(v) for k, v in seq["vespo"].items()}, SEQ_RATIO=bool(seq["ratio"]),
            HAS_VLOG=seq["vllm_log"] is not None, WITH_ENTROPY=entropy is not None, BLOCK=_SEQUENCE_BLOCK,
            INTERP=interpreting(), num_warps=4, **_fold_args(fold, dummy))


_SEQUENCE_BLOCK = 256  # tokens per step of a sequence program


_NO_FOLD = dict(loss="clip", old=None, ref=None, adv=None, w=None, m=None, vllm=None, delta=None, beta=0.0,
                bias_correction=False, entropy_coef=0.0, eps_low=0.0, eps_high=0.0, tau_pos=1.0, tau_neg=1.0)


def _fold_args(fold, dummy: torch.Tensor) -> dict:
    """The closed-form arguments shared by _row_stats_kernel (with FOLD) and
    _sequence_terms_kernel; absent inputs point at `dummy` (never read or written: distinct from
    every output, which the interpreter copies back one by one)."""
    a, g, ge, values = fold if fold is not None else (_NO_FOLD, dummy, None, dummy[None])
    assert values.stride(1) == 1
    pointers = {f"{k}_ptr": dummy if a[k] is None else a[k] for k in ("old", "ref", "adv", "w", "m", "vllm")}
    return dict(**pointers, g_ptr=g, ge_ptr=dummy if ge is None else ge, val_ptr=values,
                val_stride=values.stride(0), eps_low=float(a["eps_low"]), eps_high=float(a["eps_high"]),
                delta=float(a["delta"] or 0.0), tau_pos=float(a["tau_pos"]), tau_neg=float(a["tau_neg"]),
                beta=float(a["beta"]), entropy_coef=float(a["entropy_coef"]),
                LOSS=LOSS_CODES[a["loss"]], HAS_OLD=a["old"] is not None, HAS_REF=a["ref"] is not None,
                HAS_VLLM=a["vllm"] is not None, HAS_DELTA=a["delta"] is not None, HAS_BETA=a["beta"] != 0.0,
                BIAS_CORRECTION=bool(a["bias_correction"]), HAS_GENT=ge is not None)


def dlogits_(z, targets, stats: RowStats, g_logp, g_entropy, inv_t: float, out_dtype) -> torch.Tensor:
    """dlogits (R, V) in out_dtype written into z's storage (a view with row stride 2V for 16 bits)."""
    R, V = z.shape
    if R:
        has_gent = g_entropy is not None
        _dlogits_kernel[(R,)](z, z.stride(0), targets, stats.lse, stats.entropy if has_gent else stats.lse,
                              g_logp.contiguous(), g_entropy.contiguous() if has_gent else g_logp, V, inv_t,
                              OUT_DTYPE=_TL_DTYPES[out_dtype], HAS_GENT=has_gent, BLOCK_V=_ROW_BLOCK, num_warps=8)
    if out_dtype == torch.float32:
        return z
    out = z.view(out_dtype)[:, :V]  # first half of each row's bytes
    # CPU GEMMs (the interpreter's tests) were seen to read past K in a padded row and turn the
    # stale second half into NaN; cuBLAS reads only the K columns of a strided operand
    return out if out.is_cuda else out.contiguous()
