"""Launches per call, row-pass bytes per logit and an estimated H200 ratio to the three-matmul
floor for the fused loss at the GPU bench shapes, from what is counted on CPU.

    python bench/launch_model.py            # prints the markdown table of bench/RESULTS.md

Counted (CPU, Triton interpreted; tests/kernels/op_count.py): every op and Triton launch of one
`FusedLinearGRPOLoss` forward + backward (the bench's dapo, beta 0.04, given old / ref log-probs)
at a tiny shape and two budgets, giving launches per chunk and per call; the bytes the row
pass's two kernels load and store per logit; each shape's chunk plan (`fused.chunk_rows`, the
default budget).
Modelled (stated, not measured): H200 at 989 TFLOP/s dense bf16 and 4.8 TB/s; every kernel at
its roofline, time = max(flops / peak, bytes / bandwidth), plus LAUNCH_S per launch. The floor is
the three bf16 GEMMs at M = N (16-bit outputs). Ours, per chunk of R rows: the Z GEMM (fp32
output), the row pass (its counted bytes per logit × R·V), the d_h GEMM and the d_W GEMM
(reading and writing d_W: beta = 1 after the first chunk); "overlapped" is the same with the row
pass hidden behind the GEMMs at the same chunk size (GRPOLossConfig.overlap_streams, which splits
the budget into two buffers: read it at twice the budget).
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))
from op_count import counting  # noqa: E402
from triton_loader import load_backend  # noqa: E402

from fastmgrpo.kernels import FusedLinearGRPOLoss, fused  # noqa: E402

PEAK, BANDWIDTH, LAUNCH_S = 989e12, 4.8e12, 5e-6
BUDGETS = [fused.DEFAULT_MEMORY_BUDGET, 448 * 2**20]  # the default; the most that keeps 0.5 GiB in all
SHAPES = [(8, 1024, 1536, 151936), (8, 1024, 3584, 152064), (16, 2048, 3584, 152064), (64, 256, 640, 262144)]


def _gemm(m, n, k, out_bytes=2, acc_bytes=0):
    """Roofline time of (m, k) @ (k, n) in bf16 with out_bytes outputs (+ acc_bytes read back)."""
    return max(2 * m * n * k / PEAK, (2 * (m * k + k * n) + (out_bytes + acc_bytes) * m * n) / BANDWIDTH)


def counted(tb):
    """(launches per chunk, launches per call outside the chunks, row-pass bytes per logit)."""
    B, L, H, V = 3, 8, 16, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    ids, mask = torch.randint(0, V, (B, L), generator=g), torch.ones(B, L)
    adv, old, ref = torch.randn(B, generator=g), -torch.rand(B, L, generator=g), -torch.rand(B, L, generator=g)
    runs = []
    for rows in (12, 4):
        x.grad = w.grad = None  # a second backward would add into them (two more ops)
        loss_fn = FusedLinearGRPOLoss(beta=0.04, loss_type="dapo", backend="triton", memory_budget=rows * V * 4)
        with counting(tb) as log:
            loss, _ = loss_fn(x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss.backward()
        runs.append((len(log.launches), -(-B * L // rows), log))
    (n1, c1, _), (n2, c2, _) = runs
    per_chunk = (n2 - n1) / (c2 - c1)
    # the row pass with 16-bit products (the GPU case; on CPU the launches above are counted in
    # fp32, where torch has the fp32-output GEMMs the CUDA path uses)
    R = 6
    z = torch.randn(R, 2048, generator=g)
    targets = torch.randint(0, 2048, (R,), generator=g)
    with counting(tb) as log:
        stats = tb.row_stats_(z, targets, False)
        tb.dlogits_(z, targets, stats, torch.randn(R, generator=g), None, 1.0, torch.bfloat16)
    moved = sum(sum(c.values()) for c in log.kernel_bytes.values())
    return per_chunk, n1 - per_chunk * c1, moved / z.numel()


def model(shape, per_chunk, fixed, bytes_per_logit, tb, budget=fused.DEFAULT_MEMORY_BUDGET):
    B, L, H, V = shape
    N = B * L
    plan = fused.Plan(torch.zeros(N, dtype=torch.long), [0, N], False, 1.0, None, tb, budget)
    chunks, _ = fused.chunk_rows(plan, V, torch.bfloat16)
    floor = _gemm(N, V, H) + _gemm(N, H, V) + _gemm(V, H, N)
    gemms = rows_pass = 0.0
    for k, (r0, r1) in enumerate(chunks):
        R = r1 - r0
        gemms += _gemm(R, V, H, out_bytes=4) + _gemm(R, H, V) + _gemm(V, H, R, acc_bytes=2 if k else 0)
        rows_pass += bytes_per_logit * R * V / BANDWIDTH
    launches = fixed + per_chunk * len(chunks)
    serial = gemms + rows_pass + launches * LAUNCH_S
    overlapped = max(gemms, rows_pass) + launches * LAUNCH_S
    return dict(shape=shape, rows=chunks[0][1] - chunks[0][0], chunks=len(chunks), launches=launches,
                serial=serial / floor, overlapped=overlapped / floor, launch_share=launches * LAUNCH_S / floor)


def main():
    tb = load_backend()
    per_chunk, fixed, bpl = counted(tb)
    print(f"counted on CPU: {per_chunk:g} launches per chunk, {fixed:g} per call, "
          f"row pass {bpl:.2f} bytes per logit (fp32 logits read twice, 16-bit dlogits written once)\n")
    print("| (B, L, H, V) | budget (MiB) | rows per chunk | chunks | launches per call | row pass bytes/logit "
          "| est. H200 × floor (serial) | (overlapped) | launches' share of the floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        for budget in BUDGETS:
            m = model(shape, per_chunk, fixed, bpl, tb, budget)
            print(f"| {m['shape']} | {budget >> 20} | {m['rows']} | {m['chunks']} | {m['launches']:.0f} | {bpl:.2f} "
                  f"| {m['serial']:.2f} | {m['overlapped']:.2f} | {100 * m['launch_share']:.1f} % |")


if __name__ == "__main__":
    main()
