"""Continuous batching in `rollout.sample`: slot refill, tail compaction, chunked prefill and the
CUDA-graph decode step, each checked against an independent no-cache forward."""

import copy
import warnings
from typing import ClassVar

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from fastmgrpo import rollout
from fastmgrpo.testing import build_tiny_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# Shuffled lengths 1..59 (results must come back in this order); with 20 new tokens most
# sequences cross the tiny Gemma 3's sliding window (16).
TEXTS = ["Natalia sold 48 clips in April and half as many in May. ####", "7", "12+30=",
         "What is 3+4? Answer:", "x*y", "The train leaves at 9 and arrives at 11. How long?", "ab",
         "Tom has 5 apples."]


@pytest.fixture(scope="module", params=["gemma3", "llama", "mistral"])
def tiny(request):
    if request.param != "mistral":
        return build_tiny_model(arch=request.param, seed=0)
    # no layer_types: every layer slides (window 8), one mask tensor for all layers
    llama, tok = build_tiny_model(arch="llama", seed=0)
    cfg = MistralConfig(**{k: getattr(llama.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "pad_token_id")}, sliding_window=8, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MistralForCausalLM(cfg).eval(), tok


def _greedy_no_cache(model, prompt, n, stop=()):
    """Greedy continuation by full forwards over the whole sequence (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop:
                break
    return ids[len(prompt):]


def _full_forward_logprobs(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.fixture
def spy(monkeypatch):
    """Records the busy slot count at every prefill."""
    seen = {"prefill_busy": []}
    prefill = rollout._Engine.prefill

    def spy_prefill(self, rows, idx, seqs):
        seen["prefill_busy"].append(len(self.active))
        return prefill(self, rows, idx, seqs)

    monkeypatch.setattr(rollout._Engine, "prefill", spy_prefill)
    return seen


def _stop_with_spread(refs):
    """A token that ends some greedy references early (at different steps) and not others."""
    for t in sorted({t for r in refs for t in r}):
        at = {r.index(t) for r in refs if t in r}
        if len(at) >= 2 and sum(t not in r for r in refs) >= 2:
            return t
    raise AssertionError("no token splits the references")


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_refill_matches_no_cache_loop(tiny, spy, device):
    cpu_model, tok = tiny
    model = copy.deepcopy(cpu_model).to(device) if device == "cuda" else cpu_model
    prompts = [tok.encode(s) for s in TEXTS]
    free = [_greedy_no_cache(cpu_model, p, 20) for p in prompts]
    stop = _stop_with_spread(free)
    want = [f[: f.index(stop) + 1] if stop in f else f for f in free]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        out = rollout.sample(model, prompts, max_new_tokens=20, temperature=0.0, stop_ids={stop},
                             pad_id=tok.pad_token_id, batch_size=3, refill_fraction=0.3)
    assert [c.token_ids for c in out] == want
    assert [c.finished for c in out] == [stop in f for f in free]
    assert all(type(c.finished) is bool and type(c.token_ids[0]) is int for c in out)
    assert any(busy > 0 for busy in spy["prefill_busy"])  # refilled while others were decoding
    for p, c in zip(prompts, out):
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   _full_forward_logprobs(cpu_model, p, c.token_ids, 0.0), atol=1e-4, rtol=0)


def test_greedy_independent_of_slots_and_prefill_chunks(tiny, monkeypatch):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS]
    want = [_greedy_no_cache(model, p, 12) for p in prompts]
    monkeypatch.setattr(rollout, "_PREFILL_TOKENS", 40)  # several prefill forwards per refill
    for batch_size in (1, 2, 8, 64):
        out = rollout.sample(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=set(),
                             pad_id=tok.pad_token_id, batch_size=batch_size)
        assert [c.token_ids for c in out] == want, batch_size
        assert not any(c.finished for c in out)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.8, 0.9, 20)])
def test_sampled_logprobs_stops_and_lengths(tiny, spy, temperature, top_p, top_k):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS] * 2
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, pad_id=tok.pad_token_id, batch_size=4)
    first = rollout.sample(model, prompts, max_new_tokens=8, stop_ids=set(),
                           generator=torch.Generator().manual_seed(0), **kw)
    drawn = [t for c in first for t in c.token_ids]
    stop = {max(set(drawn), key=drawn.count)}  # a frequent token: rows stop at different steps
    out = rollout.sample(model, prompts, max_new_tokens=16, stop_ids=stop,
                         generator=torch.Generator().manual_seed(1), **kw)
    assert any(busy > 0 for busy in spy["prefill_busy"])
    assert {len(c.token_ids) for c in out if c.finished} - {16}, "no sequence stopped early"
    assert any(not c.finished for c in out)
    for p, c in zip(prompts, out):
        assert 0 < len(c.token_ids) <= 16
        assert not stop & set(c.token_ids[:-1])
        assert c.finished == (c.token_ids[-1] in stop)
        assert c.finished or len(c.token_ids) == 16
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   _full_forward_logprobs(model, p, c.token_ids, temperature), atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored after sampling


class _EagerGraph:
    """CPU stand-in for `rollout._GraphStep`: the same static inputs and reused output buffer,
    replayed by calling the step (so graph-mode geometry, full-width masks, is tested on CPU)."""

    sizes: ClassVar[list[int]] = []

    def __init__(self, step, args, pool):
        self.step, self.args, self.out = step, tuple(a.clone() for a in args), None
        self.sizes.append(self.args[0].numel())

    def __call__(self, *args):
        for dst, src in zip(self.args, args):
            dst.copy_(src)
        fresh = self.step(*self.args)
        self.out = fresh if self.out is None else self.out.copy_(fresh)
        return self.out


@pytest.fixture
def graph_mode(monkeypatch):
    """Run the sampler's CUDA-graph branch on CPU through `_EagerGraph`."""
    init = rollout._Engine.__init__
    monkeypatch.setattr(rollout._Engine, "__init__",
                        lambda self, model, **kw: init(self, model, **{**kw, "graphs": True}))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(rollout, "_GraphStep", _EagerGraph)
    _EagerGraph.sizes = []
    return _EagerGraph


def test_graph_mode_full_width_decode_and_recapture(tiny, graph_mode):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS]
    free = [_greedy_no_cache(model, p, 20) for p in prompts]
    stop = _stop_with_spread(free)
    out = rollout.sample(model, prompts, max_new_tokens=20, temperature=0.0, stop_ids={stop},
                         pad_id=tok.pad_token_id, batch_size=4)
    assert [c.token_ids for c in out] == [f[: f.index(stop) + 1] if stop in f else f for f in free]
    # captured once for 4 slots, then again for each compacted batch size
    sizes = graph_mode.sizes
    assert sizes[0] == 4 and len(sizes) >= 2 and sizes == sorted(sizes, reverse=True)


def test_graph_capture_failure_falls_back_to_eager(tiny, graph_mode, monkeypatch):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS[:3]]

    tries = []

    def fail(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(rollout, "_GraphStep", fail)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = rollout.sample(model, prompts, max_new_tokens=6, temperature=0.0, stop_ids=set(), pad_id=0, batch_size=2)
    assert [c.token_ids for c in out] == [_greedy_no_cache(model, p, 6) for p in prompts]
    assert len(tries) == 1  # no capture retried after the fallback


def test_rejects_zero_slots(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        rollout.sample(model, [[7]], max_new_tokens=2, temperature=0.0, stop_ids=set(), pad_id=0, batch_size=0)
