"""Triton backend: the forward-only log-prob kernel and the row-pass kernels on their own.

On a machine without CUDA the kernels run under the Triton interpreter at tiny shapes and are
compiled ahead of time for sm_90 (the real compiler path); on CUDA they run compiled. The fused
loss through this backend is checked in test_fused.py. References: float64 full logits
(fastmgrpo/kernels/reference.py); for 16-bit inputs err ≤ 2·err(eager in that dtype) + atol.
"""
import importlib.util

import pytest
import torch
from triton_loader import CUDA, DEV, load_backend, load_compiled_copy

from fastmgrpo.kernels import token_logprobs
from fastmgrpo.kernels import torch_backend
from fastmgrpo.kernels.reference import reference_linear_logprobs

tb = load_backend()


def _inputs(seed, N, H, V, dtype, has_bias):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 3 / H**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if has_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    return hidden, weight, bias, targets


@pytest.mark.parametrize("dtype,has_bias,T,splits", [
    (torch.float32, True, 0.7, None),
    (torch.float32, False, 1.0, 3),
    (torch.bfloat16, True, 1.3, None),
    (torch.float16, False, 0.9, 2),
])
def test_forward_kernel_matches_float64(dtype, has_bias, T, splits):
    hidden, weight, bias, targets = _inputs(21, 37, 24, 301, dtype, has_bias)
    dev = [None if x is None else x.to(DEV) for x in (hidden, weight, bias, targets)]
    logp, ent = tb.linear_logprob_fwd(*dev, T, True, tb.TritonOptions(splits=splits))
    b64 = None if bias is None else bias.double()
    gold = reference_linear_logprobs(hidden.double(), weight.double(), targets, b64, T)
    if dtype == torch.float32:
        atol = [1e-5, 1e-5]
    else:  # eager full logits in the input dtype, on the same rounded inputs
        eager = reference_linear_logprobs(hidden, weight, targets, bias, T)
        atol = [2 * (e.double() - g).abs().max().item() + 1e-5 for e, g in zip(eager, gold)]
    for name, ours, ref, tol in zip(("logp", "entropy"), (logp, ent), gold, atol):
        err = (ours.double().cpu() - ref).abs().max().item()
        assert err <= tol, (name, err, tol)
    no_ent = tb.linear_logprob_fwd(*dev, T, False, tb.TritonOptions(splits=splits))
    assert no_ent[1] is None and torch.equal(no_ent[0], logp)


def test_token_logprobs_triton_matches_torch():
    hidden, weight, bias, targets = _inputs(5, 12, 16, 700, torch.float32, True)
    dev = [x.to(DEV) for x in (hidden, weight, bias, targets)]
    lp_t, ent_t = token_logprobs(dev[0].view(3, 4, 16), dev[1], dev[3].view(3, 4), 0.8, dev[2], True, backend="triton")
    lp, ent = token_logprobs(hidden.view(3, 4, 16), weight, targets.view(3, 4), 0.8, bias, True, backend="torch")
    torch.testing.assert_close(lp_t.cpu(), lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_t.cpu(), ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_row_pass_matches_torch_backend(with_entropy, out_dtype):
    """Row stats and dlogits (written into the logits' storage) equal the torch backend's."""
    g = torch.Generator().manual_seed(3)
    R, V = 9, 2000  # two row blocks, a partial last one
    z0 = torch.randn(R, V, generator=g) * 4
    targets = torch.randint(0, V, (R,), generator=g)
    g_logp, g_ent = torch.randn(R, generator=g), torch.randn(R, generator=g) if with_entropy else None
    results = []
    for mod in (tb, torch_backend):
        z = z0.clone().to(DEV)
        stats = mod.row_stats_(z, targets.to(DEV), with_entropy, inv_t=0.5)
        dz = mod.dlogits_(z, targets.to(DEV), stats, g_logp.to(DEV), None if g_ent is None else g_ent.to(DEV),
                          0.5, out_dtype)
        assert dz.shape == (R, V) and dz.dtype == out_dtype
        results.append([stats.logp.cpu(), None if stats.entropy is None else stats.entropy.cpu(), dz.float().cpu()])
    (lp, ent, dz), (lp_r, ent_r, dz_r) = results
    torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=1e-5)
    if with_entropy:
        torch.testing.assert_close(ent, ent_r, atol=1e-5, rtol=1e-5)
    atol = 1e-6 if out_dtype == torch.float32 else 2.0 ** -8 * dz_r.abs().max().item()
    torch.testing.assert_close(dz, dz_r, atol=atol, rtol=1e-2 if out_dtype != torch.float32 else 1e-5)


