"""Triton backend of the fused linear + log-softmax + gather (+ entropy) primitive.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1)
on CPU tensors at tiny shapes; on CUDA the same checks run compiled, plus real-ish shapes.

The interpreter is chosen when ``triton.jit`` decorates a kernel (module import time), so the
variable is set only while this file imports (or re-imports) the kernel module and is restored
afterwards: other test files and an earlier import of the module cannot change the outcome.

The reference is a float64 naive full-logits computation written here. For 16-bit inputs the
check is err(triton) ≤ 2·err(naive torch in that dtype) + atol, both against float64 on the
same (rounded) inputs.
"""
import importlib
import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
_MOD = "fastmgrpo.kernels.linear_logprob_triton"


def _load_kernel_module():
    if CUDA:
        return importlib.import_module(_MOD)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get(_MOD) or importlib.import_module(_MOD)
        if type(mod._linear_logprob_fwd_kernel).__name__ != "InterpretedFunction":
            mod = importlib.reload(mod)  # imported earlier without the interpreter
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert type(mod._linear_logprob_fwd_kernel).__name__ == "InterpretedFunction"
    return mod


llt = _load_kernel_module()
DEV = "cuda" if CUDA else "cpu"


# ----------------------------------------------------------------------------------------
# float64 naive reference and helpers
# ----------------------------------------------------------------------------------------
def naive(hidden, weight, bias, targets, temperature, with_entropy):
    """Full logits in the inputs' dtype (no upcast): the 'naive torch' baseline and, in
    float64, the reference."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z / temperature                                          # (N, V)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent


def make_inputs(N, H, V, dtype, has_bias, device=DEV, w_scale=1.0):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * w_scale / H ** 0.5 * 3).to(dtype)
    bias = torch.randn(V, device=device).to(dtype) if has_bias else None
    targets = torch.randint(0, V, (N,), device=device)
    targets[0], targets[-1] = 0, V - 1                             # vocabulary edges
    return hidden, weight, bias, targets


def run(fn, hidden, weight, bias, targets, T, with_entropy, g_logp, g_ent, dtype=None):
    """Forward + backward with upstream grads; returns (logp, ent, dh, dW, db) as float64."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    logp, ent = fn(leaves[0], leaves[1], leaves[2], targets, T, with_entropy)
    loss = (logp.double() * g_logp).sum()
    if with_entropy:
        loss = loss + (ent.double() * g_ent).sum()
    loss.backward()
    outs = [logp, ent if with_entropy else None] + [t.grad if t is not None else None
                                                      for t in leaves]
    return [o.double() if o is not None else None for o in outs]


def triton_fn(opts=None):
    def fn(h, w, b, t, T, with_entropy):
        return llt.LinearLogprobTriton.apply(h, w, b, t, T, with_entropy, opts)
    return fn


def max_err(a, b):
    return (a - b).abs().max().item()


NAMES = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")


def check_against_reference(N, H, V, dtype, has_bias, T, with_entropy, opts=None):
    hidden, weight, bias, targets = make_inputs(N, H, V, dtype, has_bias)
    g_logp = torch.randn(N, device=DEV, dtype=torch.float64)
    g_ent = torch.randn(N, device=DEV, dtype=torch.float64)
    ref = run(naive, hidden, weight, bias, targets, T, with_entropy, g_logp, g_ent,
              dtype=torch.float64)
    out = run(triton_fn(opts), hidden, weight, bias, targets, T, with_entropy, g_logp, g_ent)
    assert out[0].shape == (N,) and out[0].isfinite().all()
    if dtype == torch.float32:
        for name, o, r in zip(NAMES, out, ref):
            if r is None:
                assert o is None, name
                continue
            tol = 2e-5 * max(1.0, r.abs().max().item())
            assert max_err(o, r) <= tol, (name, max_err(o, r), tol)
    else:
        base = run(naive, hidden, weight, bias, targets, T, with_entropy, g_logp, g_ent)
        for name, o, b, r in zip(NAMES, out, base, ref):
            if r is None:
                assert o is None, name
                continue
            atol = 1e-2 * max(1.0, r.abs().max().item())
            assert max_err(o, r) <= 2 * max_err(b, r) + atol, (name, max_err(o, r), max_err(b, r))
    return out


