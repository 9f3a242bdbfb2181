"""Fused linear + log-softmax + gather (+ entropy) in Triton, never holding the N×V logits.

Math (all in fp32, logits never rounded to the input dtype before the softmax):
    z = (h·Wᵀ + b) / T                       # (N, V), only ever one tile at a time
    lse = logsumexp(z);  logp = z[target] − lse;  H = lse − Σ p·z = log s − t/s
Backward (per tile, recomputed):
    dz = g_logp·(onehot − p) − g_H·p·(z − lse + H);  dlogits = dz / T
    d_h += dlogits·W;  d_W += dlogitsᵀ·h;  d_b += Σ_rows dlogits

Forward: a flattened 1-D grid over (splits × m_blocks). Program (s, m) walks the vocabulary
range of split s in BLOCK_V steps (each step a K loop over H) and keeps, per row, an online
running max m, s = Σ exp(z − m) and t = Σ exp(z − m)·(z − m) (the shifted form keeps the
entropy free of the lse − Σpz cancellation), plus the target logit when it falls in a tile.
The (SPLITS, N) partials are merged in O(N·SPLITS) torch ops.

Backward, mode "atomic": for each vocabulary slab (``slab_rows`` rows of W, default 16384) a flattened 1-D
grid over (m_blocks × v_blocks) with a grouped ordering for L2 reuse. Each program recomputes
its logits tile, forms dlogits in fp32, casts it to the input dtype for the two products and
adds them with fp32 ``tl.atomic_add`` into an fp32 d_hidden (N, H) buffer and an fp32 d_W slab
buffer (slab_rows, H), which is cast into the output gradient when the slab is finished.
Extra peak memory at N=32768, H=3584, V=152064, bf16: d_h fp32 470 MB + d_W slab 235 MB
(forward: 4 × SPLITS × N fp32 partials, negligible).
For fp32 inputs the atomics go straight into the output gradients (no extra buffers).

The K loop of each backward program starts at a block rotated by (pid_m + pid_v), so the
programs in flight that add into the same d_h / d_W tile hit different addresses at a time.

Backward, mode "gemm" (the default unless a sparsity skip is asked for; see _bwd_mode): the
same kernel stores each dlogits slab (N, slab) in the input dtype (≤ ~512 MB) and cuBLAS does
d_h += dl·W_slab (fp32 accumulator) and d_W[slab] = dlᵀ·h. Which mode is faster on H100/H200
is measured by bench/bench_linear_logprob.py; FASTMGRPO_TRITON_BWD=atomic|gemm overrides.

Optional sparsity skip (Cut-Cross-Entropy style, ``skip_eps``, atomic mode): a backward tile
whose max |dlogits| < skip_eps skips both products (its softmax is below the input dtype's
resolution and holds no target). Off by default.

Under TRITON_INTERPRET=1 (CPU tests) 16-bit dots are done on fp32-upcast operands and the
row reductions go through tl.reduce directly (see _mma, _rsum).

The launch grid is 1-D everywhere (axis 0 allows 2^31 − 1 programs), so there is no cap
on sequence length. Pointer offsets are int64.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["TritonOptions", "LinearLogprobTriton", "linear_logprob_triton",
           "linear_logprob_fwd", "linear_logprob_bwd"]


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """Tuning knobs of the Triton backend; None picks the default for the device.

    skip_eps:  backward sparsity skip threshold on max |dlogits| of a tile (None = dense;
               "atomic" mode only).
    bwd:       "gemm" (default: dlogits slab stored in the input dtype, products by cuBLAS)
               or "atomic" (fp32 atomics from the kernel; default when skip_eps is set);
               $FASTMGRPO_TRITON_BWD sets it when this is None.
    slab_rows: vocabulary rows per backward slab (bounds the fp32 d_W buffer).
    splits:    vocabulary splits in the forward (parallelism for short sequences).
    """
    skip_eps: float | None = None
    bwd: str | None = None
    slab_rows: int | None = None
    splits: int | None = None
    block_m: int | None = None
    block_v: int | None = None
    block_k: int | None = None


DEFAULT_OPTIONS = TritonOptions()


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (decided at import)."""
    return type(_linear_logprob_fwd_kernel).__name__ == "InterpretedFunction"


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


