"""Loss and gradients of a linear head in one pass of three matmuls, a chunk of rows at a time.

For each chunk of rows (whole sequences when the loss needs them):
    z  = h·Wᵀ + b                            cuBLAS, fp32 output (logits never rounded to 16 bits)
    row pass on z / T                         max, lse, target log-prob, entropy (backend kernel:
                                              Triton scales z as it loads it, torch in place),
                                              and g = d loss / d (logp, entropy) in closed form
                                              with each row's loss and metric terms (Triton: in
                                              the stats kernel, or a per-sequence kernel after it
                                              for GSPO / VESPO; O(R) torch ops otherwise)
    dz = dlogits from g, in place of z        backend kernel, in the products' dtype
    d_h[chunk] = dz·W  (written once);  d_W (=, then +=) dzᵀ·h;  d_b += Σ dz
The loss is a sum over rows (its normalisers are global), so summing row terms and chunk
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
import logging
from dataclasses import dataclass

import torch

from . import overlap, torch_backend

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of chunk working memory
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one fused call computes.

    targets: (N,) int64. seq_starts: (B+1,) host list of sequence row offsets (0, ..., N).
    terms: the loss (grpo_loss._LossTerms), or None for log-probs only. It provides `names` (K
        metric names), `whole_sequences`, `has_entropy_grad`, `grads(r0, r1, logp, entropy)` ->
        (values (K+1, R): each row's loss term then its metric terms; g_logp (R,); g_entropy (R,)
        or None), its closed-form gradient in torch, and `kernel_args(r0, r1)`: the same for a
        backend that folds it into its row pass (FOLDS_LOSS), or None where it cannot.
    """

    targets: torch.Tensor
    seq_starts: list[int]
    with_entropy: bool
    temperature: float
    terms: object | None
    backend: object  # torch_backend or triton_backend (same row-pass contract)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    fp32_weight_grad: bool = False
    keep_logprobs: bool = False  # also return every row's log-prob (detached)
    head: torch.Tensor | None = None  # the weight already in hidden's dtype (see compute_head)
    overlap: bool = False  # two CUDA streams, two half-budget buffers (overlap.py); no-op without CUDA


def chunk_rows(plan: Plan, vocab: int, dtype: torch.dtype, buffers: int = 1) -> tuple[list[tuple[int, int]], bool]:
    """(row ranges [r0, r1) whose chunk fits the memory budget, two_pass). Sequence-level losses
    get chunks of whole sequences; where one sequence alone does not fit, two_pass is True and
    the chunks split sequences (see run_chunks). `buffers` chunks share the budget. Raises
    ValueError when no row fits."""
    n, budget = plan.seq_starts[-1], plan.memory_budget // buffers
    per_row = vocab * 4 + plan.backend.extra_bytes_per_row(vocab, dtype)
    # the torch backend's entropy terms hold two fp32 temporaries over blocks of ENTROPY_ROWS rows
    ent = 8 * vocab if plan.with_entropy and plan.backend is torch_backend else 0
    block = torch_backend.ENTROPY_ROWS
    rows = budget // (per_row + ent)
    if rows > block:
        rows = (budget - block * ent) // per_row
    if rows < 1:
        raise ValueError(f"memory_budget={plan.memory_budget} bytes holds no row of logits "
                         f"(one row needs {(per_row + ent) * buffers} bytes at V={vocab})")
    starts = plan.seq_starts
    whole = plan.terms is not None and plan.terms.whole_sequences
    if not whole or max((b - a for a, b in zip(starts[:-1], starts[1:])), default=0) > rows:
        return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)] or [(0, 0)], whole
    chunks, start = [], 0
    for s0, s1 in zip(starts[:-1], starts[1:]):
        if s1 - start > rows:
            chunks.append((start, s0))
            start = s0
    chunks.append((start, n))
    return chunks, False


