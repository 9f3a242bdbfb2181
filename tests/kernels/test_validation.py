"""Bad inputs and unsupported options raise errors that name the offending argument."""

import pytest
import torch

from fastmgrpo.kernels import (
    FusedLinearGRPOLoss,
    GRPOLossConfig,
    fused_linear_grpo_loss,
    packed_grpo_loss,
    token_logprobs,
)

N, H, V = 6, 8, 11


def _args(**over):
    args = dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, word",
    [
        (dict(hidden=torch.randn(N, H, 1)), ValueError, "hidden"),
        (dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
        (dict(hidden=torch.randint(0, 3, (N, H))), TypeError, "hidden"),
        (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight"),
        (dict(targets=torch.zeros(N)), TypeError, "targets"),
        (dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, "targets"),
        (dict(targets=torch.full((N,), V)), ValueError, "targets"),
        (dict(targets=torch.full((N,), -1)), ValueError, "targets"),
        (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
        (dict(bias=torch.ones(V, dtype=torch.long)), (TypeError, ValueError), "bias"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(memory_budget=2.5e8), ValueError, "memory_budget"),
    ],
)
def test_token_logprobs_rejects(over, exc, word):
    with pytest.raises(exc, match=word):
        token_logprobs(**_args(**over))


def test_token_logprobs_refuses_to_drop_gradients():
    args = _args(hidden=torch.randn(N, H, requires_grad=True))
    with pytest.raises(ValueError, match="no_grad"):
        token_logprobs(**args)
    with torch.no_grad():
        assert token_logprobs(**args).grad_fn is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden_is_rejected(bad):
    hidden = torch.randn(N, H)
    hidden[3, 2] = bad
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(**_args(hidden=hidden))


def test_token_logprobs_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(2, 3, H), torch.randn(V, H), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "over, word",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="group"), "importance_sampling_level"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="sapo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
        (dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
        (dict(delta=0.0), "delta"),
        (dict(temperature=0.0), "temperature"),
        (dict(beta=-0.1), "beta"),
        (dict(epsilon_low=float("nan")), "epsilon_low"),
        (dict(entropy_coef=float("inf")), "entropy_coef"),
    ],
)
def test_config_rejects(over, word):
    with pytest.raises(ValueError, match=word):
        GRPOLossConfig(**over)


def test_unknown_loss_type_lists_valid_values():
    with pytest.raises(ValueError, match="dapo"):
        GRPOLossConfig(loss_type="ppo")


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearGRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearGRPOLoss(chunk_size=0)
    module = FusedLinearGRPOLoss()
    module.importance_sampling_level = "group"  # changed after construction: checked at forward
    with pytest.raises(ValueError, match="importance_sampling_level"):
        module(*_padded())


def _padded(b=2, t=3):
    return (torch.randn(b, t, H), torch.randn(V, H), torch.randint(0, V, (b, t)), torch.ones(b, t), torch.randn(b))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(), "ref"),  # use_ref_model=True without any reference
        (dict(use_ref_model=False, ref_per_token_logps=torch.zeros(2, 3)), "use_ref_model"),
        (dict(ref_input=torch.randn(2, 3, H)), "ref_weight"),
        (dict(ref_per_token_logps=torch.zeros(2, 4)), "ref_per_token_logps"),
        (dict(ref_per_token_logps=torch.zeros(2, 3), old_per_token_logps=torch.zeros(3, 3)), "old_per_token_logps"),
        (dict(ref_per_token_logps=torch.zeros(2, 3), vllm_is_ratio=torch.ones(2, 2)), "vllm_is_ratio"),
        (dict(ref_per_token_logps=torch.zeros(2, 3), vllm_is_ratio=torch.ones(2, 3, 1)), "vllm_is_ratio"),
        (dict(ref_per_token_logps=torch.zeros(2, 3), config=None), "config"),
    ],
)
def test_padded_loss_rejects(kwargs, word):
    kwargs.setdefault("config", GRPOLossConfig())
    with pytest.raises((ValueError, TypeError), match=word):
        fused_linear_grpo_loss(*_padded(), **kwargs)


def test_padded_loss_rejects_bad_shapes():
    x, w, ids, mask, adv = _padded()
    cfg = dict(config=GRPOLossConfig(beta=0.0), use_ref_model=False)
    with pytest.raises(ValueError, match="_input"):
        fused_linear_grpo_loss(x[0], w, ids, mask, adv, **cfg)
    with pytest.raises(ValueError, match="selected_token_ids"):
        fused_linear_grpo_loss(x, w, ids[:, :2], mask, adv, **cfg)
    with pytest.raises(TypeError, match="selected_token_ids"):
        fused_linear_grpo_loss(x, w, ids.float(), mask, adv, **cfg)
    with pytest.raises(ValueError, match="attention_mask"):
        fused_linear_grpo_loss(x, w, ids, mask[:1], adv, **cfg)
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_grpo_loss(x, w, ids, mask, adv[:1], **cfg)
    with pytest.raises(ValueError, match="selected_token_ids"):  # out-of-vocabulary id at a real token
        fused_linear_grpo_loss(x, w, torch.full_like(ids, V), mask, adv, **cfg)


def _packed(m=5, b=2):
    return (torch.randn(m, H), torch.randn(V, H), torch.randint(0, V, (m,)), torch.tensor([0, 2, m], dtype=torch.int32),
            torch.randn(b))


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens"),  # does not end at M
        (dict(cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32), advantages=torch.randn(3)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5.0])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),  # B mismatch
        (dict(advantages=torch.randn(2, 1)), "advantages"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), "targets"),
        (dict(old_logprobs=torch.zeros(4)), "old_logprobs"),
        (dict(ref_logprobs=torch.zeros(6)), "ref_logprobs"),
        (dict(seq_weights=torch.ones(3)), "seq_weights"),
        (dict(num_sequences=0), "num_sequences"),
        (dict(num_tokens=-3), "num_tokens"),
        (dict(vllm_is_ratio=torch.ones(2)), "vllm_is_ratio"),  # per-sequence must be (B, 1)
        (dict(ref_logprobs=None, beta=0.1), "ref_logprobs"),  # KL without a reference
    ],
)
def test_packed_loss_rejects(change, word):
    hidden, weight, targets, cu, adv = _packed()
    args = dict(hidden=hidden, weight=weight, targets=targets, cu_seqlens=cu, advantages=adv,
                old_logprobs=None, ref_logprobs=torch.zeros(5))
    args.update({k: v for k, v in change.items() if k != "beta"})
    config = GRPOLossConfig(beta=change.get("beta", 0.0))
    with pytest.raises((ValueError, TypeError), match=word):
        packed_grpo_loss(**args, config=config)


def test_padded_loss_names_its_own_arguments():
    x, w, ids, mask, adv = _padded()
    cfg = dict(config=GRPOLossConfig(beta=0.1))
    x_bad = x.clone()
    x_bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="_input"):
        fused_linear_grpo_loss(x_bad, w, ids, mask, adv, ref_per_token_logps=torch.zeros(2, 3), **cfg)
    with pytest.raises(TypeError, match="lin_weight"):
        fused_linear_grpo_loss(x, w.double(), ids, mask, adv, ref_per_token_logps=torch.zeros(2, 3), **cfg)
    with pytest.raises(ValueError, match="ref_input"):
        fused_linear_grpo_loss(x, w, ids, mask, adv, ref_input=x_bad, ref_weight=w, **cfg)
    with pytest.raises(ValueError, match="ref_weight"):
        fused_linear_grpo_loss(x, w, ids, mask, adv, ref_input=x, ref_weight=w[:, :2], **cfg)