@triton.jit
def _linear_logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
    dh_ptr, dw_ptr, db_ptr,                 # fp32: (N, H), (slab rows, H), (slab rows,)
    dl_ptr, dl_stride,                      # STORE_DL: (N, slab rows) dlogits in input dtype
    N, V, H, inv_temp, v_start, v_end, m_blocks, v_blocks, skip_eps,
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    SKIP: tl.constexpr, STORE_DL: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTERP: tl.constexpr,
):
    # grouped ordering: GROUP_M token blocks × all v blocks of the slab per group, so the
    # programs in flight share a few h tiles and a range of W tiles in L2
    pid = tl.program_id(0)
    per_group = GROUP_M * v_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < N
    mask_v = offs_v < v_end
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, H, inv_temp,
                     HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    p = tl.exp(z - lse[:, None])                                # (BLOCK_M, BLOCK_V) softmax
    dz = tl.full((BLOCK_M, BLOCK_V), 0.0, tl.float32)
    if HAS_GLOGP:
        g = tl.load(glogp_ptr + offs_m, mask=mask_m, other=0.0)
        tgt = tl.load(tgt_ptr + offs_m, mask=mask_m, other=-1)
        onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
        dz += g[:, None] * (onehot - p)
    if HAS_GENT:
        ge = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)
        ent = tl.load(ent_ptr + offs_m, mask=mask_m, other=0.0)
        dz -= ge[:, None] * p * (z - lse[:, None] + ent[:, None])
    dl = dz * inv_temp
    dl = tl.where(mask_m[:, None] & mask_v[None, :], dl, 0.0)   # fp32 dlogits tile

    run = True
    if SKIP:
        run = _rmax(_rmax(tl.abs(dl), 1, INTERP), 0, INTERP) >= skip_eps
    if run:
        offs_vl = offs_v - v_start                              # row inside the slab buffers
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + offs_vl, _rsum(dl, 0, INTERP), mask=mask_v, sem="relaxed")
        dl_in = dl.to(h_ptr.dtype.element_ty)
        if STORE_DL:  # "gemm" mode: the two products are left to cuBLAS on the stored slab
            dl_ptrs = dl_ptr + offs_m.to(tl.int64)[:, None] * dl_stride + offs_vl[None, :]
            tl.store(dl_ptrs, dl_in, mask=mask_m[:, None] & mask_v[None, :])
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = offs_m.to(tl.int64)[:, None] * H
        w_rows = offs_v.to(tl.int64)[:, None] * H
        wl_rows = offs_vl.to(tl.int64)[:, None] * H
        # start each program at a different K block (rotated by pid_m + pid_v) so the
        # programs in flight that share a d_h or d_W tile hit different addresses at a time
        k_blocks = (H + BLOCK_K - 1) // BLOCK_K
        rot = pid_m + pid_v
        for ki in range(0, k_blocks):
            kk = ((ki + rot) % k_blocks) * BLOCK_K + offs_k
            mask_k = kk < H
            mask_hk = mask_m[:, None] & mask_k[None, :]
            mask_wk = mask_v[:, None] & mask_k[None, :]
            if COMPUTE_DH:
                w = tl.load(w_ptr + w_rows + kk[None, :], mask=mask_wk, other=0.0)
                dh = _mma(dl_in, w, None, DOT_PRECISION, UPCAST)        # (BLOCK_M, BLOCK_K)
                tl.atomic_add(dh_ptr + h_rows + kk[None, :], dh, mask=mask_hk, sem="relaxed")
            if COMPUTE_DW:
                h = tl.load(h_ptr + h_rows + kk[None, :], mask=mask_hk, other=0.0)
                dw = _mma(tl.trans(dl_in), h, None, DOT_PRECISION, UPCAST)  # (BLOCK_V, BLOCK_K)
                tl.atomic_add(dw_ptr + wl_rows + kk[None, :], dw, mask=mask_wk, sem="relaxed")


# --------------------------------------------------------------------------------------
# Launchers: reshape, allocate, choose grid / blocks / warps
# --------------------------------------------------------------------------------------
def _config(dtype: torch.dtype, device: torch.device, opts: TritonOptions):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) for this device and dtype."""
    if device.type != "cuda" or _interpreting():
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
    upcast = _interpreting() and dtype != torch.float32
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32",
                UPCAST=upcast, INTERP=_interpreting())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_logprob_fwd(hidden, weight, bias, targets, temperature, with_entropy,
                       opts: TritonOptions = DEFAULT_OPTIONS):
    """Returns (logp (N,) fp32, entropy (N,) fp32 or empty, lse (N,) fp32)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        empty = hidden.new_empty((0,), dtype=torch.float32)
        return empty, empty, empty
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
        entropy = torch.log(s) - t / s
    else:
        entropy = torch.empty(0, device=hidden.device, dtype=torch.float32)
    return logp, entropy, lse


