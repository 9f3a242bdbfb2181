"""`DecodeWeights`: the sampler's 16-bit policy copy follows the master through in-place refreshes."""

import torch

from fastmgrpo.decode_weights import DecodeWeights
from fastmgrpo.testing import build_tiny_model
from fastmgrpo.sampler import sample


def _greedy(model, tok):
    prompts = [tok.encode(s) for s in ["12+3=", "Natalia sold 48 clips in April. ####", "x"]]
    out = sample(model, prompts, max_new_tokens=8, temperature=0.0, stop_ids=set(), pad_id=tok.pad_token_id)
    return [c.token_ids for c in out]


def test_bf16_copy_refreshed_in_place_samples_the_new_weights():
    master, tok = build_tiny_model(arch="gemma3", seed=0)
    weights = DecodeWeights(master, torch.bfloat16)
    model = weights.model
    assert model is not master and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied: one copy
    # buffers (RoPE inverse frequencies) keep their dtype: bf16 ones would misplace positions
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in master.named_buffers()}
    addresses = [p.data_ptr() for p in model.parameters()]
    before = _greedy(model, tok)
    new, _ = build_tiny_model(arch="gemma3", seed=1)
    with torch.no_grad():  # an optimizer step: the master changes in place
        for p, q in zip(master.parameters(), new.parameters()):
            p.copy_(q)
    assert _greedy(model, tok) == before  # not refreshed yet
    assert weights.refresh() is model
    assert [p.data_ptr() for p in model.parameters()] == addresses  # in place: graph pointers hold
    for p, q in zip(model.parameters(), new.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16))
    after = _greedy(model, tok)
    assert after == _greedy(DecodeWeights(new, torch.bfloat16).model, tok)  # a fresh copy of the new model
    assert after != before


def test_fp32_decodes_from_the_master_itself():
    master, _ = build_tiny_model(arch="llama", seed=0)
    weights = DecodeWeights(master, torch.float32)
    assert weights.model is master and weights.refresh() is master
