"""Loss and gradients of a linear head in one pass of three matmuls, a chunk of rows at a time.

For each chunk of rows (whole sequences when the loss needs them):
    z  = (h·Wᵀ + b) / T                      cuBLAS, fp32 output (logits never rounded to 16 bits)
    row pass, in place on z                   max, lse, target log-prob, entropy (backend kernel)
    g  = d loss_chunk / d (logp, entropy)     O(R) autograd on the chunk's per-token loss
    dz = dlogits from g, in place of z        backend kernel, in the products' dtype
    d_h[chunk] = dz·W  (written once);  d_W += dzᵀ·h (beta = 1);  d_b += Σ dz
The loss is a sum over chunks (its normalisers are global), so summing chunk losses and
gradients gives exactly the whole-batch values. Backward only scales the stored gradients by
grad_output. Working memory is one chunk of fp32 logits (plus a 16-bit dlogits copy on the torch
backend), bounded by ``memory_budget`` bytes.

d_W accumulates across chunks in the weight's dtype (one rounding per chunk, cuBLAS accumulates
each chunk's product in fp32) unless ``fp32_weight_grad``: then in an fp32 (V, H) buffer cast
once at the end, which costs V·H·4 bytes (0.67 GB at Gemma 3's 262144 × 640, 2.2 GB at Qwen's
152064 × 3584) on top of the budget. bench/RESULTS.md has the error of both against float64.

Mixed precision: an fp32 (master) weight with 16-bit hidden states computes the products in the
hidden states' dtype from a copy of the head that lives only during the forward call (or from
``Plan.head``, a 16-bit copy the caller keeps anyway, e.g. the sampler's decode weights), and d_W
accumulates in fp32 and comes back in fp32, to be added straight into the master `.grad`: no
16-bit (V, H) gradient is kept for backward and nothing flows back through a cast.
"""

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import torch_backend

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of chunk working memory


@dataclass(frozen=True)
class Plan:
    """What one fused call computes.

    targets: (N,) int64. seq_starts: (B+1,) host list of sequence row offsets (0, ..., N).
    whole_sequences: chunks must not split a sequence (sequence-level losses).
    loss_fn(r0, r1, logp, entropy) -> (loss (), metrics {name: ()}) for rows [r0, r1), built from
        the (R,) fp32 logp / entropy of those rows (entropy None unless with_entropy); additive
        over any partition of the rows into chunks.
    """

    targets: torch.Tensor
    seq_starts: list[int]
    whole_sequences: bool
    with_entropy: bool
    temperature: float
    loss_fn: Callable
    metric_names: tuple[str, ...]
    backend: object  # torch_backend or triton_backend (same row-pass contract)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    fp32_weight_grad: bool = False
    keep_logprobs: bool = False  # also return every row's log-prob (detached)
    head: torch.Tensor | None = None  # the weight already in hidden's dtype (see compute_head)


