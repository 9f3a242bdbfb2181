"""Chunked PyTorch backend of the fused linear-logprob primitive vs a float64 full-logits reference."""

import pytest
import torch

import fastmgrpo.kernels.linear_logprob_torch as llt
from fastmgrpo.kernels import linear_logprobs, token_logprobs
from fastmgrpo.kernels.linear_logprob_torch import LinearLogprobTorch
from fastmgrpo.kernels.reference import reference_linear_logprobs


def _problem(n, h, v, with_bias, scale=1.0):
    hidden = torch.randn(n, h, dtype=torch.float64) * scale
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.5 * 2.0
    bias = torch.randn(v, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, v, (n,))
    return hidden, weight, bias, targets


def _run(fn, hidden, weight, bias, targets, dtype, temperature, g_logp, g_ent):
    """Forward + backward of fn in `dtype`; returns (logp, entropy, d_hidden, d_weight, d_bias) as float64."""
    leaves = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    logp, ent = fn(leaves[0], leaves[1], leaves[2], targets, temperature)
    loss = (logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()
    loss.backward()
    grads = [x.grad.double() if x is not None else None for x in leaves]
    return [logp.detach().double(), ent.detach().double(), *grads]


def _ours(h, w, b, t, temp):
    return linear_logprobs(h, w, t, b, temp, with_entropy=True, backend="torch")


def _ref(h, w, b, t, temp):
    return reference_linear_logprobs(h, w, t, b, temp)


def _max_err(a, b):
    return [(x - y).abs().max().item() if x is not None else 0.0 for x, y in zip(a, b)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tile_bytes", [None, 4 * 13 * 53])  # None: one tile; else 13-row chunks
def test_fp32_matches_float64_reference(with_bias, temperature, tile_bytes, monkeypatch):
    if tile_bytes is not None:
        monkeypatch.setattr(llt, "_TILE_BYTES", tile_bytes)
    hidden, weight, bias, targets = _problem(37, 24, 53, with_bias)
    g_logp, g_ent = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    gold = _run(_ref, hidden, weight, bias, targets, torch.float64, temperature, g_logp, g_ent)
    ours = _run(_ours, hidden, weight, bias, targets, torch.float32, temperature, g_logp, g_ent)
    for name, err, ref in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), _max_err(ours, gold), gold):
        scale = ref.abs().max().item() if ref is not None else 1.0
        assert err <= 2e-5 * max(scale, 1.0), (name, err, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile_bytes", [None, 4 * 24 * 11])  # small: vocab blocks of 11 and 24-row chunks
def test_low_precision_at_least_as_accurate_as_eager(dtype, tile_bytes, monkeypatch):
    if tile_bytes is not None:
        monkeypatch.setattr(llt, "_TILE_BYTES", tile_bytes)
    hidden, weight, bias, targets = _problem(41, 24, 67, True, scale=2.0)
    # round the inputs to the low dtype first so all three runs see the same numbers
    hidden, weight, bias = (x.to(dtype).double() for x in (hidden, weight, bias))
    g_logp, g_ent = torch.randn(41, dtype=torch.float64), torch.randn(41, dtype=torch.float64)
    gold = _run(_ref, hidden, weight, bias, targets, torch.float64, 1.3, g_logp, g_ent)
    eager = _run(_ref, hidden, weight, bias, targets, dtype, 1.3, g_logp, g_ent)
    ours = _run(_ours, hidden, weight, bias, targets, dtype, 1.3, g_logp, g_ent)
    names = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")
    for name, e_ours, e_eager in zip(names, _max_err(ours, gold), _max_err(eager, gold)):
        assert e_ours <= 2 * e_eager + 1e-5, (name, e_ours, e_eager)
    logp, ent = linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, bias.to(dtype), with_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32


def test_large_vocabulary_and_int32_targets():
    hidden, weight, bias, targets = _problem(5, 16, 151_936, False)
    gold_logp, gold_ent = reference_linear_logprobs(hidden, weight, targets, None, 1.0)
    logp, ent = linear_logprobs(hidden.float(), weight.float(), targets.int(), with_entropy=True, backend="torch")
    torch.testing.assert_close(logp.double(), gold_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold_ent, atol=1e-4, rtol=1e-5)


def test_entropy_contract_and_logp_only_gradient():
    hidden, weight, bias, targets = _problem(9, 8, 19, True)
    h, w, b = (x.float().requires_grad_() for x in (hidden, weight, bias))
    logp, ent = LinearLogprobTorch.apply(h, w, b, targets, 1.0, False)
    assert ent.numel() == 0 and ent.dtype == torch.float32 and logp.shape == (9,)
    assert linear_logprobs(h, w, targets, b)[1] is None
    g = torch.randn(9)
    logp.backward(g)
    gold = _run(lambda *a: (_ref(*a)[0], torch.zeros(9, dtype=torch.float64)), hidden, weight, bias, targets,
                torch.float64, 1.0, g.double(), torch.zeros(9, dtype=torch.float64))
    for ours, ref in zip((h.grad, w.grad, b.grad), gold[2:]):
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)
    # entropy requested but unused: same gradients
    h2 = h.detach().clone().requires_grad_()
    logp2, _ = linear_logprobs(h2, w.detach(), targets, b.detach(), with_entropy=True, backend="torch")
    logp2.backward(g)
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-6, rtol=1e-5)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, _, targets = _problem(6, 8, 13, False)
    h = hidden.float().requires_grad_()
    w = weight.float()  # frozen head
    logp, _ = linear_logprobs(h, w, targets, backend="torch")
    logp.sum().backward()
    assert w.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