# ----------------------------------------------------------------------------------------
# Tests (tiny shapes that do not divide the interpreter blocks 16/32/32)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,has_bias,T,with_entropy,bwd", [
    (torch.float32, True, 0.7, True, "atomic"),
    (torch.float32, False, 1.0, False, None),
    (torch.bfloat16, True, 1.3, True, "atomic"),
    (torch.bfloat16, True, 1.3, True, None),
    (torch.bfloat16, False, 0.7, False, "atomic"),
    (torch.float16, True, 1.0, True, None),
])
def test_matches_float64_reference(dtype, has_bias, T, with_entropy, bwd):
    """bwd None is the default mode ("gemm": dlogits slab stored, products by matmuls)."""
    check_against_reference(37, 24, 301, dtype, has_bias, T, with_entropy,
                            llt.TritonOptions(bwd=bwd))


@pytest.mark.parametrize("bwd", ["atomic", "gemm"])
def test_large_vocab_bf16(bwd):
    check_against_reference(20, 40, 1999, torch.bfloat16, True, 0.9, True,
                            llt.TritonOptions(bwd=bwd))


def test_backward_mode_choice():
    assert llt._bwd_mode(llt.TritonOptions()) in ("gemm", os.environ.get("FASTMGRPO_TRITON_BWD"))
    assert llt._bwd_mode(llt.TritonOptions(skip_eps=1e-4)) == "atomic"
    with pytest.raises(ValueError, match="atomic"):
        llt._bwd_mode(llt.TritonOptions(bwd="gemm", skip_eps=1e-4))
    with pytest.raises(ValueError, match="backward mode"):
        llt._bwd_mode(llt.TritonOptions(bwd="dense"))


def test_vocab_slabs_and_splits_match():
    """More vocabulary slabs than one (slab_rows=64 → 5 slabs, d_W slab buffer reused) and
    several forward splits give the same results as one slab / one split."""
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, bias, targets = make_inputs(37, 24, 301, dtype, True)
        g = torch.randn(37, device=DEV, dtype=torch.float64)
        ge = torch.randn(37, device=DEV, dtype=torch.float64)
        one = run(triton_fn(llt.TritonOptions(bwd="atomic", slab_rows=4096, splits=1)),
                  hidden, weight, bias, targets, 0.8, True, g, ge)
        many = run(triton_fn(llt.TritonOptions(bwd="atomic", slab_rows=64, splits=4)),
                   hidden, weight, bias, targets, 0.8, True, g, ge)
        # fp32 atomics add in any order on a GPU: bf16 grads may differ by one rounding
        rel = 1e-5 if dtype == torch.float32 else 1e-2
        for name, a, b in zip(NAMES, one, many):
            assert max_err(a, b) <= rel * max(1.0, a.abs().max().item()), (dtype, name)
        if dtype == torch.float32:  # "gemm" mode: same math, another summation order
            gemm = run(triton_fn(llt.TritonOptions(bwd="gemm", slab_rows=64)),
                       hidden, weight, bias, targets, 0.8, True, g, ge)
            for name, a, b in zip(NAMES, one, gemm):
                assert max_err(a, b) <= 1e-5 * max(1.0, a.abs().max().item()), ("gemm", name)
    for bwd in ("atomic", "gemm"):
        check_against_reference(37, 24, 301, torch.bfloat16, True, 0.8, True,
                                llt.TritonOptions(bwd=bwd, slab_rows=64, splits=3))


