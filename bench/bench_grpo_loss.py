"""Fused linear + GRPO loss, forward + backward: fastmgrpo vs eager PyTorch vs Liger.

Providers (one setup factory, `_setup`):
    fastmgrpo            FusedLinearGRPOLoss, default backend (Triton on CUDA, chunked torch on CPU)
    fastmgrpo_torch      the same with backend="torch" (CUDA only: on CPU it is `fastmgrpo`)
    fastmgrpo_overlap    the same with overlap_streams=True and a 512 MiB budget: two buffers of
                         the default chunk, logits GEMMs on a second stream (CUDA only)
    frozen_head          `fastmgrpo` with a head that needs no gradient (LoRA): no d_W GEMM and no
                         (V, H) gradient; extra_info ratio_vs_frozen_head_floor is its time over
                         matmul_floor_frozen_head's
    eager                full (N, V) logits in PyTorch (kernels.reference.reference_grpo_loss)
    liger_chunked        liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (compiled on CUDA)
    liger_triton_logits  h·Wᵀ logits + liger_kernel triton_grpo_loss (CUDA only)
    torch_lce            PyTorch's chunked F.linear_cross_entropy(reduction="none") weighted by
                         A·mask/n: the on-policy GRPO gradient without KL or clipping (the O(N)
                         parts other providers add are negligible); skips where torch lacks it
    matmul_floor         h·Wᵀ, dlogits·W, dlogitsᵀ·h: the three GEMMs any exact method needs
    matmul_floor_frozen_head  h·Wᵀ, dlogits·W: the two a frozen head needs

Every provider but torch_lce uses loss_type="dapo", beta=0.04 with given ref/old log-probs, T=1.
extra_info: peak_mem_bytes (extra peak of one fwd+bwd, including the gradients it returns),
working_mem_bytes (that minus the returned gradients' bytes), ratio_vs_matmul_floor (mean time / three-matmul floor time on the same shape), tokens_per_s.
"""
import pytest
import torch

from benchutil import CUDA, DEVICE, DTYPE, cases, matmul_floor_target, median_time, run_case, sync
from benchutil import providers, torch_linear_cross_entropy

PROVIDERS = providers(["fastmgrpo", "fastmgrpo_torch", "fastmgrpo_overlap", "frozen_head", "eager",
                       "liger_chunked", "liger_triton_logits", "torch_lce", "matmul_floor",
                       "matmul_floor_frozen_head"])
BETA, LOSS_TYPE = 0.04, "dapo"


