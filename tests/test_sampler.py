import pytest
import torch

from fastmgrpo.rng import torch_uniform
from fastmgrpo.sampler import _pick, sample
from fastmgrpo.testing import build_tiny_model

@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(arch="gemma3", seed=0)


def _prompts(tok):
    # Different lengths -> left padding inside a batch; the longest crosses the sliding window (16).
    return [tok.encode(s) for s in ["12+3=", "Natalia sold 48 clips in April. ####", "x", "7*8 is"]]


def _reference_logprobs(model, prompt, completion, temperature):
    """Log-softmax of one full forward over prompt+completion, at the completion tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("arch,temperature,top_p,top_k", [
    ("gemma3", 1.0, 1.0, 0), ("gemma3", 0.7, 0.9, 20), ("gemma3", 0.0, 1.0, 0), ("llama", 0.7, 0.9, 20),
])
def test_logprobs_match_full_forward(arch, temperature, top_p, top_k):
    model, tok = build_tiny_model(arch=arch, seed=0)
    prompts = _prompts(tok)
    out = sample(model, prompts, max_new_tokens=14, temperature=temperature, top_p=top_p, top_k=top_k,
                 stop_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, batch_size=3,
                 generator=torch.Generator().manual_seed(1))
    assert len(out) == len(prompts)
    for p, c in zip(prompts, out):
        assert len(c.token_ids) == len(c.logprobs) > 0
        ref = _reference_logprobs(model, p, c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_argmax(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=10, temperature=0.0, stop_ids=set(), pad_id=tok.pad_token_id)
    a = sample(model, prompts, batch_size=4, **kw)
    b = sample(model, prompts, batch_size=1, **kw)  # no padding at all
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # Independent greedy loop without a cache.
    ids = list(prompts[1])
    for _ in range(10):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert a[1].token_ids == ids[len(prompts[1]):]


def test_seeded_sampling_reproducible(tiny):
    model, tok = tiny
    prompts = _prompts(tok) * 2
    kw = dict(max_new_tokens=12, temperature=1.0, stop_ids=set(), pad_id=tok.pad_token_id)
    a = sample(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    b = sample(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    c = sample(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_stops_at_stop_ids_and_respects_max_new_tokens(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=9, temperature=0.0, pad_id=tok.pad_token_id, batch_size=4)
    free = sample(model, prompts, stop_ids=set(), **kw)
    assert all(len(c.token_ids) == 9 and not c.finished for c in free)
    # Make the token greedily chosen at step 3 of prompt 0 a stop id: rows that emit it end
    # there (finished, stop id kept); the rows left decoding after it is dropped from the batch
    # and the cache must continue exactly as without a stop.
    stop = free[0].token_ids[3]
    out = sample(model, prompts, stop_ids={stop}, **kw)
    for f, c in zip(free, out):
        if stop in f.token_ids:
            n = f.token_ids.index(stop) + 1
            assert c.token_ids == f.token_ids[:n] and c.logprobs == pytest.approx(f.logprobs[:n], abs=1e-5)
            assert c.finished
        else:
            assert c.token_ids == f.token_ids and not c.finished
            assert c.logprobs == pytest.approx(f.logprobs, abs=1e-5)
    assert sum(c.finished for c in out) >= 1 and sum(not c.finished for c in out) >= 1


def test_logprobs_after_rows_finish_match_full_forward(tiny):
    model, tok = tiny
    prompts = _prompts(tok) * 2
    common = [t for c in sample(model, prompts, max_new_tokens=6, temperature=1.0, stop_ids=set(), pad_id=0,
                                generator=torch.Generator().manual_seed(3)) for t in c.token_ids]
    stop = max(set(common), key=common.count)  # a frequent token: several rows stop early
    out = sample(model, prompts, max_new_tokens=12, temperature=1.0, stop_ids={stop}, pad_id=0,
                 generator=torch.Generator().manual_seed(3))
    assert any(c.finished for c in out) and any(not c.finished for c in out)
    for p, c in zip(prompts, out):
        ref = _reference_logprobs(model, p, c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_progress_and_empty_prompt(tiny):
    model, tok = tiny
    seen = []
    sample(model, _prompts(tok), max_new_tokens=2, temperature=0.0, stop_ids=set(), pad_id=0,
           batch_size=3, progress=seen.append)
    assert seen == [3, 1]
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[]], max_new_tokens=2, temperature=0.0, stop_ids=set(), pad_id=0)


@pytest.mark.parametrize("temperature,top_p,top_k,expected", [
    (1.0, 1.0, 0, [0.5, 0.25, 0.15, 0.1]),
    (1.0, 1.0, 2, [2 / 3, 1 / 3, 0, 0]),
    (1.0, 0.7, 0, [2 / 3, 1 / 3, 0, 0]),  # 0.5 + 0.25 reaches 0.7: the rest is cut
    (1.0, 0.8, 0, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
    (0.5, 1.0, 0, [0.25 / 0.345, 0.0625 / 0.345, 0.0225 / 0.345, 0.01 / 0.345]),  # p^2 renormalised
])
def test_pick_samples_the_truncated_distribution(temperature, top_p, top_k, expected):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().repeat(40000, 1)  # (N, V) identical rows
    ids, logp = _pick(logits, temperature, top_p, top_k, torch_uniform(torch.Generator().manual_seed(0), "cpu"))
    freq = torch.bincount(ids, minlength=4).double() / ids.numel()
    torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), atol=0.01, rtol=0)
    # logprobs are those of the untruncated temperature-scaled distribution
    full = torch.log_softmax(probs.log() / temperature, dim=-1)
    torch.testing.assert_close(logp, full[ids])


def test_pick_frequencies_match_softmax_within_5_sigma():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, generator=gen) * 2  # a skewed distribution, from 0.2% to ~60%
    n, temperature = 200_000, 0.8
    ids, logp = _pick(logits.repeat(n, 1), temperature, 1.0, 0, torch_uniform(torch.Generator().manual_seed(1), "cpu"))
    p = torch.softmax(logits.double() / temperature, dim=-1)
    freq = torch.bincount(ids, minlength=7).double() / n
    sigma = (p * (1 - p) / n).sqrt()  # binomial std of each frequency
    assert ((freq - p).abs() <= 5 * sigma).all(), (freq, p)
    full = torch.log_softmax(logits / temperature, dim=-1)
    torch.testing.assert_close(logp, full[ids], atol=1e-5, rtol=0)
    # the draw is a function of the generator's state alone (per-(seed, step, rank) replay)
    again, _ = _pick(logits.repeat(n, 1), temperature, 1.0, 0, torch_uniform(torch.Generator().manual_seed(1), "cpu"))
    assert torch.equal(ids, again)