def logits_fp32(h, weight, bias, out, weight32):
    """out (R, V) fp32 = h·Wᵀ + b, products accumulated and stored in fp32 (the temperature is
    the row pass's: a separate scaling pass would read and write the chunk once more).

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


def row_chunks(plan: Plan, hidden, weight, bias, chunks, streams=None):
    """Yield (r0, r1, z) per chunk of `chunks`: z (R, V) the fp32 h·Wᵀ + b of rows [r0, r1) (the
    backend's row pass divides by T), in one buffer reused by every chunk, or with `streams`
    (overlap.py) two buffers, each chunk's GEMM issued one chunk ahead on the side stream. The
    forward-only pass and the fused loss share this loop."""
    vocab, weight32 = weight.shape[0], head_fp32(weight)
    rows = max(r1 - r0 for r0, r1 in chunks)
    buf = torch.empty(1 if streams is None else 2, rows * vocab, device=hidden.device, dtype=torch.float32)

    def produce(i, b):
        r0, r1 = chunks[i]
        return logits_fp32(hidden[r0:r1], weight, bias, buf[b, : (r1 - r0) * vocab].view(r1 - r0, vocab), weight32)

    if streams is not None:
        yield from overlap.pipelined(streams, chunks, produce)
        return
    for i, (r0, r1) in enumerate(chunks):
        yield r0, r1, produce(i, 0)


@functools.lru_cache(maxsize=None)
def _fp32_accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=float32, out=c) adds a `dtype` product into an
    fp32 c in place (and right) on `device`. Logged once per (device, dtype): which d_W
    accumulation runs (see _add_product_fp32)."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        c = torch.ones(2, 2, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        ok = bool((c == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        ok = False
    how = ("one in-place addmm with out_dtype=float32" if ok else
           f"vocabulary slices of {_SLICE_BYTES >> 20} MiB through "
           + ("mm with out_dtype=float32" if _fp32_output_gemm(device, dtype) else "fp32-upcast operands"))
    _log.info("fused loss: %s products add into the fp32 d_W on %s by %s", dtype, device, how)
    return ok


_SLICE_BYTES = 32 * 2**20  # fp32 temporaries of the d_W fallback, per vocabulary slice


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int = 1) -> None:
    """acc (V, H) fp32 = beta·acc + a @ b for 16-bit a (V, R), b (R, H), the product never rounded
    to 16 bits; beta 0 ignores acc's contents. In place in one GEMM where the device has
    fp32-accumulating 16-bit GEMMs (CUDA, recent torch); else a slice of V rows at a time, so the
    fp32 temporaries stay under _SLICE_BYTES (never a (V, H) product: 2 GiB at a 7B head)."""
    if _fp32_accumulating_gemm(a.device, a.dtype):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
        return
    fp32_out = _fp32_output_gemm(a.device, a.dtype)
    b = b if fp32_out else b.float()
    rows = max(1, _SLICE_BYTES // (4 * (acc.shape[1] if fp32_out else a.shape[1] + acc.shape[1])))
    for v0 in range(0, acc.shape[0], rows):
        part, a_part = acc[v0:v0 + rows], a[v0:v0 + rows]
        if fp32_out:
            product = torch.mm(a_part, b, out_dtype=torch.float32)
            part.copy_(product) if beta == 0 else part.add_(product)
        else:
            part.addmm_(a_part.float(), b, beta=beta)


def compute_head(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head the products use: `weight` itself, or (fp32 master weight, 16-bit `dtype` hidden
    states) a `dtype` copy that the caller drops when its pass ends."""
    return weight if weight.dtype == dtype else weight.to(dtype)


def run_chunks(plan: Plan, hidden, weight, bias, need_grads: tuple[bool, bool, bool],
               grad_dtype: torch.dtype | None = None):
    """The chunk loop. Returns (loss () fp32, metrics (K,) fp32, logp (N,) fp32 or None (unless
    plan.keep_logprobs), d_hidden, d_weight, d_bias) with None for gradients not needed.

    weight: the head in hidden's dtype; grad_dtype: d_weight's dtype (the master weight's;
    default weight's). An fp32 grad_dtype accumulates in fp32 whatever plan.fp32_weight_grad.

    Per chunk: the Z GEMM, the backend's row pass (stats, with the closed-form gradient and the
    rows' loss / metric terms folded in where the backend can), the dlogits pass, the d_h GEMM
    and the d_W GEMM (none for a frozen head). Every row's terms land in one (K+1, N) buffer,
    summed once at the end. Two-pass fallback (a sequence-level loss with a sequence longer than
    the budget's chunk): pass 1 computes every row's log-prob chunk by chunk (one GEMM each),
    then the whole batch's closed-form gradient (the backend's sequence kernel where it has
    one); pass 2 is the usual loop with that gradient (4 GEMMs in all instead of 3).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = need_grads[0], need_grads[1], need_grads[2] and bias is not None
    need_any = need_h or need_w or need_b
    inv_t, dtype, terms, backend = 1.0 / plan.temperature, hidden.dtype, plan.terms, plan.backend
    d_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if need_h else None
    grad_dtype = grad_dtype or weight.dtype
    d_w = None
    if need_w:  # the first chunk's GEMM writes it (beta = 0): no zero fill
        d_w = torch.empty(weight.shape, device=weight.device,
                          dtype=torch.float32 if plan.fp32_weight_grad else grad_dtype)
    d_b = torch.empty(vocab, device=weight.device, dtype=torch.float32) if need_b else None
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n, **f32) if plan.with_entropy else None
    values = torch.empty(len(terms.names) + 1, n, **f32)
    g = torch.empty(n, **f32)
    g_ent = torch.empty(n, **f32) if terms.has_entropy_grad else None
    streams = overlap.streams_for(hidden.device, plan.overlap)
    chunks, two_pass = chunk_rows(plan, vocab, dtype, buffers=1 if streams is None else 2)
    loops = ((False, True) if need_any else (False,)) if two_pass else (True,)
    first = True
    for grads_here in loops:
        for r0, r1, z in row_chunks(plan, hidden, weight, bias, chunks, streams):
            h, tgt = hidden[r0:r1], plan.targets[r0:r1]
            out = (logp[r0:r1], None if entropy is None else entropy[r0:r1])
            fold = None
            if grads_here and not two_pass and getattr(backend, "FOLDS_LOSS", False):
                args = terms.kernel_args(r0, r1)
                fold = None if args is None else (args, g[r0:r1], None if g_ent is None else g_ent[r0:r1],
                                                  values[:, r0:r1])
            stats = backend.row_stats_(z, tgt, plan.with_entropy, out, fold, inv_t)
            if grads_here and not two_pass and fold is None:
                values[:, r0:r1], g[r0:r1], ge = terms.grads(r0, r1, stats.logp, stats.entropy)
                if g_ent is not None:
                    g_ent[r0:r1] = ge
            if not (grads_here and need_any):
                continue
            dz = backend.dlogits_(z, tgt, stats, g[r0:r1], None if g_ent is None else g_ent[r0:r1], inv_t, dtype)
            if need_h:
                torch.mm(dz, weight, out=d_h[r0:r1])
            if need_w:
                if d_w.dtype == dz.dtype:
                    d_w.addmm_(dz.T, h, beta=0 if first else 1)
                else:  # fp32 accumulator for a 16-bit product
                    _add_product_fp32(d_w, dz.T, h, beta=0 if first else 1)
            if need_b:
                torch.sum(dz, 0, dtype=torch.float32, out=d_b) if first else d_b.add_(dz.sum(0, dtype=torch.float32))
            first = False
        if not grads_here:  # two-pass: every row's log-prob is known, so is every row's gradient
            args = terms.kernel_args(0, n) if getattr(backend, "FOLDS_LOSS", False) else None
            if args is not None:
                backend.sequence_terms_((args, g, g_ent, values), logp, entropy)
            else:
                values[:], g[:], ge = terms.grads(0, n, logp, entropy)
                if g_ent is not None:
                    g_ent[:] = ge
    if d_w is not None and d_w.dtype != grad_dtype:
        d_w = d_w.to(grad_dtype)
    totals = values.sum(1)  # the metrics' one reduction per call
    return (totals[0], totals[1:], logp if plan.keep_logprobs else None, d_h, d_w,
            None if d_b is None else d_b.to(bias.dtype))


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