def test_sparsity_skip():
    """Columns ≥ 64 are pushed 30 nats down (softmax ≈ 1e-13 there), except where a target
    sits (column 200). With skip_eps=2^-12 those tiles skip both products: the gradients stay
    within bf16 resolution of the dense path, a skipped row of d_W is exactly 0 (dense: tiny,
    nonzero) and the target's row is unaffected. An enormous threshold skips every tile."""
    N, H, V = 37, 24, 301
    hidden, weight, bias, _ = make_inputs(N, H, V, torch.bfloat16, True)
    bias = bias.float()
    bias[64:] -= 30.0
    bias = bias.to(torch.bfloat16)
    targets = torch.randint(0, 64, (N,), device=DEV)
    targets[3] = 200
    g = torch.randn(N, device=DEV, dtype=torch.float64)
    ge = torch.randn(N, device=DEV, dtype=torch.float64)
    dense = run(triton_fn(llt.TritonOptions(bwd="atomic")),
                hidden, weight, bias, targets, 1.0, True, g, ge)
    sparse = run(triton_fn(llt.TritonOptions(skip_eps=2.0 ** -12)),
                 hidden, weight, bias, targets, 1.0, True, g, ge)
    for name, d, s in zip(NAMES, dense, sparse):
        assert max_err(d, s) <= 1e-2 * max(1.0, d.abs().max().item()), name
    d_w_dense, d_w_sparse = dense[3], sparse[3]
    assert d_w_dense[290].abs().max() > 0 and d_w_sparse[290].abs().max() == 0   # skipped
    assert max_err(d_w_dense[200], d_w_sparse[200]) <= 1e-3 * d_w_dense[200].abs().max()  # kept
    none = run(triton_fn(llt.TritonOptions(skip_eps=1e30)),
               hidden, weight, bias, targets, 1.0, True, g, ge)
    assert max_err(none[0], dense[0]) == 0                       # forward is unaffected
    for grad in none[2:]:
        assert grad.abs().max().item() == 0


def test_partial_grads_and_unused_outputs():
    """Only hidden needs a grad, entropy computed but unused: grads still match."""
    N, H, V = 21, 24, 301
    hidden, weight, bias, targets = make_inputs(N, H, V, torch.float32, True)
    h = hidden.clone().requires_grad_()
    logp, ent = llt.LinearLogprobTriton.apply(h, weight, bias, targets, 1.0, True)
    assert ent.shape == (N,)
    logp.sum().backward()
    h64 = hidden.double().requires_grad_()
    naive(h64, weight.double(), bias.double(), targets, 1.0, False)[0].sum().backward()
    assert max_err(h.grad.double(), h64.grad) <= 1e-4
    _, empty = llt.LinearLogprobTriton.apply(hidden, weight, None, targets, 1.0, False)
    assert empty.numel() == 0 and empty.dtype == torch.float32
    # the public wrapper keeps leading dims: (3, 7, H) -> (3, 7)
    logp3, ent3 = llt.linear_logprob_triton(hidden.view(3, 7, H), weight, targets.view(3, 7),
                                            bias, with_entropy=True)
    assert logp3.shape == ent3.shape == (3, 7)
    assert max_err(logp3.reshape(-1), logp.detach()) <= 1e-6


# ----------------------------------------------------------------------------------------
# CUDA only: compiled kernels at real-ish shapes
# ----------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton)")


@cuda
@pytest.mark.parametrize("dtype,has_bias,with_entropy,bwd", [
    (torch.bfloat16, False, True, "atomic"), (torch.bfloat16, True, False, "atomic"),
    (torch.float32, False, True, "atomic"), (torch.bfloat16, False, True, "gemm"),
    (torch.float16, True, True, "gemm"),
])
def test_cuda_realish(dtype, has_bias, with_entropy, bwd):
    check_against_reference(2053, 1024, 32003, dtype, has_bias, 0.9, with_entropy,
                            llt.TritonOptions(bwd=bwd, slab_rows=8192))


@cuda
def test_cuda_sparsity_skip_realish():
    hidden, weight, bias, targets = make_inputs(1024, 512, 32000, torch.bfloat16, False, w_scale=4)
    g = torch.randn(1024, device=DEV, dtype=torch.float64)
    dense = run(triton_fn(llt.TritonOptions(bwd="atomic")),
                hidden, weight, None, targets, 1.0, False, g, None)
    sparse = run(triton_fn(llt.TritonOptions(skip_eps=2.0 ** -12)),
                 hidden, weight, None, targets, 1.0, False, g, None)
    for name, d, s in zip(NAMES, dense, sparse):
        if d is not None:
            assert max_err(d, s) <= 1e-2 * max(1.0, d.abs().max().item()), name


@cuda
def test_cuda_long_sequence_1d_grid():
    """128k tokens in one call: the 1-D grids have no 65,535 cap."""
    N, H, V = 131072, 128, 2048
    hidden, weight, _, targets = make_inputs(N, H, V, torch.bfloat16, False)
    out = run(triton_fn(), hidden, weight, None, targets, 1.0, True,
              torch.ones(N, device=DEV, dtype=torch.float64),
              torch.zeros(N, device=DEV, dtype=torch.float64))
    ref = naive(hidden.double(), weight.double(), None, targets, 1.0, False)[0]
    assert max_err(out[0], ref) <= 0.1
    assert out[2].isfinite().all() and out[3].isfinite().all()