@pytest.mark.skipif(not CUDA, reason="the in-place race needs real warps (the interpreter is sequential)")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_cuda_in_place_bf16_dlogits_equal_fp32_path_bit_for_bit(with_entropy):
    """The 16-bit dlogits written into the fp32 logits they are computed from (warps racing ahead
    would clobber logits not yet read) equal the fp32 path's dlogits rounded to bf16, bit for bit,
    over many runs at Qwen's V = 151,936."""
    R, V = 64, 151936
    g = torch.Generator(device="cuda").manual_seed(19)
    z0 = torch.randn(R, V, device="cuda", generator=g) * 4
    targets = torch.randint(0, V, (R,), device="cuda", generator=g)
    g_logp = torch.randn(R, device="cuda", generator=g)
    g_ent = torch.randn(R, device="cuda", generator=g) if with_entropy else None
    z = z0.clone()
    stats = tb.row_stats_(z, targets, with_entropy, inv_t=0.5)
    want = tb.dlogits_(z, targets, stats, g_logp, g_ent, 0.5, torch.float32).to(torch.bfloat16)
    for _ in range(50):
        z.copy_(z0)
        got = tb.dlogits_(z, targets, stats, g_logp, g_ent, 0.5, torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_long_sequence_and_memory():
    """128k rows on a 1-D grid; the fused loss's working memory stays under the budget + 10%."""
    from fastmgrpo.kernels import GRPOLossConfig, packed_grpo_loss
    N, H, V = 131072, 64, 4096
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    cu = torch.tensor([0, N // 2, N], device="cuda", dtype=torch.int32)
    cfg = GRPOLossConfig(beta=0.0, loss_type="bnpo", memory_budget=64 * 2**20)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = packed_grpo_loss(hidden, weight, targets, cu, torch.tensor([1.0, -1.0], device="cuda"), config=cfg)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (N * H + V * H) * 2
    assert extra <= 1.1 * cfg.memory_budget + 16 * N, extra
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()


# ----------------------------------------------------------------------------------------
# No GPU: compile the kernels ahead of time for sm_90 (the real compiler path, not the
# interpreter), with the divisibility hints a launch with H % 16 == 0 gets.
# ----------------------------------------------------------------------------------------
def _aot_compile(kernel, args, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(args, **{k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in ("H", "V", "z_stride")}
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.skipif(CUDA, reason="on CUDA the compiled kernels run for real above")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm90(dtype):
    """The forward kernel, both row-pass kernels and the sequence kernel compile for Hopper with the
    GPU defaults."""
    import triton
    import triton.language as tl
    if not hasattr(triton, "compile") or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("no NVIDIA backend in this triton build")
    if type(tl.standard.sum).__name__ == "InterpretedFunction":
        pytest.skip("triton itself was imported under TRITON_INTERPRET=1")
    mod = load_compiled_copy()
    tdt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
    bm, bv, bk, warps, stages = mod._config(tdt, torch.device("cuda"), mod.DEFAULT_OPTIONS)
    p, f = "*" + dtype, "*fp32"
    fwd_args = dict(h_ptr=p, w_ptr=p, b_ptr=p, tgt_ptr="*i64", m_out=f, s_out=f, t_out=f, zt_out=f, N="i32",
                    V="i32", H="i32", inv_temp="fp32", m_blocks="i32", blocks_per_split="i32")
    blocks = dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                  UPCAST=False, INTERP=False)
    try:
        _aot_compile(mod._linear_logprob_fwd_kernel, fwd_args, dict(HAS_BIAS=True, WITH_ENTROPY=True, **blocks),
                     warps, stages)
    except (TypeError, ImportError, AttributeError) as err:  # API drift across triton versions
        pytest.skip(f"ahead-of-time compile API unavailable: {err}")
    stats_args = dict(z_ptr=f, z_stride="i64", tgt_ptr="*i64", lse_ptr=f, logp_ptr=f, ent_ptr=f, V="i32",
                      inv_temp="fp32",
                      **dict.fromkeys(("old_ptr", "ref_ptr", "adv_ptr", "w_ptr", "m_ptr", "vllm_ptr", "g_ptr", "ge_ptr",
                                       "val_ptr"), f), val_stride="i32",
                      **dict.fromkeys(("eps_low", "eps_high", "delta", "tau_pos", "tau_neg", "beta", "entropy_coef"),
                                      "fp32"))
    options = dict.fromkeys(("HAS_OLD", "HAS_REF", "HAS_VLLM", "HAS_DELTA", "HAS_BETA", "BIAS_CORRECTION", "HAS_GENT"),
                            True)
    seq_args = dict(starts_ptr="*i64", row0="i32", logp_ptr=f, ent_ptr=f,
                    **dict.fromkeys(("old_ptr", "ref_ptr", "adv_ptr", "tmask_ptr", "w_ptr", "m_ptr", "vllm_ptr",
                                     "len_ptr", "adv_seq_ptr", "vlog_ptr", "g_ptr", "ge_ptr", "val_ptr"), f),
                    val_stride="i32", **dict.fromkeys(("eps_low", "eps_high", "delta", "tau_pos", "tau_neg", "beta",
                                                       "entropy_coef", "k_pos", "lam_pos", "k_neg", "lam_neg",
                                                       "log_eps"), "fp32"))
    for loss, ratio in ((0, True), (mod.LOSS_CODES["vespo"], False)):  # GSPO's clip, VESPO
        _aot_compile(mod._sequence_terms_kernel, seq_args,
                     dict(WITH_ENTROPY=True, LOSS=loss, SEQ_RATIO=ratio, HAS_VLOG=not ratio, BLOCK=mod._SEQUENCE_BLOCK,
                          INTERP=False, **options), 4, 1)
    for loss in mod.LOSS_CODES.values():  # the closed-form loss folded in, every option on
        _aot_compile(mod._row_stats_kernel, stats_args,
                     dict(WITH_ENTROPY=True, BLOCK_V=mod._ROW_BLOCK, INTERP=False, FOLD=True, LOSS=loss,
                          **options), 8, 1)
    dl_args = dict(z_ptr=f, z_stride="i64", tgt_ptr="*i64", lse_ptr=f, ent_ptr=f, g_ptr=f, ge_ptr=f, V="i32",
                   inv_temp="fp32")
    _aot_compile(mod._dlogits_kernel, dl_args,
                 dict(OUT_DTYPE=tl.bfloat16 if dtype == "bf16" else tl.float32, HAS_GENT=True,
                      BLOCK_V=mod._ROW_BLOCK), 8, 1)
