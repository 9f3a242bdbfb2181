"""GRPO loss family: padded form vs installed Liger, packed vs padded, micro-batch additivity."""

import inspect

import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

from fastmgrpo.kernels import FusedLinearGRPOLoss, GRPOLossConfig, fused_linear_grpo_loss, packed_grpo_loss
from fastmgrpo.kernels.grpo_loss import LOSS_TYPES
from fastmgrpo.kernels.reference import reference_grpo_loss, reference_linear_logprobs

B, T, H, V = 4, 7, 16, 50
LENGTHS = [4, 7, 2, 0]  # last sequence fully masked
SIGNS = torch.tensor([1.0, -1.0, 1.0, -1.0])


def _batch(temperature=1.0, lengths=LENGTHS):
    """Random padded batch; old/ref log-probs are the true ones plus noise (so ratios straddle the clip)."""
    b = len(lengths)
    x = torch.randn(b, T, H)
    w = torch.randn(V, H) / H**0.5 * 2
    bias = torch.randn(V) * 0.1
    ids = torch.randint(0, V, (b, T))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    adv = (torch.rand(b) + 0.2) * SIGNS[:b].repeat(b // 4 + 1)[:b]
    logp, _ = reference_linear_logprobs(x.double().reshape(-1, H), w.double(), ids.reshape(-1), bias.double(),
                                        temperature)
    logp = logp.float().view(b, T)
    return dict(
        x=x, w=w, bias=bias, ids=ids, mask=mask, adv=adv,
        old=logp + 0.3 * torch.randn(b, T), ref=logp + 0.3 * torch.randn(b, T),
        ref_x=x + 0.1 * torch.randn(b, T, H), ref_w=w + 0.05 * torch.randn(V, H), ref_bias=bias + 0.1,
    )


def _grads_of(module, d, with_bias, **fw):
    x, w = d["x"].clone().requires_grad_(), d["w"].clone().requires_grad_()
    bias = d["bias"].clone().requires_grad_() if with_bias else None
    loss, metrics = module(x, w, d["ids"], d["mask"], d["adv"], bias, **fw)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], [x.grad, w.grad] + ([bias.grad] if with_bias else [])


VARIANTS = {
    # beta, delta, bias-corrected KL, temperature, bias, use_ref_model, how ref/old/vllm/num_items are given
    "beta0": dict(beta=0.0, delta=1.5, bc=False, temp=1.0, bias=False, use_ref=True, ref="logps", old=False,
                  vllm=None, nib=None),
    "bias_corrected_kl": dict(beta=0.1, delta=None, bc=True, temp=0.7, bias=False, use_ref=True, ref="logps",
                              old=True, vllm=None, nib=None),
    "kl_delta_vllm_bt": dict(beta=0.1, delta=1.5, bc=True, temp=0.7, bias=True, use_ref=True, ref="logps", old=True,
                             vllm="bt", nib=40),
    "ref_input_vllm_b": dict(beta=0.1, delta=None, bc=False, temp=1.3, bias=True, use_ref=True, ref="input",
                             old=True, vllm="b", nib=None),
    "no_ref_model": dict(beta=0.1, delta=1.5, bc=True, temp=1.0, bias=True, use_ref=False, ref=None, old=True,
                         vllm="b1", nib="tensor"),
}
GRID = [(lt, lvl, v) for lt in LOSS_TYPES for lvl in ("token", "sequence") for v in VARIANTS
        if not (lvl == "sequence" and lt in ("cispo", "sapo", "vespo"))]


def _forward_kwargs(d, var):
    fw = {}
    if var["ref"] == "logps":
        fw["ref_per_token_logps"] = d["ref"]
    elif var["ref"] == "input":
        fw.update(ref_input=d["ref_x"], ref_weight=d["ref_w"], ref_bias=d["ref_bias"])
    if var["old"]:
        fw["old_per_token_logps"] = d["old"]
    n = d["mask"].shape[0]
    vllm = {None: None, "bt": torch.rand(n, T) + 0.5, "b": torch.rand(n) + 0.5, "b1": torch.rand(n, 1) + 0.5}
    fw["vllm_is_ratio"] = vllm[var["vllm"]]
    fw["num_items_in_batch"] = torch.tensor(11.0) if var["nib"] == "tensor" else var["nib"]
    return fw