def _bwd_mode(opts: TritonOptions) -> str:
    """opts.bwd, else $FASTMGRPO_TRITON_BWD, else "atomic" with a sparsity skip, "gemm" without.

    Why "gemm" by default: with 128×128 tiles the atomic path moves (BLOCK_M + BLOCK_V)·H·4
    bytes of fp32 atomics per 6·BLOCK_M·BLOCK_V·H flops (~0.01 B/flop: ~6 TB/s at 600
    TFLOP/s, beyond H100 memory bandwidth), while the gemm path writes the dlogits once in
    bf16 (N·V·2 bytes) and leaves both products to cuBLAS. To be confirmed on the GPU by
    bench/bench_linear_logprob.py (triton_atomic vs triton_gemm).
    """
    mode = opts.bwd or os.environ.get("FASTMGRPO_TRITON_BWD") or (
        "atomic" if opts.skip_eps is not None else "gemm")
    if mode not in ("atomic", "gemm"):
        raise ValueError(f"Triton backward mode must be 'atomic' or 'gemm', got {mode!r}")
    if mode == "gemm" and opts.skip_eps is not None:
        raise ValueError("skip_eps (sparsity skip) needs the 'atomic' backward mode")
    return mode


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b: cuBLAS with an fp32 output where torch has it
    (aten::addmm.dtype_out), else a 16-bit product added in fp32."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError):
            pass
    return acc.add_(a @ b)


