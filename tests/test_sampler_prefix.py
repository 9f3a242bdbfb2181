"""Prefix reuse in `sampler.sample`: prompts that share prefixes (exemplars, a question's G
samples, layer-2 prompts that extend a layer-1 prompt and answer) get the same tokens and
log-probs as prefilling every prompt whole, and only the tokens no other prompt shares are
prefilled."""

import random

import pytest
import torch

from fastmgrpo import mgrpo, sampler
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.data import synthetic_problems
from fastmgrpo.prompts import layer1_prompt
from fastmgrpo.testing import build_tiny_model

PAD = 0  # the tiny tokenizer's <pad>; prompts here draw ids >= 6 (no special tokens)
ATOL = 2e-5  # |logprob difference|: fp32 rounding of other batch shapes, measured <= 1e-6


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def tiny(request):
    """Gemma 3 (layer 0 slides over 16 tokens) and Mistral (every layer slides over 8)."""
    return build_tiny_model(arch=request.param, seed=0)[0]


def _tokens(n: int, vocab: int) -> list[int]:
    return torch.randint(6, vocab, (n,)).tolist()


def _layer1_prompts(vocab: int, questions: int = 3, group: int = 3) -> list[list[int]]:
    """A shared 30-token exemplar block (past both sliding windows), then questions of
    different lengths, each repeated `group` times."""
    shots = _tokens(30, vocab)
    qs = [shots + _tokens(int(torch.randint(2, 20, ())), vocab) for _ in range(questions)]
    return [q for q in qs for _ in range(group)]


def _layer2_prompts(l1_prompts, completions, vocab: int, h: int = 2) -> list[list[int]]:
    """Layer-1 prompt + its sampled answer + a guiding phrase, each repeated h times."""
    phrase = _tokens(5, vocab)
    return [p + c.token_ids + phrase for p, c in zip(l1_prompts, completions) for _ in range(h)]


def _edge_prompts(vocab: int) -> list[list[int]]:
    """One-token prompts (alone and twice), a prompt that is a prefix of another, prefixes of
    the same head ending at different lengths."""
    head = _tokens(25, vocab)
    return [_tokens(1, vocab), [7], [7], head[:3], head[:12], head[:12] + [9], head, head + _tokens(4, vocab)]


def _both(model, prompts, **kw):
    """sample() with and without prefix reuse, same seed."""
    return [sampler.sample(model, prompts, pad_id=PAD, stop_ids=set(), prefix_reuse=reuse,
                           generator=torch.Generator().manual_seed(1), **kw) for reuse in (True, False)]


def _assert_same(a, b):
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finished for c in a] == [c.finished for c in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.8, 0.9, 20)])
# batch 4: slots refill, sharers arrive at different times; forward_tokens 0: every shared
# prefix is a node (deep trees), 64: the CPU default (short shared prefixes go to their children)
@pytest.mark.parametrize("batch_size,forward_tokens", [(64, 64), (4, 0)])
def test_reuse_matches_whole_prefill(tiny, temperature, top_p, top_k, batch_size, forward_tokens, monkeypatch):
    monkeypatch.setitem(sampler._FORWARD_TOKENS, "cpu", forward_tokens)
    vocab = tiny.config.vocab_size
    kw = dict(max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size)
    l1 = _layer1_prompts(vocab) + _edge_prompts(vocab)
    with_reuse, whole = _both(tiny, l1, **kw)
    _assert_same(with_reuse, whole)
    l2 = _layer2_prompts(l1, whole, vocab)
    with_reuse, whole = _both(tiny, l2, **kw)
    _assert_same(with_reuse, whole)
    # the reference itself against one full forward per sequence (no cache at all)
    with torch.no_grad():
        for p, c in zip(l2[::5], with_reuse[::5]):
            logits = tiny(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].double()
            ref = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(c.token_ids)[:, None])
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref[:, 0], atol=1e-4, rtol=0)


def _prefilled(model, prompts, reuse: bool, batch_size: int) -> int:
    """Non-pad tokens fed to the model by sample() with one new token (no decode forwards)."""
    fed = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: fed.append(int((args[0] != PAD).sum())))
    try:
        sampler.sample(model, prompts, max_new_tokens=1, temperature=1.0, stop_ids=set(), pad_id=PAD,
                       batch_size=batch_size, prefix_reuse=reuse, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return sum(fed)


@pytest.mark.parametrize("batch_size", [64, 5])
def test_prefills_each_shared_prefix_once(tiny, batch_size, monkeypatch):
    monkeypatch.setitem(sampler._FORWARD_TOKENS, "cpu", 0)  # every shared prefix is worth a forward
    vocab = tiny.config.vocab_size
    l1 = _layer1_prompts(vocab, questions=4, group=4)
    l2 = [p + _tokens(int(torch.randint(1, 9, ())), vocab) + [11, 12] for p in l1 for _ in range(2)]
    prompts = l1 + l2 + _edge_prompts(vocab)
    random.Random(0).shuffle(prompts)
    # Each prompt's last token is computed in its slot; every other position of the prompt set
    # once: the distinct non-empty prefixes of the prompts less their last tokens.
    distinct = {tuple(p[:k]) for p in prompts for k in range(1, len(p))}
    assert _prefilled(tiny, prompts, True, batch_size) == len(distinct) + len(prompts)
    assert _prefilled(tiny, prompts, False, batch_size) == sum(map(len, prompts))


def test_collect_with_and_without_reuse(monkeypatch):
    """One MGRPO step's rollout, both layers: same completions, no whole layer-2 prompt
    prefilled with reuse."""
    model, tok = build_tiny_model(arch="gemma3", seed=0)
    problems = synthetic_problems(2, seed=0)
    prompts = [layer1_prompt(tok, p, shots=problems[:1]) for p in problems]
    cfg = MGRPOConfig(group_size=3, l2_samples=2, max_completion_length=8, temperature=1.0)
    drawn, widest = {True: [], False: []}, {True: 0, False: 0}
    generate = mgrpo.generate
    for reuse in (True, False):
        monkeypatch.setattr(mgrpo, "generate",
                            lambda *a, **kw: drawn[reuse].append(generate(*a, **kw)) or drawn[reuse][-1])
        hook = model.get_input_embeddings().register_forward_pre_hook(
            lambda mod, args: widest.update({reuse: max(widest[reuse], args[0].shape[1])}))
        mgrpo.collect(model, tok, problems, prompts, cfg, rng=random.Random(0),
                      generator=torch.Generator().manual_seed(0), stop_ids={tok.eos_token_id},
                      pad_id=tok.pad_token_id, prefix_reuse=reuse)
        hook.remove()
    assert [len(x) for x in drawn[True]] == [6, 12]  # layer 1: Q x G, layer 2: Q x G x H
    for a, b in zip(drawn[True], drawn[False]):
        _assert_same(a, b)
    l2_prompt = min(len(p) for p in prompts) + 1  # a layer-2 prompt is longer than any layer-1 one
    assert widest[False] > l2_prompt > widest[True]
