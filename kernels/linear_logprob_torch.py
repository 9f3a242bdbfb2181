"""Chunked PyTorch backend of the fused "linear + log-softmax + gather (+ entropy)" primitive.

Backend contract (shared with ``linear_logprob_triton.LinearLogprobTriton``)::

    logp, entropy = LinearLogprobTorch.apply(hidden, weight, bias, targets, temperature, with_entropy)

    hidden (N, H) float, weight (V, H) same dtype, bias (V,) or None, targets (N,) int64 in [0, V),
    temperature: float > 0, with_entropy: bool.
    logp    (N,) fp32: log_softmax((hidden @ weight.T + bias) / temperature)[i, targets[i]]
    entropy (N,) fp32 when with_entropy, else an empty 0-element fp32 tensor.
    Gradients flow to hidden, weight and bias (in their own dtypes) from both outputs.

Inputs are assumed validated (see ``dispatch.linear_logprobs``). The N x V logits are never held:
the work runs over (row chunk x vocab block) tiles whose fp32 logits stay within ``_TILE_BYTES``;
forward keeps an online log-sum-exp, backward recomputes each tile from the saved lse.
"""

import torch

_TILE_BYTES = 64 * 2**20  # fp32 logits per tile: R x Vb x 4 bytes <= 64 MiB (+ ~2 same-size temps)


def _tile_sizes(n_rows: int, vocab: int, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
    """Rows per chunk R and vocab block Vb so R*Vb*4 <= _TILE_BYTES.

    fp32 weights are used in place, so the vocab block is the whole vocabulary (one GEMM per row
    chunk). Lower-precision weights are upcast one block at a time, so Vb*H*4 <= _TILE_BYTES too
    (e.g. H=4096 -> Vb=4096, R=4096).
    """
    vb = vocab if dtype == torch.float32 else max(1, min(vocab, _TILE_BYTES // (4 * hidden)))
    rows = max(1, min(n_rows, _TILE_BYTES // (4 * vb)))
    return rows, vb


def _tile_logits(h32, weight, bias, v0, v1, inv_t):
    """fp32 logits of one tile: (R, Vb) = (h @ W[v0:v1].T + b[v0:v1]) / T, never rounded to bf16."""
    w = weight[v0:v1].float()  # (Vb, H) fp32 (a view when weight is fp32)
    z = h32 @ w.T  # (R, Vb) fp32
    if bias is not None:
        z += bias[v0:v1].float()
    z *= inv_t
    return z, w


def _linear_logprob_fwd(hidden, weight, bias, targets, inv_t: float, with_entropy: bool):
    """Online log-sum-exp over vocab blocks, per row chunk. Returns logp, entropy (or empty), lse: (N,) fp32."""
    n, v = hidden.shape[0], weight.shape[0]
    rows, vb = _tile_sizes(n, v, hidden.shape[1], weight.dtype)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)  # (N,)
    logp = torch.empty_like(lse)  # (N,)
    ent = torch.empty_like(lse) if with_entropy else lse.new_empty(0)  # (N,) or (0,)
    for r0 in range(0, n, rows):
        h32 = hidden[r0 : r0 + rows].float()  # (R, H)
        tgt = targets[r0 : r0 + rows]  # (R,)
        m = torch.full((h32.shape[0],), float("-inf"), device=h32.device)  # running max (R,)
        s = torch.zeros_like(m)  # sum exp(z - m)
        sz = torch.zeros_like(m)  # sum exp(z - m) * z
        zt = torch.zeros_like(m)  # target logit
        for v0 in range(0, v, vb):
            z, _ = _tile_logits(h32, weight, bias, v0, v0 + vb, inv_t)  # (R, Vb)
            m_new = torch.maximum(m, z.amax(dim=1))
            scale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first block
            e = torch.exp(z - m_new[:, None])  # (R, Vb)
            s = s * scale + e.sum(dim=1)
            if with_entropy:
                sz = sz * scale + (e * z).sum(dim=1)
            m = m_new
            inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
            local = (tgt - v0).clamp(0, z.shape[1] - 1)
            zt += torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)
        lse_c = m + torch.log(s)
        lse[r0 : r0 + rows] = lse_c
        logp[r0 : r0 + rows] = zt - lse_c
        if with_entropy:
            ent[r0 : r0 + rows] = lse_c - sz / s  # H = lse - sum p z
    return logp, ent, lse


def _linear_logprob_bwd(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, inv_t, needs):
    """Recompute each tile and accumulate fp32 d_hidden, d_weight, d_bias (None where not needed).

    dz = g_logp*(onehot - p) + g_H*(-p*(z - lse + H)); dlogits = dz / T.
    """
    n, v = hidden.shape[0], weight.shape[0]
    rows, vb = _tile_sizes(n, v, hidden.shape[1], weight.dtype)
    with_entropy = g_ent is not None
    g_logp = lse.new_zeros(n) if g_logp is None else g_logp.float()  # (N,)
    d_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if needs[0] else None
    d_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs[1] else None
    d_b = torch.zeros(v, device=weight.device, dtype=torch.float32) if needs[2] and bias is not None else None
    for r0 in range(0, n, rows):
        h32 = hidden[r0 : r0 + rows].float()  # (R, H)
        tgt, lse_c, gl = targets[r0 : r0 + rows], lse[r0 : r0 + rows], g_logp[r0 : r0 + rows]  # (R,)
        if with_entropy:
            gh = g_ent[r0 : r0 + rows].float()  # (R,)
            shift = ent[r0 : r0 + rows] - lse_c  # H - lse (R,)
        for v0 in range(0, v, vb):
            z, w = _tile_logits(h32, weight, bias, v0, v0 + vb, inv_t)  # (R, Vb)
            p = torch.exp(z - lse_c[:, None])  # softmax tile (R, Vb)
            if with_entropy:  # build dz in z's buffer: -p * (g_logp + g_H * (z - lse + H))
                z += shift[:, None]
                z *= gh[:, None]
                z += gl[:, None]
            else:
                z.copy_(gl[:, None].expand_as(z))
            z *= p
            z.neg_()
            del p
            inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
            local = (tgt - v0).clamp(0, z.shape[1] - 1)
            z.scatter_add_(1, local[:, None], torch.where(inside, gl, 0.0)[:, None])  # + g_logp * onehot
            z *= inv_t  # dlogits (R, Vb)
            if d_h is not None:
                d_h[r0 : r0 + rows] += z @ w  # (R, H)
            if d_w is not None:
                d_w[v0 : v0 + vb] += z.T @ h32  # (Vb, H)
            if d_b is not None:
                d_b[v0 : v0 + vb] += z.sum(dim=0)
    return d_h, d_w, d_b


class LinearLogprobTorch(torch.autograd.Function):
    """Chunked PyTorch implementation of the primitive; see the module docstring for the contract."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool):
        inv_t = 1.0 / float(temperature)
        logp, ent, lse = _linear_logprob_fwd(hidden, weight, bias, targets, inv_t, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.inv_t, ctx.with_entropy = inv_t, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        g_ent = g_ent if ctx.with_entropy else None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        d_h, d_w, d_b = _linear_logprob_bwd(
            hidden, weight, bias, targets, lse, ent, g_logp, g_ent, ctx.inv_t, ctx.needs_input_grad[:3]
        )
        cast = lambda d, like: None if d is None else d.to(like.dtype)  # noqa: E731
        return cast(d_h, hidden), cast(d_w, weight), cast(d_b, bias), None, None, None