def test_token_logprobs_keeps_leading_shape():
    hidden, weight, bias, targets = _problem(12, 8, 21, True)
    gold_logp, gold_ent = reference_linear_logprobs(hidden, weight, targets, bias, 0.9)
    logp, ent = token_logprobs(hidden.float().view(3, 4, 8), weight.float(), targets.view(3, 4), 0.9, bias.float(),
                               return_entropy=True)
    assert logp.shape == (3, 4) and ent.shape == (3, 4)
    torch.testing.assert_close(logp.double(), gold_logp.view(3, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold_ent.view(3, 4), atol=1e-5, rtol=1e-5)
    only = token_logprobs(hidden.float(), weight.float(), targets, 0.9, bias.float())
    torch.testing.assert_close(only.double(), gold_logp, atol=1e-5, rtol=1e-5)


def test_backend_env_var_forces_torch_and_rejects_unknown(monkeypatch):
    hidden, weight, _, targets = _problem(4, 8, 11, False)
    monkeypatch.setenv("FASTMGRPO_BACKEND", "torch")
    logp, _ = linear_logprobs(hidden.float().requires_grad_(), weight.float(), targets)
    assert "LinearLogprobTorch" in type(logp.grad_fn).__name__
    monkeypatch.setenv("FASTMGRPO_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTMGRPO_BACKEND"):
        linear_logprobs(hidden.float(), weight.float(), targets)
    monkeypatch.setenv("FASTMGRPO_BACKEND", "auto")
    logp, _ = linear_logprobs(hidden.float().requires_grad_(), weight.float(), targets)  # CPU -> torch
    assert "LinearLogprobTorch" in type(logp.grad_fn).__name__


def test_entropy_only_gradient():
    hidden, weight, bias, targets = _problem(10, 8, 23, True)
    g = torch.randn(10, dtype=torch.float64)
    zero = torch.zeros(10, dtype=torch.float64)
    gold = _run(_ref, hidden, weight, bias, targets, torch.float64, 0.8, zero, g)
    h, w, b = (x.float().requires_grad_() for x in (hidden, weight, bias))
    _, ent = linear_logprobs(h, w, targets, b, 0.8, with_entropy=True, backend="torch")
    (ent.double() * g).sum().backward()  # logp unused: its gradient arrives as None
    for ours, ref in zip((h.grad, w.grad, b.grad), gold[2:]):
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)
