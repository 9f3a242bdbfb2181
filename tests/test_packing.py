import random

import pytest
import torch

from fastmgrpo.attention import VARLEN, use_varlen_attention
from fastmgrpo.attention import register as register_varlen
from fastmgrpo.packing import microbatches, pack
from fastmgrpo.policy import packed_hidden_states
from fastmgrpo.testing import build_tiny_model, padded_hidden_states
from fastmgrpo.types import Episode

def _episodes(lengths, vocab=100, seed=0):
    """Episodes with (prompt_len, completion_len) from `lengths`, random ids >= 6 (no specials)."""
    rng = random.Random(seed)
    out = []
    for i, (p, c) in enumerate(lengths):
        out.append(Episode(
            prompt_ids=[rng.randrange(6, vocab) for _ in range(p)],
            completion_ids=[rng.randrange(6, vocab) for _ in range(c)],
            sampler_logprobs=[-rng.random() for _ in range(c)],
            reward=1.0, correct=True, layer=1 + i % 2, group=i // 2,
            advantage=0.5 * i - 1, weight=1.0 + i,
        ))
    return out


# Longer than the tiny gemma3 sliding window (16) so the sliding layer's masking matters.
LENGTHS = [(5, 7), (30, 12), (1, 3), (9, 0), (3, 25)]


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_packed_hidden_states_match_each_sequence_alone(arch, attn):
    model, _ = build_tiny_model(arch=arch, seed=1)
    register_varlen()
    model.set_attn_implementation(attn)
    eps = _episodes(LENGTHS)
    batch = pack(eps)
    with torch.no_grad():
        packed = packed_hidden_states(model, batch)
        alone = torch.cat([
            model.model(input_ids=torch.tensor([e.prompt_ids + e.completion_ids])).last_hidden_state[0]
            for e in eps
        ])
        padded = padded_hidden_states(model, eps)
        # The same row without restarting positions attends across sequences: must differ,
        # otherwise this test could not detect a leak.
        leaky = model.model(input_ids=batch.input_ids[None]).last_hidden_state[0]
    assert packed.shape == (sum(p + c for p, c in LENGTHS), 64)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    first = LENGTHS[0][0] + LENGTHS[0][1]
    assert not torch.allclose(leaky[first:], alone[first:], atol=1e-3)


def test_packed_hidden_states_gradients_match_alone():
    model, _ = build_tiny_model(arch="gemma3", seed=2)
    model.double()  # float64 (Gemma norms still compute in float32, hence the tolerance)
    eps = _episodes([(4, 20), (18, 6)], seed=3)
    w = torch.randn(sum(e.num_tokens for e in eps), 64, dtype=torch.float64)
    (packed_hidden_states(model, pack(eps)) * w).sum().backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.cat([model.model(input_ids=torch.tensor([e.prompt_ids + e.completion_ids])).last_hidden_state[0]
                       for e in eps])
    (alone * w).sum().backward()
    for gp, p in zip(g_packed, model.parameters()):
        torch.testing.assert_close(gp, p.grad, atol=1e-5, rtol=1e-4)


def test_varlen_model_keeps_sdpa_results_outside_packing():
    """After use_varlen_attention, padded (masked) forwards are unchanged: rollout keeps working."""
    model, _ = build_tiny_model(arch="gemma3", seed=4)
    eps = _episodes([(3, 30), (12, 4), (7, 7)], seed=5)
    with torch.no_grad():
        before = padded_hidden_states(model, eps)
        use_varlen_attention(model)
        assert model.config._attn_implementation == VARLEN
        after = padded_hidden_states(model, eps)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_pack_fields_against_hand_loop():
    eps = _episodes(LENGTHS)
    b = pack(eps)
    ids, pos, rows, targets, old, cu, cut = [], [], [], [], [], [0], [0]
    for e in eps:
        seq = e.prompt_ids + e.completion_ids
        for j in range(len(seq)):
            if j + 1 < len(seq) and j + 1 >= len(e.prompt_ids):  # next token is a completion token
                rows.append(len(ids))
                targets.append(seq[j + 1])
            ids.append(seq[j])
            pos.append(j)
        old += e.sampler_logprobs
        cu.append(len(ids))
        cut.append(len(targets))
    assert b.input_ids.tolist() == ids and b.input_ids.dtype == torch.int64
    assert b.position_ids.tolist() == pos
    assert b.cu_seqlens.tolist() == cu and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == max(p + c for p, c in LENGTHS)
    assert b.target_rows.tolist() == rows
    assert b.targets.tolist() == targets
    assert b.input_ids[b.target_rows + 1].tolist() == targets
    assert b.cu_targets.tolist() == cut and b.cu_targets.dtype == torch.int32
    torch.testing.assert_close(b.sampler_logprobs, torch.tensor(old))
    assert b.advantages.tolist() == [e.advantage for e in eps]
    assert b.weights.tolist() == [e.weight for e in eps]
    assert b.layers.tolist() == [1, 2, 1, 2, 1]
    assert b.num_sequences == len(eps) and b.ref_logprobs is None


def test_pack_rejects_bad_episodes():
    e = _episodes([(3, 2)])[0]
    e.sampler_logprobs = e.sampler_logprobs[:1]
    with pytest.raises(ValueError, match="sampler_logprobs"):
        pack([e])
    with pytest.raises(ValueError, match="prompt token"):
        pack(_episodes([(0, 2)]))


@pytest.mark.parametrize("budget", [10, 37, 64, 1000])
def test_microbatches_respect_budget_and_keep_every_episode(budget):
    rng = random.Random(budget)
    eps = _episodes([(rng.randrange(1, 30), rng.randrange(0, 30)) for _ in range(40)])
    mbs = microbatches(eps, budget)
    seen = sorted(id(e) for mb in mbs for e in mb)
    assert seen == sorted(id(e) for e in eps)
    for mb in mbs:
        total = sum(e.num_tokens for e in mb)
        assert total <= budget or len(mb) == 1
    # First fit: no two micro-batches could have been merged.
    sizes = sorted(sum(e.num_tokens for e in mb) for mb in mbs)
    if len(sizes) > 1:
        assert sizes[0] + sizes[1] > budget
