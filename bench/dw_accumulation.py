"""Error of the LM head's gradient against float64 when d_W accumulates across chunks in bf16
(the weight's dtype) or in an fp32 buffer, next to eager bf16 full logits.

    python bench/dw_accumulation.py [--rows N] [--hidden H] [--vocab V] [--chunks C ...]

On-policy bnpo GRPO gradient (loss normalised by the token count), bf16 inputs, torch backend.
Prints one line per (chunks, accumulation) with the relative norm error of d_W and of its
non-target rows, and the fp32 buffer's extra memory at this V·H.
"""
import argparse

import torch

from fastmgrpo.kernels import GRPOLossConfig, packed_grpo_loss
from fastmgrpo.kernels.reference import reference_linear_logprobs


def _grad_w(h, w, targets, cu, adv, dtype, **cfg):
    w = w.to(dtype).requires_grad_()
    if cfg:
        loss, _ = packed_grpo_loss(h.to(dtype), w, targets, cu, adv, config=GRPOLossConfig(beta=0.0, loss_type="bnpo",
                                                                                            **cfg), backend="torch")
    else:  # eager full logits in `dtype`: -sum(A * logp) / N (the on-policy bnpo gradient)
        logp, _ = reference_linear_logprobs(h.to(dtype), w, targets)
        seg = torch.repeat_interleave(torch.arange(len(adv)), cu[1:] - cu[:-1])
        loss = -(adv[seg].to(logp.dtype) * logp).sum() / len(targets)
    (g,) = torch.autograd.grad(loss, [w])
    return g.double()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    torch.manual_seed(0)
    N, H, V = args.rows, args.hidden, args.vocab
    h = torch.randn(N, H).bfloat16().double()
    w = (torch.randn(V, H) * 2 / H**0.5).bfloat16().double()
    targets = torch.randint(0, V, (N,))
    cu = torch.arange(0, N + 1, 256, dtype=torch.int32)
    adv = torch.randn(len(cu) - 1)
    gold = _grad_w(h, w, targets, cu, adv, torch.float64)
    other = torch.ones(V, dtype=torch.bool)
    other[targets.unique()] = False

    def rel(g, mask=slice(None)):
        return ((g[mask] - gold[mask]).norm() / gold[mask].norm()).item()

    eager = _grad_w(h, w, targets, cu, adv, torch.bfloat16)
    print(f"N={N} H={H} V={V} bf16; fp32 d_W buffer = {V * H * 4 / 2**20:.1f} MiB here "
          f"(Gemma 3 262144x640: 640 MiB, Qwen 152064x3584: 2079 MiB)")
    print(f"eager bf16: d_W rel err {rel(eager):.2e}, non-target rows {rel(eager, other):.2e}")
    for chunks in args.chunks:
        budget = -(-N // chunks) * V * 6  # fp32 logits + the bf16 dlogits copy per row
        for fp32 in (False, True):
            g = _grad_w(h, w, targets, cu, adv, torch.bfloat16, memory_budget=budget, fp32_weight_grad=fp32)
            name = "fp32 buffer" if fp32 else "bf16 (weight dtype)"
            print(f"chunks={chunks:3d} {name:20s}: d_W rel err {rel(g):.2e}, non-target rows {rel(g, other):.2e}")


if __name__ == "__main__":
    main()
