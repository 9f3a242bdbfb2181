"""The sampler's decode step under torch.compile (CPU): K/V written into the cache buffers in
place (read from inductor's generated code), each bucket compiled once, and dynamo's recompile
limit met with one warning."""

import re
import shutil
import warnings

import pytest
import torch
from test_sampler_engine import TEXTS, _greedy_no_cache, _stop_with_spread, graph_mode  # noqa: F401 - a fixture
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from fastmgrpo import sampler
from fastmgrpo.testing import build_tiny_model

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="inductor's CPU backend needs a C++ compiler")


@pytest.mark.slow  # inductor's first compile in a process: about 10 s
@needs_compiler
@pytest.mark.parametrize("n", [3, 2], ids=["full_bucket", "part_bucket"])
def test_kv_write_compiles_in_place(n):
    """One decode attention of n of 3 slots (K/V write + `_slot_attention`), compiled: the new
    keys land in the cache buffers themselves and the generated code neither allocates nor
    loops over a buffer-sized (or bucket-sized) copy; the results equal an eager reference."""
    slots, hkv, heads, max_len, d = 3, 2, 4, 40, 16
    cache = sampler._SlotCache(slots, max_len)
    k0, v0 = torch.randn(2, slots, hkv, max_len, d).unbind(0)
    cache.k[0], cache.v[0] = k0.clone(), v0.clone()
    cols = torch.randperm(max_len)[:n]  # each slot's next column
    cache.n, cache.cols, cache.width = n, cols, max_len
    q, key, value = torch.randn(n, heads, 1, d), torch.randn(n, hkv, 1, d), torch.randn(n, hkv, 1, d)
    mask = torch.arange(max_len)[None, None, None] <= cols[:, None, None, None]  # (n, 1, 1, L) causal

    def attend(cache, q, key, value, mask):
        k, v = cache.update(key, value, 0)
        return sampler._slot_attention(None, q, k, v, mask, scaling=d**-0.5)[0]

    with torch.inference_mode():
        out, code = run_and_get_code(torch.compile(attend, dynamic=False, fullgraph=True), cache, q, key, value, mask)
    want_k, want_v = k0.clone(), v0.clone()
    for s in range(n):
        want_k[s, :, cols[s]], want_v[s, :, cols[s]] = key[s, :, 0], value[s, :, 0]
    assert torch.equal(cache.k[0], want_k) and torch.equal(cache.v[0], want_v)  # written into the buffers
    kk, vv = (w[:n].double().repeat_interleave(heads // hkv, dim=1) for w in (want_k, want_v))  # (n, H, L, D)
    scores = (q.double() @ kk.transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf"))
    ref = (scores.softmax(-1) @ vv).transpose(1, 2)  # (n, 1, H, D)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)

    src = "\n".join(code)
    shapes = {f"({m}, {hkv}, {max_len}, {d})" for m in (slots, n)}
    assert re.search(r"assert_size_stride\(\w+, \(3, 2, 40, 16\)", src)  # the buffers are inputs, as written
    allocs = [line for line in src.splitlines() if "empty_strided" in line and any(s in line for s in shapes)]
    assert not allocs, allocs
    extents = {int(x) for x in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", src)}
    assert d in extents  # the loop pattern matches this codegen (the head dim loop of the write)
    assert not extents & {m * hkv * max_len * d for m in (slots, n)}, sorted(extents)


@pytest.fixture
def traced(graph_mode, monkeypatch):
    """The CUDA-graph branch on CPU (`graph_mode`) with `_compile` traced by dynamo for real, with
    dynamic shapes as the sampler asks, into its `eager` backend (no inductor: fast); dynamo's
    compiled shapes and counters and `sampler.COMPILES` start empty. Yields dynamo's counters
    (stats.unique_graphs: graphs traced)."""
    monkeypatch.setattr(sampler, "_compile", lambda fn: torch.compile(fn, backend="eager", dynamic=True))
    monkeypatch.setattr(sampler, "COMPILES", {"compiled": 0, "eager": 0})
    torch._dynamo.reset()  # compiled shapes of other tests would count against the limit
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_recompile_limit_warns_once_and_decodes_uncompiled(traced, monkeypatch):
    """With room for one compiled decode shape (static shapes here, so that each decoder length
    is a new one), the first decoder compiles and the next two (other lengths) decode uncompiled
    after a single one-line warning; every completion equals the no-cache greedy loop."""
    monkeypatch.setattr(sampler, "_compile", lambda fn: torch.compile(fn, backend="eager", dynamic=False))
    monkeypatch.setattr(sampler, "_MIN_WIDTH", 128)  # one width per decoder: its length
    model, tok = build_tiny_model(arch="gemma3", seed=0)
    monkeypatch.setattr(sampler, "_RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(sampler, "_LEN_ROUND", 8)  # decoders of lengths 32, 40, 64 below
    prompts = [tok.encode(s) for s in TEXTS[1:5]]  # 1..20 tokens
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for new in (6, 20, 6, 40):  # the third call replays the first decoder's graphs
            out = sampler.sample(model, prompts, max_new_tokens=new, temperature=0.0, stop_ids=set(),
                                 pad_id=tok.pad_token_id, batch_size=4)
            assert [c.token_ids for c in out] == [_greedy_no_cache(model, p, new) for p in prompts], new
    limit = [str(w.message) for w in seen if "recompile limit" in str(w.message)]
    assert len(limit) == 1 and "\n" not in limit[0], limit
    assert sampler.COMPILES == {"compiled": 1, "eager": 2} and traced["stats"]["unique_graphs"]
    assert [d.compile for d in sampler._DECODERS[model].values()] == [True, False]  # kept: lengths 32, 64


def test_one_compilation_serves_every_shape_across_calls(traced):
    """Refills, compaction to smaller buckets, two widths, three calls (the last on a new decoder
    after `release`), then a decoder of another length: the step is compiled once for greedy
    decoding (dynamo traces at most one more graph, for the single-slot bucket it specialises),
    every shape is captured, and greedy completions equal the no-cache loop."""
    model, tok = build_tiny_model(arch="gemma3", seed=0)
    prompts = [tok.encode(s) for s in TEXTS]
    free = [_greedy_no_cache(model, p, 20) for p in prompts]
    stop = _stop_with_spread(free)
    want = [f[: f.index(stop) + 1] if stop in f else f for f in free]
    decoders = []
    for run in range(3):
        if run == 2:
            sampler.release(model)
        out = sampler.sample(model, prompts, max_new_tokens=20, temperature=0.0, stop_ids={stop},
                             pad_id=tok.pad_token_id, batch_size=4)
        assert [c.token_ids for c in out] == want, run
        decoders += sampler._DECODERS[model].values()
    dec = decoders[0]
    shapes = {k[:2] for k in dec.steps}
    assert len({b for b, _ in shapes}) >= 2 and len({w for _, w in shapes}) == 2, shapes
    assert decoders[1] is dec and decoders[2] is not dec and {k[:2] for k in decoders[2].steps} == shapes
    assert list(dec.compiled) == list(decoders[2].compiled) == [(0.0, 1.0, 0)]
    out = sampler.sample(model, prompts[:2], max_new_tokens=150, temperature=0.0, stop_ids=set(),
                         pad_id=tok.pad_token_id, batch_size=4)  # max_len 256: another decoder
    assert [c.token_ids for c in out] == [_greedy_no_cache(model, p, 150) for p in prompts[:2]]
    assert sampler.COMPILES == {"compiled": traced["stats"]["unique_graphs"], "eager": 0}
    assert 1 <= traced["stats"]["unique_graphs"] <= 2, traced["stats"]


@pytest.mark.slow  # inductor compiles a 2-layer model's step: about 20 s
@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=needs_compiler),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))])
@pytest.mark.parametrize("pick", [(1.0, 1.0, 0), (0.0, 1.0, 0)], ids=["sampled", "greedy"])
def test_graph_step_compiles_forward_draw_and_update_together(pick, device):
    """The graph-mode step compiled by inductor (the sampler's `_compile`): forward, draw and
    slot update in one graph whose draw reads the logits in one fused loop (no (slots, V)
    buffer but the logits, no RNG call), and the same tokens, log-probs and slot state as the
    uncompiled step over three steps from the same prefill and seed."""
    seed, slots, vocab, max_len = 21, 4, 2048, 48
    model = build_tiny_model(arch="gemma3", vocab_size=vocab, seed=0)[0].to(device)
    prompts = torch.randint(10, vocab, (slots, 9), generator=torch.Generator().manual_seed(seed)).tolist()
    runs = []
    for compiled in (False, True):
        dec = sampler._Decoder(model, capacity=slots, max_len=max_len, graphs=True, compile=compiled)
        with torch.inference_mode(), sampler._slot_attention_on(model):
            gen = dec.begin(slots, torch.Generator(device).manual_seed(seed), 1)
            dec.prefill(torch.arange(slots).numpy(), prompts, 0, pick, gen, (), 20)
            step, stop = sampler._compile(dec._graph_step) if compiled else dec._graph_step, dec._stop((3,))
            out, code = [], []
            for k in range(3):
                if compiled and k == 0:
                    code = run_and_get_code(step, model, slots, max_len, pick, stop)[1]
                else:
                    step(model, slots, max_len, pick, stop)
                out.append([t.clone() for t in dec._state()])
        runs.append((out, "\n".join(code), int(dec.rng.count)))
    (eager, _, n0), (fused, src, n1) = runs
    assert n0 == n1 == (4 if pick[0] else 0), seed  # one draw per prefill and per step
    for a, b in zip(eager, fused):
        ids, start, col, left, live, logp = a
        assert torch.equal(ids, b[0]) and torch.equal(col, b[2]) and torch.equal(live, b[4]), seed
        torch.testing.assert_close(b[5], logp, atol=2e-5, rtol=0)
    assert not re.search(r"aten\.(rand|randint|exponential|bernoulli)|inductor_(random|seeds)", src), "an RNG call"
    wide = [line for line in src.splitlines() if re.search(rf"empty_strided\w*\(\((\w+), {vocab}\)", line)]
    assert len(wide) == 1 and "float32" in wide[0], wide  # the logits; no (slots, V) draw or hash buffer
