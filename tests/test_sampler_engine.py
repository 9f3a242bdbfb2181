"""Continuous batching in `sampler.sample`: slot refill, tail compaction, chunked prefill and the
CUDA-graph decode step, each checked against an independent no-cache forward."""

import copy
import warnings
from typing import ClassVar

import pytest
import torch

from fastmgrpo import sampler
from fastmgrpo.stopping import StopStrings
from fastmgrpo.testing import build_tiny_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# Shuffled lengths 1..59 (results must come back in this order); with 20 new tokens most
# sequences cross the tiny Gemma 3's sliding window (16).
TEXTS = ["Natalia sold 48 clips in April and half as many in May. ####", "7", "12+30=",
         "What is 3+4? Answer:", "x*y", "The train leaves at 9 and arrives at 11. How long?", "ab",
         "Tom has 5 apples."]


@pytest.fixture(scope="module", params=["gemma3", "llama", "mistral"])  # mistral: every layer slides
def tiny(request):
    return build_tiny_model(arch=request.param, seed=0)


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
    prefill = sampler._Decoder.prefill

    def spy_prefill(self, rows, *args):
        seen["prefill_busy"].append(int(self.live[: self.bucket].sum()))
        return prefill(self, rows, *args)

    monkeypatch.setattr(sampler._Decoder, "prefill", spy_prefill)
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
        out = sampler.sample(model, prompts, max_new_tokens=20, temperature=0.0, stop_ids={stop},
                             pad_id=tok.pad_token_id, batch_size=3, refill_fraction=0.3,
                             compile=False)  # compiled: test_compiled_graph_decode_cuda (cold compile)
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
    monkeypatch.setattr(sampler, "_PREFILL_TOKENS", 40)  # several prefill forwards per refill
    for batch_size in (1, 2, 8, 64):
        out = sampler.sample(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=set(),
                             pad_id=tok.pad_token_id, batch_size=batch_size)
        assert [c.token_ids for c in out] == want, batch_size
        assert not any(c.finished for c in out)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.8, 0.9, 20)])
def test_sampled_logprobs_stops_and_lengths(tiny, spy, temperature, top_p, top_k):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS] * 2
    # check_every=2: refill points often enough that some come while other rows still decode
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, pad_id=tok.pad_token_id, batch_size=4,
              check_every=2)
    first = sampler.sample(model, prompts, max_new_tokens=8, stop_ids=set(),
                           generator=torch.Generator().manual_seed(0), **kw)
    drawn = [t for c in first for t in c.token_ids]
    stop = {max(set(drawn), key=drawn.count)}  # a frequent token: rows stop at different steps
    out = sampler.sample(model, prompts, max_new_tokens=16, stop_ids=stop,
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


def test_rejects_zero_slots(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        sampler.sample(model, [[7]], max_new_tokens=2, temperature=0.0, stop_ids=set(), pad_id=0, batch_size=0)


class _EagerGraph:
    """CPU stand-in for `sampler._GraphStep`: the warm-up run at capture (which advances the slot
    state and the draw count, as on CUDA) and a call per replay; counts captures."""

    captures: ClassVar[list[int]] = []  # one entry per capture

    def __init__(self, step, pool):
        self.step = step
        step()
        self.captures.append(1)

    def __call__(self):
        self.step()


@pytest.fixture
def graph_mode(monkeypatch):
    """Run the sampler's CUDA-graph branch on CPU through `_EagerGraph` (sampling inside the
    captured step, from the counter-based RNG); `torch.compile` is a counting pass-through."""
    monkeypatch.setattr(sampler, "_graphs_on", lambda device: True)
    monkeypatch.setattr(sampler, "_GraphStep", _EagerGraph)
    compiled = []
    monkeypatch.setattr(sampler, "_compile", lambda fn: compiled.append(fn) or fn)
    _EagerGraph.captures = []
    sampler._DECODERS.clear()
    yield {"captures": _EagerGraph.captures, "compiled": compiled}
    sampler._DECODERS.clear()


def test_graph_mode_captures_once_per_shape_across_calls(tiny, graph_mode):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS]
    free = [_greedy_no_cache(model, p, 20) for p in prompts]
    stop = _stop_with_spread(free)
    want = [f[: f.index(stop) + 1] if stop in f else f for f in free]
    kw = dict(temperature=0.0, stop_ids={stop}, pad_id=tok.pad_token_id, batch_size=4)
    out = sampler.sample(model, prompts, max_new_tokens=20, **kw)
    assert [c.token_ids for c in out] == want
    (dec,) = sampler._DECODERS[model].values()
    buckets, widths = {k[0] for k in dec.steps}, {k[1] for k in dec.steps}
    assert 4 in buckets and len(buckets) >= 2 and buckets <= {4, 2, 1}  # compacted tail
    assert dec.max_len == 128 and widths == {64, 128}  # short prompts' steps attend over 64 columns
    assert len(graph_mode["captures"]) == len(dec.steps)
    assert len(graph_mode["compiled"]) == 1 and list(dec.compiled) == [(0.0, 1.0, 0)]  # one for all shapes
    # a second call replays; one with fewer prompts than slots and other max_new_tokens (same
    # rounded length) shares the decoder and captures only shapes it has not seen
    assert [c.token_ids for c in sampler.sample(model, prompts, max_new_tokens=20, **kw)] == want
    assert len(graph_mode["captures"]) == len(dec.steps)
    seen = len(dec.steps)
    assert [c.token_ids for c in sampler.sample(model, prompts[:3], max_new_tokens=12, **kw)] == [
        w[:12] for w in want[:3]]
    assert len(graph_mode["captures"]) == len(dec.steps) <= seen + 3
    assert list(sampler._DECODERS[model].values()) == [dec] and len(graph_mode["compiled"]) == 1
    for p, c in zip(prompts, out):
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   _full_forward_logprobs(model, p, c.token_ids, 0.0), atol=1e-4, rtol=0)
    sampler.sample(model, prompts[:2], max_new_tokens=150, **kw)  # too long for it: a second decoder
    assert len(sampler._DECODERS[model]) == 2 and len(graph_mode["captures"]) > len(dec.steps)
    sampler.release(model)
    assert model not in sampler._DECODERS