def linear_logprob_bwd(hidden, weight, bias, targets, temperature, lse, entropy,
                       grad_logp, grad_entropy, needs=(True, True, True),
                       opts: TritonOptions = DEFAULT_OPTIONS):
    """Returns (d_hidden, d_weight, d_bias) in the input dtypes (None where not needed).

    mode "atomic": per slab one kernel recomputes the logits tiles and atomically adds both
    products into fp32 buffers. mode "gemm": per slab the kernel stores the dlogits slab
    (N, slab) in the input dtype and cuBLAS does d_h += dl·W_slab, d_W[slab] = dlᵀ·h.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    mode = _bwd_mode(opts)
    bm, bv, bk, warps, stages = _config(hidden.dtype, dev, opts)
    on_gpu = dev.type == "cuda" and not _interpreting()
    if mode == "gemm":  # dlogits slab ≤ ~512 MB: N=32768 → 8192 rows
        default_slab = max(1024, (2 ** 29 // max(1, N * hidden.element_size())))
    else:               # fp32 d_W slab: 16384 × H × 4 bytes (235 MB at H=3584)
        default_slab = 16384
    slab = opts.slab_rows or (default_slab if on_gpu else 1024)
    slab = max(bv, min(slab, triton.cdiv(V, bv) * bv) // bv * bv)   # whole v blocks
    fp32 = hidden.dtype == torch.float32

    dh = torch.zeros((N, H), device=dev, dtype=torch.float32) if need_h else None
    zero_w = fp32 and mode == "atomic"
    dw_out = (torch.zeros if zero_w else torch.empty)((V, H), device=dev, dtype=weight.dtype) \
        if need_w else None
    db = torch.zeros((V,), device=dev, dtype=torch.float32) if need_b else None
    if not (need_h or need_w or need_b) or N == 0:
        return (dh.to(hidden.dtype) if need_h else None,
                dw_out.zero_() if need_w else None, db.to(bias.dtype) if need_b else None)
    gemm = mode == "gemm" and (need_h or need_w)
    dl_buf = torch.empty((N, slab), device=dev, dtype=hidden.dtype) if gemm else None
    dw_buf = None if (not need_w or fp32 or gemm) else \
        torch.empty((slab, H), device=dev, dtype=torch.float32)
    dummy = lse
    m_blocks = triton.cdiv(N, bm)
    for v0 in range(0, V, slab):
        v1 = min(v0 + slab, V)
        v_blocks = triton.cdiv(v1 - v0, bv)
        if dw_buf is not None:
            dw_buf.zero_()
        # slab-relative indexing: views starting at row v0 of the d_W / d_b buffers
        dw_view = dw_buf if dw_buf is not None else (dw_out[v0:] if need_w else dummy)
        _linear_logprob_bwd_kernel[(m_blocks * v_blocks,)](
            hidden, weight, bias if bias is not None else hidden, targets, lse,
            entropy if grad_entropy is not None else dummy,
            grad_logp if grad_logp is not None else dummy,
            grad_entropy if grad_entropy is not None else dummy,
            dh if dh is not None else dummy, dw_view, db[v0:] if need_b else dummy,
            dl_buf if gemm else dummy, slab,
            N, V, H, 1.0 / temperature, v0, v1, m_blocks, v_blocks,
            float(opts.skip_eps or 0.0),
            HAS_BIAS=bias is not None, HAS_GLOGP=grad_logp is not None,
            HAS_GENT=grad_entropy is not None,
            COMPUTE_DH=need_h and not gemm, COMPUTE_DW=need_w and not gemm, COMPUTE_DB=need_b,
            SKIP=opts.skip_eps is not None and not gemm, STORE_DL=gemm, GROUP_M=8,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **_dot_args(hidden.dtype),
            num_warps=warps, num_stages=stages,
        )
        if gemm:
            dl = dl_buf[:, : v1 - v0]                           # (N, slab) strided view
            if need_h:
                _addmm_fp32_(dh, dl, weight[v0:v1])             # (N, H) += (N, s)·(s, H)
            if need_w:
                torch.mm(dl.T, hidden, out=dw_out[v0:v1])       # (s, H) = (s, N)·(N, H)
        elif dw_buf is not None:
            dw_out[v0:v1].copy_(dw_buf[: v1 - v0])              # finished slab → output dtype
    d_hidden = dh.to(hidden.dtype) if need_h else None
    d_bias = db.to(bias.dtype) if need_b else None
    return d_hidden, dw_out, d_bias


# --------------------------------------------------------------------------------------
# Autograd function and public entry point
# --------------------------------------------------------------------------------------
class LinearLogprobTriton(torch.autograd.Function):
    """apply(hidden (N,H), weight (V,H), bias (V,)|None, targets (N,) int64, temperature,
    with_entropy, opts=None) -> (logp (N,) fp32, entropy (N,) fp32 or 0-element fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, opts=None):
        opts = opts or DEFAULT_OPTIONS
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        targets = targets.contiguous().to(torch.int64)
        logp, entropy, lse = linear_logprob_fwd(hidden, weight, bias, targets, temperature,
                                                with_entropy, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: skip it
        ctx.temperature, ctx.with_entropy, ctx.opts = temperature, with_entropy, opts
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        g_logp = grad_logp.contiguous().float() if grad_logp is not None else None
        g_ent = grad_entropy.contiguous().float() if grad_entropy is not None else None
        needs = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        dh, dw, db = linear_logprob_bwd(hidden, weight, bias, targets, ctx.temperature, lse,
                                        entropy, g_logp, g_ent, needs, ctx.opts)
        return dh, dw, db, None, None, None, None


def linear_logprob_triton(hidden, weight, targets, bias=None, temperature=1.0,
                          with_entropy=False, skip_eps=None, slab_rows=None):
    """Per-token log-probs (and entropy) of ``targets`` under softmax((hidden·Wᵀ + b)/T).

    Args:
        hidden: (..., H) fp32/bf16/fp16, flattened to (N, H).
        weight: (V, H), same dtype as hidden.  bias: (V,) or None.
        targets: (...,) integer token ids in [0, V).
        temperature: float > 0.  with_entropy: also return the softmax entropy.
        skip_eps: backward sparsity skip threshold (None = dense; bf16: ~2**-12).
        slab_rows: vocabulary rows per backward slab.
    Returns:
        (logp (...,) fp32, entropy (...,) fp32 or None).
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite float, got {temperature}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    shape = hidden.shape[:-1]
    opts = TritonOptions(skip_eps=skip_eps, slab_rows=slab_rows)
    logp, ent = LinearLogprobTriton.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                          targets.reshape(-1), float(temperature),
                                          bool(with_entropy), opts)
    return logp.view(shape), (ent.view(shape) if with_entropy else None)
