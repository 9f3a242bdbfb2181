"""The fused linear + log-softmax + gather (+ entropy) primitive alone: backends and options.

Providers:
    triton_atomic        Triton, backward with fp32 atomics into slab buffers
    triton_atomic_skip   the same with the sparsity skip (skip_eps = 2^-12)
    triton_gemm          Triton, backward storing the dlogits slab, products by cuBLAS (default)
    triton_fwd           Triton forward only (no grad): the old/ref log-prob pass
    torch_chunked        the chunked PyTorch backend (kernels.linear_logprob_torch)
    eager                full (N, V) logits (kernels.reference.reference_linear_logprobs)
    torch_lce            PyTorch's chunked −F.linear_cross_entropy(reduction="none"): logp only
                         (it has no entropy output); skips where torch lacks it
    matmul_floor         h·Wᵀ, dlogits·W, dlogitsᵀ·h
Triton providers need CUDA (the CPU interpreter is far too slow for a benchmark).
Upstream grads: random on logp, and on entropy (with_entropy=True) for every provider but torch_lce.
extra_info as in bench_grpo_loss.py (peak_mem_bytes, working_mem_bytes, ratio_vs_matmul_floor).
"""
import pytest
import torch

from benchutil import CUDA, DEVICE, DTYPE, SHAPES, device_name, matmul_floor_target, measure_against_floor, sync
from benchutil import providers, torch_linear_cross_entropy

PROVIDERS = providers(["triton_atomic", "triton_atomic_skip", "triton_gemm", "triton_fwd", "torch_chunked",
                       "eager", "torch_lce", "matmul_floor"])


def _setup(shape):
    B, L, H, V = shape
    N = B * L
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE).requires_grad_()             # (N, H)
    weight = (torch.randn(V, H, device=DEVICE) * H ** -0.5).to(DTYPE).requires_grad_()  # (V, H)
    targets = torch.randint(0, V, (N,), device=DEVICE)                                  # (N,)
    g_logp = torch.randn(N, device=DEVICE)                                              # (N,)
    g_ent = torch.randn(N, device=DEVICE)                                               # (N,)
    return dict(hidden=hidden, weight=weight, targets=targets, g_logp=g_logp, g_ent=g_ent)


def _target(provider, x):
    h, w, t = x["hidden"], x["weight"], x["targets"]

    def backward(logp, ent):
        h.grad = None
        w.grad = None
        torch.autograd.backward([logp, ent], [x["g_logp"], x["g_ent"]])

    if provider.startswith("triton"):
        if not CUDA:
            pytest.skip("Triton providers need CUDA (the CPU interpreter is not a benchmark)")
        from fastmgrpo.kernels.linear_logprob_triton import (
            LinearLogprobTriton,
            TritonOptions,
        )
        opts = {"triton_atomic": TritonOptions(bwd="atomic"),
                "triton_atomic_skip": TritonOptions(bwd="atomic", skip_eps=2.0 ** -12),
                "triton_gemm": TritonOptions(bwd="gemm"),
                "triton_fwd": TritonOptions()}[provider]
        if provider == "triton_fwd":
            def step():
                with torch.no_grad():
                    LinearLogprobTriton.apply(h, w, None, t, 1.0, False, opts)
                sync()
            return step

        def step():
            backward(*LinearLogprobTriton.apply(h, w, None, t, 1.0, True, opts))
            sync()
        return step

    if provider == "torch_chunked":
        from fastmgrpo.kernels import linear_logprobs

        def step():
            backward(*linear_logprobs(h, w, t, None, 1.0, True, backend="torch"))
            sync()
        return step

    if provider == "eager":
        from fastmgrpo.kernels.reference import reference_linear_logprobs

        def step():
            logp, ent = reference_linear_logprobs(h, w, t)
            backward(logp.float(), ent.float())
            sync()
        return step

    if provider == "torch_lce":
        nll = torch_linear_cross_entropy()

        def step():
            h.grad = None
            w.grad = None
            (-nll(h, w, t)).backward(x["g_logp"])
            sync()
        return step

    if provider == "matmul_floor":
        return matmul_floor_target(x["hidden"], x["weight"])
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-H{}-V{}".format(*s))
def test_linear_logprob(benchmark, shape, provider):
    B, L, H, V = shape
    x = _setup(shape)
    benchmark.group = "linear_logprob N{} H{} V{} {}".format(B * L, H, V, str(DTYPE)[6:])
    benchmark.extra_info.update(device=device_name(), dtype=str(DTYPE), provider=provider,
                                N=B * L, H=H, V=V)
    mean = measure_against_floor(benchmark, lambda: _target(provider, x), x, shape, provider)
    flops = 2 * B * L * H * V * (1 if provider == "triton_fwd" else 3)
    benchmark.extra_info.update(
        useful_tflops=round(flops / mean / 1e12, 2),
    )