@pytest.mark.parametrize("loss_type, level, variant", GRID)
def test_matches_liger(loss_type, level, variant):
    var = VARIANTS[variant]
    kw = dict(beta=var["beta"], loss_type=loss_type, importance_sampling_level=level, delta=var["delta"],
              use_bias_correction_kl=var["bc"], temperature=var["temp"], use_ref_model=var["use_ref"],
              max_completion_length=9, epsilon_high=3.0 if loss_type == "cispo" else 0.28, epsilon_low=0.2)
    d = _batch(var["temp"])
    fw = _forward_kwargs(d, var)
    want = _grads_of(LigerFusedLinearGRPOLoss(compiled=False, **kw), d, var["bias"], **fw)
    got = _grads_of(FusedLinearGRPOLoss(**kw), d, var["bias"], **fw)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert len(got[1]) == len(want[1]) == (2 if var["beta"] != 0 else 1)
    for ours, theirs in zip(got[1], want[1]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for ours, theirs in zip(got[2], want[2]):
        torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item() + 1e-7, rtol=1e-4)
    if loss_type != "vespo":  # the eager full-logits reference (benchmark peer) agrees too
        ref_logps = fw.get("ref_per_token_logps")
        if var["ref"] == "input":
            ref_logps = reference_linear_logprobs(d["ref_x"].reshape(-1, H), d["ref_w"], d["ids"].reshape(-1),
                                                  d["ref_bias"], var["temp"])[0].view(-1, T)
        vllm = fw["vllm_is_ratio"]
        loss, kl, clip = reference_grpo_loss(
            d["x"], d["w"], d["ids"], d["mask"], d["adv"], d["bias"] if var["bias"] else None, ref_logps,
            fw.get("old_per_token_logps"), vllm[:, None] if vllm is not None and vllm.dim() == 1 else vllm,
            fw["num_items_in_batch"], beta=kw["beta"], epsilon_low=0.2, epsilon_high=kw["epsilon_high"],
            loss_type=loss_type, max_completion_length=9, importance_sampling_level=level,
            temperature=var["temp"], delta=var["delta"], use_bias_correction_kl=var["bc"])
        torch.testing.assert_close(loss.detach(), want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip, want[1][-1], atol=1e-6, rtol=1e-5)


def test_module_signature_is_liger_compatible():
    ours, theirs = inspect.signature(FusedLinearGRPOLoss.__init__), inspect.signature(LigerFusedLinearGRPOLoss.__init__)
    ours_p, theirs_p = list(ours.parameters.values()), list(theirs.parameters.values())
    assert [(p.name, p.default) for p in ours_p[: len(theirs_p)]] == [(p.name, p.default) for p in theirs_p]
    assert [p.name for p in ours_p[len(theirs_p):]] == ["backend", "memory_budget"]
    fwd_ours = inspect.signature(FusedLinearGRPOLoss.forward).parameters
    fwd_theirs = inspect.signature(LigerFusedLinearGRPOLoss.forward).parameters
    assert [(p.name, p.default) for p in fwd_ours.values()] == [(p.name, p.default) for p in fwd_theirs.values()]


# ---------------------------------------------------------------- packed form


def _pack(d, lengths):
    """Padded batch -> packed tensors (rows of real tokens back to back) and cu_seqlens."""
    keep = d["mask"].reshape(-1) > 0
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    flat = lambda t: t.reshape(-1, *t.shape[2:])[keep]  # noqa: E731
    return dict(x=flat(d["x"]), ids=flat(d["ids"]), old=flat(d["old"]), ref=flat(d["ref"]), cu=cu)