def test_graph_mode_sampling_reproducible_and_exact_logprobs(tiny, graph_mode, monkeypatch):
    """Graph mode draws from the decoder's counter-based RNG, seeded from the generator: the same
    seed replays the same tokens (capturing does not shift the draws), another seed differs, and
    every draw of a call, prefills and replayed steps, advances the counter once."""
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS]
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.95, stop_ids=set(), pad_id=tok.pad_token_id,
              batch_size=3)
    a = sampler.sample(model, prompts, generator=torch.Generator().manual_seed(5), **kw)  # captures
    draws = []
    pick = sampler._pick
    monkeypatch.setattr(sampler, "_pick", lambda *args: draws.append(1) or pick(*args))
    b = sampler.sample(model, prompts, generator=torch.Generator().manual_seed(5), **kw)  # replays
    (dec,) = sampler._DECODERS[model].values()
    assert int(dec.rng.count) == len(draws) > 10
    c = sampler.sample(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    for p, x in zip(prompts, a):
        torch.testing.assert_close(torch.tensor(x.logprobs, dtype=torch.float64),
                                   _full_forward_logprobs(model, p, x.token_ids, 0.8), atol=1e-4, rtol=0)


def test_graph_mode_reuses_shared_prefixes(tiny, graph_mode, monkeypatch):
    """A kept decoder (graph mode) takes copied prefix K/V too: the tokens of whole prefills."""
    model, tok = tiny
    monkeypatch.setitem(sampler._FORWARD_TOKENS, "cpu", 0)  # read when the decoder is made
    head = tok.encode(TEXTS[0])  # past both sliding windows
    prompts = [head + tok.encode(t) for t in TEXTS[:4] for _ in range(2)]
    kw = dict(max_new_tokens=10, temperature=0.8, stop_ids=set(), pad_id=tok.pad_token_id, batch_size=4)
    a, b = (sampler.sample(model, prompts, generator=torch.Generator().manual_seed(2), prefix_reuse=reuse, **kw)
            for reuse in (True, False))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=2e-5)


def test_graph_mode_sampled_distribution_matches_softmax(graph_mode):
    """Second tokens drawn by the captured step (first ones by prefill) against the model's
    marginal sum_t1 p(t1 | prompt) p(t2 | prompt, t1), each frequency within 5 binomial sigmas."""
    model, tok = build_tiny_model(arch="gemma3", seed=1)
    prompt, n, temperature = tok.encode("7*8 is"), 3000, 0.5
    out = sampler.sample(model, [prompt] * n, max_new_tokens=2, temperature=temperature, stop_ids=set(),
                         pad_id=tok.pad_token_id, batch_size=1024, generator=torch.Generator().manual_seed(0))
    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)  # (V,)
        both = torch.cat([torch.tensor([prompt] * vocab), torch.arange(vocab)[:, None]], 1)  # (V, L+1)
        p2 = p1 @ torch.softmax(model(both).logits[:, -1].double() / temperature, -1)  # (V,)
    for k, p in ((0, p1), (1, p2)):
        freq = torch.bincount(torch.tensor([c.token_ids[k] for c in out]), minlength=vocab).double() / n
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), k


