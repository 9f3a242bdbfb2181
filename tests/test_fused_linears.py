"""`fused_linears.fuse_linears`: q/k/v and gate/up as one GEMM each, on weights that stay the
projections' own (views), with the same logits as the unfused model, eager and traced by dynamo."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastmgrpo.fused_linears import _Member, fuse_linears
from fastmgrpo.testing import build_tiny_model


def _model(arch: str):
    if arch != "qwen2":
        return build_tiny_model(arch=arch, seed=0)[0]
    torch.manual_seed(0)  # q/k/v with biases, gate/up without
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


class _GemmCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "linear")
        return func(*args, **(kwargs or {}))


def _logits(model, ids):
    with torch.no_grad(), _GemmCount() as count:
        out = model(ids).logits
    return out, count.gemms


@pytest.mark.parametrize("arch", ["gemma3", "llama", "mistral", "qwen2"])
def test_fused_copy_gives_the_same_logits_with_fewer_gemms(arch):
    seed = 31
    model = _model(arch).requires_grad_(False)
    fused = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    assert fuse_linears(fused) == 2 * layers
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]  # refresh maps by name
    for layer in fused.model.layers:
        for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            members = [getattr(module, n) for n in names]
            group = members[0]._group[0]
            assert all(isinstance(m, _Member) and m._group[0] is group for m in members)
            base = group.weight.untyped_storage().data_ptr()
            assert all(m.weight.untyped_storage().data_ptr() == base for m in members)  # views: no copy
            assert torch.equal(torch.cat([m.weight for m in members]), group.weight)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(seed))
    want, gemms = _logits(model, ids)
    got, fused_gemms = _logits(fused, ids)
    assert gemms - fused_gemms == 3 * layers, (gemms, fused_gemms)  # 7 -> 4 a layer
    # GEMM blocking may differ: within 3x the fp32 model's error against float64 (3e-7 measured)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"seed {seed}")
    assert all(m._group[0].seen is None for m in fused.modules() if isinstance(m, _Member))  # nothing held
    # dynamo traces the shared output without a graph break
    traced = torch.compile(fused, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(traced(ids).logits, want, atol=1e-6, rtol=0, msg=f"seed {seed}")
    torch._dynamo.reset()


def test_writes_into_a_projection_reach_the_fused_gemm():
    seed = 32
    model = _model("llama").requires_grad_(False)
    fused = copy.deepcopy(model)
    fuse_linears(fused)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # what DecodeWeights.refresh does after an update
        for p, q in zip(model.parameters(), fused.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            q.copy_(p)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    torch.testing.assert_close(_logits(fused, ids)[0], _logits(model, ids)[0], atol=1e-6, rtol=0)


def test_refuses_a_model_that_trains():
    model = _model("llama")
    with pytest.raises(ValueError, match="no gradients"):
        fuse_linears(model)