def _packed_run(p, d, config, **kw):
    x, w, bias = p["x"].clone().requires_grad_(), d["w"].clone().requires_grad_(), d["bias"].clone().requires_grad_()
    loss, metrics = packed_grpo_loss(x, w, p["ids"], p["cu"], kw.pop("adv", d["adv"]), p["old"], p["ref"],
                                     config=config, bias=bias, **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad, w.grad, bias.grad


PACKED_CASES = [(lt, "token") for lt in LOSS_TYPES] + [(lt, "sequence") for lt in ("grpo", "dapo", "luspo")]


@pytest.mark.parametrize("loss_type, level", PACKED_CASES)
def test_packed_equals_padded(loss_type, level):
    # luspo (Liger/TRL) counts padding positions unless the loss is constant per sequence, so it
    # gets no padding at token level, and beta=0 with a per-sequence IS ratio at sequence level.
    lengths = [T] * 4 if (loss_type, level) == ("luspo", "token") else LENGTHS
    beta = ent_coef = 0.0 if (loss_type, level) == ("luspo", "sequence") else 0.1
    cfg = GRPOLossConfig(beta=beta, loss_type=loss_type, importance_sampling_level=level, max_completion_length=9,
                         epsilon_high=3.0 if loss_type == "cispo" else 0.2, temperature=0.9, entropy_coef=ent_coef)
    d = _batch(0.9, lengths)
    p = _pack(d, lengths)
    if level == "sequence":
        vllm_pad = vllm_packed = torch.rand(4, 1) + 0.5
    else:
        vllm_pad = (torch.rand(4, T) + 0.5) * d["mask"] + (1 - d["mask"])  # 1 on padding (VESPO sums all T)
        vllm_packed = vllm_pad.reshape(-1)[d["mask"].reshape(-1) > 0]
    x, w, bias = d["x"].clone().requires_grad_(), d["w"].clone().requires_grad_(), d["bias"].clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, w, d["ids"], d["mask"], d["adv"], bias, d["ref"], d["old"],
                                           vllm_is_ratio=vllm_pad, config=cfg)
    loss.backward()
    got = _packed_run(p, d, cfg, vllm_is_ratio=vllm_packed)
    torch.testing.assert_close(got[0], loss.detach(), atol=1e-6, rtol=1e-5)
    names = (["kl"] if beta != 0 else []) + ["clip_ratio"] + (["entropy"] if ent_coef != 0 else [])
    assert len(metrics) == len(names)
    for name, value in zip(names, metrics):
        torch.testing.assert_close(got[1][name], value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], x.grad.reshape(-1, H)[d["mask"].reshape(-1) > 0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got[3], w.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got[4], bias.grad, atol=1e-6, rtol=1e-4)


