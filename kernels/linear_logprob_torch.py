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


class LinearLogprobTorch(torch.autograd.Function):
    """Chunked PyTorch implementation of the primitive; see the module docstring for the contract."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool):
        n, v = hidden.shape[0], weight.shape[0]
        rows, vb = _tile_sizes(n, v, hidden.shape[1], weight.dtype)
        inv_t = 1.0 / float(temperature)
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
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.inv_t, ctx.with_entropy = inv_t, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not ctx.with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        n, v = hidden.shape[0], weight.shape[0]
        rows, vb = _tile_sizes(n, v, hidden.shape[1], weight.dtype)
        zeros = lse.new_zeros(n)
        g_logp = zeros if g_logp is None else g_logp.float()  # (N,)
        g_ent = zeros if g_ent is None else g_ent.float()  # (N,)
        d_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        d_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        d_b = torch.zeros(v, device=weight.device, dtype=torch.float32) if need_b and bias is not None else None
        for r0 in range(0, n, rows):
            h32 = hidden[r0 : r0 + rows].float()  # (R, H)
            tgt, lse_c = targets[r0 : r0 + rows], lse[r0 : r0 + rows]
            gl, gh = g_logp[r0 : r0 + rows], g_ent[r0 : r0 + rows]  # (R,)
            shift = (ent[r0 : r0 + rows] - lse_c) if ctx.with_entropy else None  # H - lse (R,)
            for v0 in range(0, v, vb):
                z, w = _tile_logits(h32, weight, bias, v0, v0 + vb, ctx.inv_t)  # (R, Vb)
                p = torch.exp(z - lse_c[:, None])  # softmax tile (R, Vb)
                # dz = g_logp*(onehot - p) + g_H*(-p*(z - lse + H)), built in place in z's buffer
                if shift is not None:
                    z += shift[:, None]
                    z *= gh[:, None]
                    z += gl[:, None]
                else:
                    z.copy_(gl[:, None].expand_as(z))
                z *= p
                z.neg_()  # z now holds dz without the one-hot term
                del p
                inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
                local = (tgt - v0).clamp(0, z.shape[1] - 1)
                z.scatter_add_(1, local[:, None], torch.where(inside, gl, 0.0)[:, None])
                z *= ctx.inv_t  # dlogits = dz / T
                if d_h is not None:
                    d_h[r0 : r0 + rows] += z @ w  # (R, H)
                if d_w is not None:
                    d_w[v0 : v0 + vb] += z.T @ h32  # (Vb, H)
                if d_b is not None:
                    d_b[v0 : v0 + vb] += z.sum(dim=0)
        return (
            d_h.to(hidden.dtype) if d_h is not None else None,
            d_w.to(weight.dtype) if d_w is not None else None,
            d_b.to(bias.dtype) if d_b is not None else None,
            None,
            None,
            None,
        )