def chunk_rows(plan: Plan, vocab: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) whose chunk fits the memory budget; raises ValueError naming it."""
    n = plan.seq_starts[-1]
    per_row = vocab * 4 + plan.backend.extra_bytes_per_row(vocab, dtype)
    # the torch backend's entropy terms hold two fp32 temporaries over blocks of ENTROPY_ROWS rows
    ent = 8 * vocab if plan.with_entropy and plan.backend is torch_backend else 0
    block = torch_backend.ENTROPY_ROWS
    rows = plan.memory_budget // (per_row + ent)
    if rows > block:
        rows = (plan.memory_budget - block * ent) // per_row
    if rows < 1:
        raise ValueError(f"memory_budget={plan.memory_budget} bytes holds no row of logits "
                         f"(one row needs {per_row + ent} bytes at V={vocab})")
    if not plan.whole_sequences:
        return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)] or [(0, 0)]
    chunks, start, starts = [], 0, plan.seq_starts
    for s0, s1 in zip(starts[:-1], starts[1:]):
        if s1 - s0 > rows:
            raise ValueError(f"memory_budget={plan.memory_budget} bytes holds {rows} rows of logits at V={vocab}, "
                             f"but a sequence has {s1 - s0} tokens and sequence-level losses need whole sequences "
                             f"in a chunk: raise memory_budget to at least {(s1 - s0) * per_row} bytes")
        if s1 - start > rows:
            chunks.append((start, s0))
            start = s0
    chunks.append((start, n))
    return chunks


def logits_fp32(h, weight, bias, inv_t, out, weight32):
    """out (R, V) fp32 = (h·Wᵀ + b) / T, products accumulated and stored in fp32.

    weight32: None (fp32 weights, or 16-bit ones on a device with fp32-output GEMMs) or the
    head upcast to fp32 (see head_fp32).
    """
    if h.dtype == torch.float32:
        if bias is None:
            torch.mm(h, weight.T, out=out)
        else:
            torch.addmm(bias.float(), h, weight.T, out=out)
    else:
        if weight32 is None:  # CUDA: 16-bit cuBLAS GEMM with an fp32 output
            torch.mm(h, weight.T, out_dtype=torch.float32, out=out)
        else:
            torch.mm(h.float(), weight32.T, out=out)
        if bias is not None:
            out += bias.float()
    if inv_t != 1.0:
        out *= inv_t
    return out


def head_fp32(weight: torch.Tensor) -> torch.Tensor | None:
    """None when logits_fp32 can use `weight` as it is, else an fp32 copy of it: 16-bit weights
    on a device without fp32-output GEMMs for them (CPU tests, old torch), not a fast path."""
    if weight.dtype == torch.float32 or _fp32_output_gemm(weight.device, weight.dtype):
        return None
    return weight.float()


@functools.lru_cache(maxsize=None)
def _fp32_output_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32, out=...) runs for `dtype` inputs on `device`."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        torch.mm(a, a, out_dtype=torch.float32, out=torch.empty(2, 2, device=device))
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def row_chunks(plan: Plan, hidden, weight, bias):
    """Yield (r0, r1, z, stats) per chunk: z (R, V) fp32 logits after the backend's row pass (one
    buffer reused by every chunk) and the chunk's RowStats. The forward-only pass and the fused
    loss share this loop."""
    vocab = weight.shape[0]
    chunks = chunk_rows(plan, vocab, hidden.dtype)
    inv_t, weight32 = 1.0 / plan.temperature, head_fp32(weight)
    buf = torch.empty(max(r1 - r0 for r0, r1 in chunks) * vocab, device=hidden.device, dtype=torch.float32)
    for r0, r1 in chunks:
        z = logits_fp32(hidden[r0:r1], weight, bias, inv_t, buf[: (r1 - r0) * vocab].view(r1 - r0, vocab), weight32)
        yield r0, r1, z, plan.backend.row_stats_(z, plan.targets[r0:r1], plan.with_entropy)


@functools.lru_cache(maxsize=None)
def _fp32_accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=float32, out=c) adds a `dtype` product into an
    fp32 c in place (and right) on `device`."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        c = torch.ones(2, 2, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool((c == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for 16-bit a, b, the product never rounded to 16 bits: in place in one
    GEMM where the device has fp32-accumulating 16-bit GEMMs (CUDA), else through an fp32
    product (upcast operands where no fp32-output GEMM runs: CPU tests)."""
    if _fp32_accumulating_gemm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif _fp32_output_gemm(a.device, a.dtype):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a.float(), b.float()))


