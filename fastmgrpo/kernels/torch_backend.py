"""PyTorch row pass over one chunk of fp32 logits (the CPU backend and the reference backend).

A backend of the fused loss (``fused.py``) provides two in-place functions on a chunk
``z`` (R, V) fp32 holding h·Wᵀ + b (the logits are z · inv_t, inv_t = 1 / T):

    state = row_stats_(z, targets, with_entropy, out, fold, inv_t) -> RowStats (logp, entropy, state)
    dz    = dlogits_(z, targets, stats, g_logp, g_entropy, inv_t, out_dtype) -> (R, V) out_dtype

``dlogits_`` returns d loss / d (h·Wᵀ + b), the chunk's logits before the temperature, in the
dtype of the products that follow (it may alias ``z``'s storage). Math, per row (p = softmax(z)):
    logp = z[t] − lse,  H = −Σ p·log p,
    dz = g·(onehot − p) − g_H·p·(log p + H),  dlogits = dz / T.

Here ``row_stats_`` leaves log p in ``z`` (one in-place log-softmax: no (R, V) temporaries), and
``dlogits_`` turns it into p and then into dlogits in place.
"""

from dataclasses import dataclass

import torch

FOLDS_LOSS = False  # the loss's closed-form gradient runs in torch between the two passes

# Row block of the entropy terms: their (rows, V) temporaries stay ≤ _ENTROPY_ROWS·V·4 bytes.
ENTROPY_ROWS = 64


@dataclass
class RowStats:
    """Per-row results of the row pass: (R,) fp32 each; entropy None when not asked for."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None = None  # Triton backend only (z keeps the logits there)


def extra_bytes_per_row(vocab: int, dtype: torch.dtype) -> int:
    """Bytes per chunk row beyond the fp32 logits: a 16-bit dlogits copy for the products."""
    return 0 if dtype == torch.float32 else vocab * torch.finfo(dtype).bits // 8


def row_stats_(z: torch.Tensor, targets: torch.Tensor, with_entropy: bool, out=None, fold=None,
               inv_t: float = 1.0) -> RowStats:
    """Target log-probs (and entropy) of each row of logits z·inv_t; z (R, V) fp32 becomes
    log_softmax(z·inv_t) in place.

    out: (logp (R,), entropy (R,) or None) fp32 to write them into (else new tensors). fold must
    be None: this backend leaves the loss's gradient to the caller (FOLDS_LOSS is False)."""
    assert fold is None, "the torch backend does not fold the loss into its row pass"
    logp_out, ent_out = out if out is not None else (None, None)
    if inv_t != 1.0:
        z.mul_(inv_t)
    torch._log_softmax(z, 1, False, out=z)  # in place (row max and sum read z before the write)
    logp = torch.gather(z, 1, targets[:, None], out=None if logp_out is None else logp_out[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        entropy = torch.empty_like(logp) if ent_out is None else ent_out
        for r0 in range(0, z.shape[0], ENTROPY_ROWS):
            blk = z[r0 : r0 + ENTROPY_ROWS]
            torch.sum(blk.exp().mul_(blk), 1, out=entropy[r0 : r0 + ENTROPY_ROWS]).neg_()
    return RowStats(logp, entropy)


def dlogits_(z, targets, stats: RowStats, g_logp, g_entropy, inv_t: float, out_dtype) -> torch.Tensor:
    """dlogits (R, V) in out_dtype from log p held in z (see the module docstring); z is overwritten."""
    g = g_logp * inv_t  # (R,)
    if g_entropy is None:
        z.exp_()
        z.mul_(-g[:, None])
    else:
        ge = g_entropy * inv_t
        for r0 in range(0, z.shape[0], ENTROPY_ROWS):
            blk = z[r0 : r0 + ENTROPY_ROWS]
            rows = slice(r0, r0 + blk.shape[0])
            p = blk.exp()
            # -p·(g + g_H·(log p + H)) built in blk's own storage
            blk.add_(stats.entropy[rows, None]).mul_(ge[rows, None]).add_(g[rows, None]).mul_(p).neg_()
    z.scatter_add_(1, targets[:, None], g[:, None])  # + g·onehot
    return z if out_dtype == torch.float32 else z.to(out_dtype)