def _setup(shape):
    B, L, H, V = shape
    hidden = torch.randn(B, L, H, device=DEVICE, dtype=DTYPE).requires_grad_()   # (B, L, H)
    weight = (torch.randn(V, H, device=DEVICE) * H ** -0.5).to(DTYPE).requires_grad_()  # (V, H)
    ids = torch.randint(0, V, (B, L), device=DEVICE)                                # (B, L)
    lengths = torch.randint(L // 2, L + 1, (B,), device=DEVICE)
    mask = (torch.arange(L, device=DEVICE)[None, :] < lengths[:, None]).long()      # (B, L)
    adv = torch.randn(B, device=DEVICE)                                             # (B,)
    base = -torch.rand(B, L, device=DEVICE) * 5                                     # (B, L) fp32
    old, ref = base + 0.01 * torch.randn_like(base), base + 0.01 * torch.randn_like(base)
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def _eager_loss(x):
    try:
        from fastmgrpo.kernels.reference import reference_grpo_loss
    except ImportError:  # a tiny stand-in: token-level dapo with k3 KL
        reference_grpo_loss = None
    if reference_grpo_loss is not None:
        return reference_grpo_loss(x["hidden"], x["weight"], x["ids"], x["mask"], x["adv"],
                                   ref_logps=x["ref"], old_logps=x["old"], beta=BETA,
                                   loss_type=LOSS_TYPE)[0]
    logits = (x["hidden"] @ x["weight"].T).float()                                  # (B, L, V)
    logp = torch.log_softmax(logits, -1).gather(-1, x["ids"][..., None])[..., 0]
    coef = torch.exp(logp - x["old"])
    a = x["adv"][:, None]
    per_tok = -torch.min(coef * a, coef.clamp(0.8, 1.2) * a)
    d = x["ref"] - logp
    per_tok = per_tok + BETA * (torch.exp(d) - d - 1)
    m = x["mask"].float()
    return (per_tok * m).sum() / m.sum()


def _module_step(fn, x, zero):
    """fwd+bwd of a Liger-interface fused loss module (ours is a drop-in, so one body serves both)."""
    h, w = x["hidden"], x["weight"]

    def step():
        zero()
        loss, _ = fn(h, w, x["ids"], x["mask"], x["adv"], ref_per_token_logps=x["ref"],
                     old_per_token_logps=x["old"])
        loss.backward()
        sync()
    return step


def _make_target(provider, x):
    """A zero-argument callable doing one fwd(+bwd) pass, ending in a device sync."""
    h, w = x["hidden"], x["weight"]

    def zero():
        h.grad = None
        w.grad = None

    if provider in ("fastmgrpo", "fastmgrpo_torch", "fastmgrpo_overlap"):
        from fastmgrpo.kernels import FusedLinearGRPOLoss
        if provider != "fastmgrpo" and not CUDA:
            pytest.skip("CUDA only (on CPU the default backend is the torch backend, with no streams)")
        loss_fn = FusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE,
                                      backend="torch" if provider == "fastmgrpo_torch" else None)
        if provider == "fastmgrpo_overlap":  # attributes as in Liger; the config picks them up
            loss_fn.overlap_streams, loss_fn.memory_budget = True, 2 * loss_fn.memory_budget
        return _module_step(loss_fn, x, zero)

    if provider == "frozen_head":
        from fastmgrpo.kernels import FusedLinearGRPOLoss
        return _module_step(FusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE), {**x, "weight": w.detach()}, zero)

    if provider == "eager":
        def step():
            zero()
            _eager_loss(x).backward()
            sync()
        return step

    if provider == "liger_chunked":
        LigerFusedLinearGRPOLoss = pytest.importorskip(
            "liger_kernel.chunked_loss", reason="liger-kernel is not installed").LigerFusedLinearGRPOLoss
        return _module_step(LigerFusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE, compiled=CUDA,
                                                     use_ref_model=True), x, zero)

    if provider == "liger_triton_logits":
        if not CUDA:
            pytest.skip("liger triton_grpo_loss is a CUDA Triton kernel (no CPU path)")
        triton_grpo_loss = pytest.importorskip(
            "liger_kernel.transformers.grpo_loss", reason="liger-kernel is not installed").triton_grpo_loss
        # logits (B, L, V) score completions (B, L-1): Liger drops the last position
        old, ref, ids, mask = (x[k][:, :-1].contiguous() for k in ("old", "ref", "ids", "mask"))

        def step():
            zero()
            logits = h @ w.T                                # (B, L, V)
            loss, _ = triton_grpo_loss(logits, old, ref, ids, x["adv"], mask,
                                       temperature=1.0, beta=BETA, eps_low=0.2, eps_high=0.2,
                                       loss_type=LOSS_TYPE, reduce=True)
            loss.backward()
            sync()
        return step

    if provider == "torch_lce":
        nll = torch_linear_cross_entropy(x["ids"].numel(), x["weight"].shape[0])
        m = x["mask"].float()
        per_token = (x["adv"][:, None] * m / m.sum()).reshape(-1)   # (N,) dloss/dnll = −dloss/dlogp

        def step():
            zero()
            (nll(h.reshape(-1, h.shape[-1]), w, x["ids"].reshape(-1)) * per_token).sum().backward()
            sync()
        return step

    if provider in ("matmul_floor", "matmul_floor_frozen_head"):
        return matmul_floor_target(x["hidden"], x["weight"], frozen_head=provider == "matmul_floor_frozen_head")
    raise ValueError(provider)


@cases(PROVIDERS)
def test_grpo_loss_fwd_bwd(benchmark, shape, provider):
    B, L, H, V = shape
    x = _setup(shape)
    mean = run_case(benchmark, "grpo_loss B{} L{} H{} V{}".format(B, L, H, V), lambda: _make_target(provider, x),
                    x, shape, provider, B=B, L=L, H=H, V=V)
    if provider == "frozen_head":
        floor = median_time(matmul_floor_target(x["hidden"], x["weight"], frozen_head=True), reps=3 if CUDA else 5)
        benchmark.extra_info.update(frozen_head_floor_s=floor, ratio_vs_frozen_head_floor=round(mean / floor, 3))