MICRO_LENGTHS = [3, 0, 6, 1, 5, 4]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_global_counts_sum_to_full_batch(loss_type):
    cfg = GRPOLossConfig(beta=0.05, loss_type=loss_type, max_completion_length=8, entropy_coef=0.02,
                         epsilon_high=3.0 if loss_type == "cispo" else 0.2)
    d = _batch(1.0, MICRO_LENGTHS)
    p = _pack(d, MICRO_LENGTHS)
    M = p["x"].shape[0]
    vllm = torch.rand(M) + 0.5
    full = _packed_run(p, d, cfg, vllm_is_ratio=vllm, num_sequences=6)
    cu = p["cu"].long()
    losses, metrics, gx, gw = 0.0, {}, [], 0.0
    for s0, s1 in ((0, 2), (2, 5), (5, 6)):  # sequence ranges
        r0, r1 = cu[s0].item(), cu[s1].item()
        part = dict(x=p["x"][r0:r1], ids=p["ids"][r0:r1], old=p["old"][r0:r1], ref=p["ref"][r0:r1],
                    cu=(p["cu"][s0:s1 + 1] - r0).int())
        out = _packed_run(part, d, cfg, adv=d["adv"][s0:s1], vllm_is_ratio=vllm[r0:r1], num_sequences=6,
                          num_tokens=M)
        losses = losses + out[0]
        metrics = {k: metrics.get(k, 0.0) + v for k, v in out[1].items()}
        gx.append(out[2])
        gw = gw + out[3]
    assert torch.isfinite(full[0]) and torch.isfinite(full[2]).all()
    # float32 rounding: the worst |sum of parts - full| over seeds 0-149 of every loss type was
    # 2.4e-6 for the loss (vespo; the sum cancels to ~1e-3 from terms ~1), 4.8e-7 for the
    # metrics, 4.0e-7 for d_x and 7.2e-7 for d_W; the tolerances are about 4x those
    torch.testing.assert_close(losses, full[0], atol=1e-5, rtol=1e-5)
    assert metrics.keys() == full[1].keys() == {"kl", "clip_ratio", "ratio_mean", "entropy"}
    for k in metrics:
        torch.testing.assert_close(metrics[k], full[1][k], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(gx), full[2], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gw, full[3], atol=3e-6, rtol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_seq_weights_scale_and_remove_sequences(loss_type):
    cfg = GRPOLossConfig(beta=0.05, loss_type=loss_type, max_completion_length=8,
                         epsilon_high=3.0 if loss_type == "cispo" else 0.2)
    lengths = [3, 5, 4]
    d = _batch(1.0, lengths)
    p = _pack(d, lengths)
    M = p["x"].shape[0]
    weighted = _packed_run(p, d, cfg, seq_weights=torch.tensor([0.5, 0.0, 2.0]))
    expect_loss, expect_gw = 0.0, 0.0
    for s, scale in ((0, 0.5), (2, 2.0)):  # each kept sequence alone, with the batch's global counts
        r0, r1 = p["cu"][s].item(), p["cu"][s + 1].item()
        alone = dict(x=p["x"][r0:r1], ids=p["ids"][r0:r1], old=p["old"][r0:r1], ref=p["ref"][r0:r1],
                     cu=torch.tensor([0, r1 - r0], dtype=torch.int32))
        out = _packed_run(alone, d, cfg, adv=d["adv"][s:s + 1], num_sequences=3, num_tokens=M)
        expect_loss = expect_loss + scale * out[0]
        expect_gw = expect_gw + scale * out[3]
        torch.testing.assert_close(weighted[2][r0:r1], scale * out[2], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(weighted[0], expect_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weighted[3], expect_gw, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(weighted[2][p["cu"][1]:p["cu"][2]]) == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_give_zero_loss_and_gradient(loss_type):
    cfg = GRPOLossConfig(beta=0.0, loss_type=loss_type, max_completion_length=8)
    d = _batch(1.0)
    d["adv"] = torch.zeros(4)
    p = _pack(d, LENGTHS)
    out = _packed_run(p, d, cfg)
    assert out[0].item() == 0.0 and torch.count_nonzero(out[2]) == 0 and torch.count_nonzero(out[3]) == 0
    x = d["x"].clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(x, d["w"], d["ids"], d["mask"], d["adv"], ref_per_token_logps=d["ref"],
                                     old_per_token_logps=d["old"], config=cfg)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_entropy_bonus_against_float64_reference(loss_type):
    cfg = GRPOLossConfig(beta=0.1, loss_type=loss_type, entropy_coef=0.3, temperature=0.8)
    lengths = [5, 7, 3] if loss_type != "luspo" else [T] * 3
    d = _batch(0.8, lengths)
    x64, w64 = d["x"].double().requires_grad_(), d["w"].double().requires_grad_()
    base, kl, _ = reference_grpo_loss(x64, w64, d["ids"], d["mask"], d["adv"], d["bias"].double(), d["ref"].double(),
                                      d["old"].double(), beta=0.1, loss_type=loss_type, temperature=0.8)
    _, ent = reference_linear_logprobs(x64.reshape(-1, H), w64, d["ids"].reshape(-1), d["bias"].double(), 0.8)
    ent, mask = ent.view(-1, T), d["mask"].double()
    per_seq = (ent * mask).sum(-1) / mask.sum(-1)
    bonus = {"grpo": per_seq.mean(), "dapo": (ent * mask).sum() / mask.sum(), "luspo": (ent * mask).sum() / 3}
    expect = base - 0.3 * bonus[loss_type]
    expect.backward()
    got = _packed_run(_pack(d, lengths), d, cfg)
    torch.testing.assert_close(got[0].double(), expect.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1]["entropy"].double(), ((ent * mask).sum() / mask.sum()).detach(), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(got[2].double(), x64.grad.reshape(-1, H)[d["mask"].reshape(-1) > 0], atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(got[3].double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fully_masked_batch_is_finite(level):
    cfg = GRPOLossConfig(beta=0.1, loss_type="grpo", importance_sampling_level=level)
    d = _batch(1.0, [0, 0, 0, 0])
    x = d["x"].clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, d["w"], d["ids"], d["mask"], d["adv"], ref_per_token_logps=d["ref"],
                                           old_per_token_logps=d["old"], config=cfg)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(m) for m in metrics) and torch.count_nonzero(x.grad) == 0