@cuda
@pytest.mark.parametrize("bwd", ["atomic", "gemm"])
def test_cuda_memory_qwen7b_head(bwd):
    """Extra peak memory of fwd+bwd at N=32768, H=3584, V=152064 bf16 is ≤ 1.5 GiB beyond
    the inputs and the gradients themselves."""
    N, H, V = 32768, 3584, 152064
    hidden = torch.randn(N, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = (N * H + V * H) * 2                                   # d_hidden + d_weight, bf16
    logp, ent = llt.LinearLogprobTriton.apply(hidden, weight, None, targets, 1.0, True,
                                              llt.TritonOptions(bwd=bwd))
    (logp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra <= 1.5 * 2 ** 30, extra / 2 ** 30
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()


# ----------------------------------------------------------------------------------------
# No GPU: compile the kernels ahead of time for sm_90 (the real compiler path, not the
# interpreter), with the divisibility hints a launch with H % 16 == 0 gets.
# ----------------------------------------------------------------------------------------
def _aot_compile(kernel, args, constexprs, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(args, **{k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in ("H", "V", "dl_stride", "v_start", "v_end")}
    import triton
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _load_compiled_copy():
    """A second, non-interpreted instance of the kernel module (llt above is interpreted)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location("_llt_compiled_copy", llt.__file__)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod                    # dataclasses need the module registered
        spec.loader.exec_module(mod)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


@pytest.mark.skipif(CUDA, reason="on CUDA the compiled kernels run for real above")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm90(dtype):
    """Both kernels (all backward modes) compile for Hopper with the GPU defaults."""
    import triton
    import triton.language as tl
    if not hasattr(triton, "compile"):
        pytest.skip("triton.compile unavailable")
    src = importlib.util.find_spec("triton.backends.nvidia")
    if src is None:
        pytest.skip("no NVIDIA backend in this triton build")
    if type(tl.standard.sum).__name__ == "InterpretedFunction":
        pytest.skip("triton itself was imported under TRITON_INTERPRET=1")
    mod = _load_compiled_copy()
    tdt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
    bm, bv, bk, warps, stages = mod._config(tdt, torch.device("cuda"), mod.DEFAULT_OPTIONS)
    prec = "ieee" if dtype == "fp32" else "tf32"
    p, f = "*" + dtype, "*fp32"
    blocks = dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=prec, UPCAST=False,
                  INTERP=False)
    fwd_args = dict(h_ptr=p, w_ptr=p, b_ptr=p, tgt_ptr="*i64", m_out=f, s_out=f, t_out=f,
                    zt_out=f, N="i32", V="i32", H="i32", inv_temp="fp32", m_blocks="i32",
                    blocks_per_split="i32")
    try:
        _aot_compile(mod._linear_logprob_fwd_kernel, fwd_args,
                     dict(HAS_BIAS=True, WITH_ENTROPY=True, **blocks), warps, stages)
    except (TypeError, ImportError, AttributeError) as err:   # API drift across triton versions
        pytest.skip(f"ahead-of-time compile API unavailable: {err}")
    bwd_args = dict(h_ptr=p, w_ptr=p, b_ptr=p, tgt_ptr="*i64", lse_ptr=f, ent_ptr=f,
                    glogp_ptr=f, gent_ptr=f, dh_ptr=f, dw_ptr=f, db_ptr=f, dl_ptr=p,
                    dl_stride="i32", N="i32", V="i32", H="i32", inv_temp="fp32",
                    v_start="i32", v_end="i32", m_blocks="i32", v_blocks="i32", skip_eps="fp32")
    for atomic, skip in ((False, False), (True, False), (True, True)):
        _aot_compile(mod._linear_logprob_bwd_kernel, bwd_args,
                     dict(HAS_BIAS=True, HAS_GLOGP=True, HAS_GENT=True, COMPUTE_DH=atomic,
                          COMPUTE_DW=atomic, COMPUTE_DB=True, SKIP=skip, STORE_DL=not atomic,
                          GROUP_M=8, **blocks), warps, stages)
