"""The forward-only log-prob pass (old / reference log-probs under no_grad), never training.

Providers:
    fastmgrpo            token_logprobs, default backend (Triton's one-matmul kernel with the
                         log-sum-exp fused in on CUDA, chunked PyTorch on CPU)
    fastmgrpo_torch      token_logprobs forced to the chunked PyTorch backend (CUDA only)
    eager                full (N, V) logits (kernels.reference.reference_linear_logprobs)
    torch_lce            PyTorch's chunked −F.linear_cross_entropy(reduction="none"); skips where
                         torch lacks it
    matmul_floor         h·Wᵀ, dlogits·W, dlogitsᵀ·h (recorded, not timed as a provider here)
Log-probs only (no entropy), so every provider computes the same thing.
extra_info as in bench_grpo_loss.py; the floor of a forward-only pass is one of the three
matmuls, so `ratio_vs_one_matmul` = 3 × `ratio_vs_matmul_floor` is the number to read.
"""
import pytest
import torch

from benchutil import CUDA, DEVICE, DTYPE, cases, matmul_floor_target, run_case, sync
from benchutil import providers, torch_linear_cross_entropy

PROVIDERS = providers(["fastmgrpo", "fastmgrpo_torch", "eager", "torch_lce", "matmul_floor"])


def _setup(shape):
    B, L, H, V = shape
    N = B * L
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE)                      # (N, H)
    weight = (torch.randn(V, H, device=DEVICE) * H ** -0.5).to(DTYPE)           # (V, H)
    targets = torch.randint(0, V, (N,), device=DEVICE)                          # (N,)
    return dict(hidden=hidden, weight=weight, targets=targets)


def _no_grad_step(fn, *args, **kwargs):
    """A benchmark target: fn(*args, **kwargs) under no_grad, then a device sync."""
    def step():
        with torch.no_grad():
            fn(*args, **kwargs)
        sync()
    return step


def _target(provider, x):
    h, w, t = x["hidden"], x["weight"], x["targets"]
    if provider.startswith("fastmgrpo"):
        if provider == "fastmgrpo_torch" and not CUDA:
            pytest.skip("on CPU `fastmgrpo` is the torch backend already")
        from fastmgrpo.kernels import token_logprobs
        return _no_grad_step(token_logprobs, h, w, t, backend="torch" if provider == "fastmgrpo_torch" else None)
    if provider == "eager":
        from fastmgrpo.kernels.reference import reference_linear_logprobs
        return _no_grad_step(reference_linear_logprobs, h, w, t)
    if provider == "torch_lce":
        return _no_grad_step(torch_linear_cross_entropy(t.numel(), w.shape[0]), h, w, t)

    if provider == "matmul_floor":
        return matmul_floor_target(h, w)
    raise ValueError(provider)


@cases(PROVIDERS)
def test_linear_logprob(benchmark, shape, provider):
    B, L, H, V = shape
    x = _setup(shape)
    mean = run_case(benchmark, "logprobs_fwd N{} H{} V{}".format(B * L, H, V), lambda: _target(provider, x), x,
                    shape, provider, N=B * L, H=H, V=V)
    benchmark.extra_info.update(
        ratio_vs_one_matmul=round(3 * benchmark.extra_info["ratio_vs_matmul_floor"], 3),
        useful_tflops=round(2 * B * L * H * V / mean / 1e12, 2),
    )