def test_compile_failure_captures_uncompiled(tiny, graph_mode, monkeypatch):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS[:3]]

    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(sampler, "_compile", broken)
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        out = sampler.sample(model, prompts, max_new_tokens=6, temperature=0.0, stop_ids=set(), pad_id=0, batch_size=3)
    assert [c.token_ids for c in out] == [_greedy_no_cache(model, p, 6) for p in prompts]


def test_graph_capture_failure_falls_back_to_eager(tiny, graph_mode, monkeypatch):
    model, tok = tiny
    prompts = [tok.encode(s) for s in TEXTS[:3]]
    tries = []

    def fail(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sampler, "_GraphStep", fail)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = sampler.sample(model, prompts, max_new_tokens=6, temperature=0.0, stop_ids=set(), pad_id=0, batch_size=2)
    assert [c.token_ids for c in out] == [_greedy_no_cache(model, p, 6) for p in prompts]
    assert len(tries) == 1  # no capture retried after the fallback


@pytest.mark.parametrize("graphs", [False, True])
def test_stops_checked_every_k_steps_match_every_step(tiny, monkeypatch, graphs):
    """Stop ids and stop strings seen every K steps (tokens past a stop discarded) give exactly
    the completions of checking after every step, with refills and compaction in between."""
    model, tok = tiny
    if graphs:
        monkeypatch.setattr(sampler, "_graphs_on", lambda device: True)
        monkeypatch.setattr(sampler, "_GraphStep", _EagerGraph)
        monkeypatch.setattr(sampler, "_compile", lambda fn: fn)
    prompts = [tok.encode(s) for s in TEXTS]
    free = [_greedy_no_cache(model, p, 20) for p in prompts]
    stop = _stop_with_spread(free)
    # a stop string: the text of another token that ends some completions early
    other = _stop_with_spread([[t for t in f if t != stop] for f in free])
    stopper = StopStrings(lambda ids: tok.decode(ids, skip_special_tokens=True), [tok.decode([other])])
    kw = dict(max_new_tokens=20, temperature=0.0, stop_ids={stop}, pad_id=tok.pad_token_id, batch_size=3,
              refill_fraction=0.3, stopper=stopper)
    every = sampler.sample(model, prompts, check_every=1, **kw)
    by_string = [c for c, f in zip(every, free) if c.finished and c.token_ids[-1] != stop]
    assert by_string and any(not c.finished for c in every)
    for k in (3, 8):
        out = sampler.sample(model, prompts, check_every=k, **kw)
        assert [(c.token_ids, c.finished) for c in out] == [(c.token_ids, c.finished) for c in every], k
        for c, e in zip(out, every):  # other batch compositions: fp32 rounding only
            assert c.logprobs == pytest.approx(e.logprobs, abs=1e-5)
    sampler._DECODERS.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_compiled_graph_decode_cuda():
    """The real thing: torch.compile'd forward + in-graph sampling captured once, replayed across
    calls; greedy equals the no-cache loop, seeded sampling repeats, logprobs match."""
    cpu_model, tok = build_tiny_model(arch="gemma3", seed=0)
    model = copy.deepcopy(cpu_model).cuda()
    prompts = [tok.encode(s) for s in TEXTS]
    kw = dict(max_new_tokens=12, stop_ids=set(), pad_id=tok.pad_token_id, batch_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed|torch.compile of the decode")
        greedy = sampler.sample(model, prompts, temperature=0.0, **kw)
        runs = [sampler.sample(model, prompts, temperature=1.0, generator=torch.Generator("cuda").manual_seed(3), **kw)
                for _ in range(2)]
    assert [c.token_ids for c in greedy] == [_greedy_no_cache(cpu_model, p, 12) for p in prompts]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    for p, c in zip(prompts, runs[0]):
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   _full_forward_logprobs(cpu_model, p, c.token_ids, 1.0), atol=1e-3, rtol=0)
    (dec,) = sampler._DECODERS[model].values()
    assert dec.graphs and dec.compile and len(dec.steps) <= 3 * 2  # buckets 4, 2, 1 x greedy / sampled
    sampler.release(model)