def compute_head(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head the products use: `weight` itself, or (fp32 master weight, 16-bit `dtype` hidden
    states) a `dtype` copy that the caller drops when its pass ends."""
    return weight if weight.dtype == dtype else weight.to(dtype)


def run_chunks(plan: Plan, hidden, weight, bias, need_grads: tuple[bool, bool, bool],
               grad_dtype: torch.dtype | None = None):
    """The chunk loop. Returns (loss () fp32, metrics (K,) fp32, logp (N,) fp32 or None (unless
    plan.keep_logprobs), d_hidden, d_weight, d_bias) with None for gradients not needed.

    weight: the head in hidden's dtype; grad_dtype: d_weight's dtype (the master weight's;
    default weight's). An fp32 grad_dtype accumulates in fp32 whatever plan.fp32_weight_grad."""
    n, vocab = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = need_grads[0], need_grads[1], need_grads[2] and bias is not None
    need_any = need_h or need_w or need_b
    inv_t, dtype = 1.0 / plan.temperature, hidden.dtype
    d_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if need_h else None
    grad_dtype = grad_dtype or weight.dtype
    d_w = None
    if need_w:
        d_w = torch.zeros(weight.shape, device=weight.device,
                          dtype=torch.float32 if plan.fp32_weight_grad else grad_dtype)
    d_b = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if need_b else None
    loss = hidden.new_zeros((), dtype=torch.float32)
    metrics = hidden.new_zeros(len(plan.metric_names), dtype=torch.float32)
    all_logp = hidden.new_empty(n, dtype=torch.float32) if plan.keep_logprobs else None
    for r0, r1, z, stats in row_chunks(plan, hidden, weight, bias):
        h, tgt = hidden[r0:r1], plan.targets[r0:r1]
        if all_logp is not None:
            all_logp[r0:r1] = stats.logp
        with torch.enable_grad():
            logp = stats.logp.requires_grad_()
            entropy = stats.entropy.requires_grad_() if stats.entropy is not None else None
            loss_c, metrics_c = plan.loss_fn(r0, r1, logp, entropy)
            if need_any:
                inputs = [logp] + ([entropy] if entropy is not None else [])
                grads = torch.autograd.grad(loss_c, inputs, allow_unused=True)
        loss += loss_c.detach()
        metrics += torch.stack([metrics_c[k].detach().float() for k in plan.metric_names]) \
            if plan.metric_names else 0.0
        if not need_any:
            continue
        g_logp = grads[0] if grads[0] is not None else torch.zeros_like(stats.logp)
        g_ent = grads[1] if len(grads) > 1 else None
        dz = plan.backend.dlogits_(z, tgt, stats, g_logp.float(), None if g_ent is None else g_ent.float(),
                                   inv_t, dtype)
        if need_h:
            torch.mm(dz, weight, out=d_h[r0:r1])
        if need_w:
            if d_w.dtype == dz.dtype:
                d_w.addmm_(dz.T, h)
            else:  # fp32 accumulator for a 16-bit product
                _add_product_fp32(d_w, dz.T, h)
        if need_b:
            d_b += dz.sum(0, dtype=torch.float32)
    if d_w is not None and d_w.dtype != grad_dtype:
        d_w = d_w.to(grad_dtype)
    return loss, metrics, all_logp, d_h, d_w, None if d_b is None else d_b.to(bias.dtype)


class FusedLinearLoss(torch.autograd.Function):
    """apply(hidden (N, H), weight (V, H), bias (V,) | None, plan) -> (loss (), metrics (K,),
    logp (N,) fp32, or (0,) unless plan.keep_logprobs), the last two not differentiable.
    weight: hidden's dtype, or fp32 with 16-bit hidden (its gradient then comes back in fp32).

    Gradients of hidden / weight / bias are computed in forward and scaled by grad_output in
    backward (in place: the graph can be back-propagated once).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: Plan):
        need = ctx.needs_input_grad[:3]
        head = plan.head if plan.head is not None else compute_head(weight, hidden.dtype)
        loss, metrics, logp, d_h, d_w, d_b = run_chunks(plan, hidden, head, bias, need, grad_dtype=weight.dtype)
        ctx.save_for_backward(d_h, d_w, d_b)
        logp = metrics.new_empty(0) if logp is None else logp
        ctx.mark_non_differentiable(metrics, logp)
        return loss, metrics, logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_metrics, _grad_logp):
        if grad_loss is None:
            return None, None, None, None
        d_h, d_w, d_b = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        return d_h, d_w, d_b, None
