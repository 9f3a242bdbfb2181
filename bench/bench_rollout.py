"""Sampler throughput: generated tokens/s of `fastmgrpo.sampler.sample` vs transformers'
`model.generate` on the same model, prompts and lengths (sampling at T=1, every sequence forced
to exactly NEW tokens: no stop ids for ours, min_new_tokens for generate).

Providers:
    fastmgrpo       continuous batching over the slot cache, on a copy of the model whose q/k/v
                    and gate/up projections are fused (as the trainer's decode copy); on CUDA the
                    decode step (forward + sampling) is torch.compile'd and replayed from a kept
                    CUDA graph
    hf_static       generate(cache_implementation="static"): compiles the decode step on CUDA
    hf_dynamic      generate() with its default dynamic cache
Each is timed after one warm-up call (which also compiles / captures; its time is first_call_s).
CUDA: Gemma 3 270M architecture (random bf16 weights), 64 and 256 sequences × 256 new tokens,
      prompts of 16..128 tokens. CPU (one thread): the tiny test Gemma 3 (V=32768), 32 sequences × 64 tokens, prompts
      of 4..24 tokens.
extra_info: tokens_per_s, first_call_s; on fastmgrpo also ratio_vs_fastest_generate (filled in
once the generate providers of the same shape have run in this session) and, on CUDA,
kernels_per_decode_step (GPU kernels one replay of the kept full-batch decode graph launches,
counted by torch.profiler; the eager Gemma 3 270M step launches about 1,550).
FASTMGRPO_BENCH_ROLLOUT="N,NEW;N,NEW" overrides the shapes; FASTMGRPO_BENCH_ROLLOUT_COMPILE=0
captures the decode step uncompiled.
"""
import copy
import os
import time

import pytest
import torch
from benchutil import CUDA, DEVICE, device_name, sync
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from fastmgrpo import sampler
from fastmgrpo.fused_linears import fuse_linears
from fastmgrpo.sampler import sample
from fastmgrpo.testing import build_tiny_model

PROVIDERS = ["fastmgrpo", "hf_static", "hf_dynamic"]
_SHAPES = os.environ.get("FASTMGRPO_BENCH_ROLLOUT", "64,256;256,256" if CUDA else "32,64")
SHAPES = [tuple(int(x) for x in s.split(",")) for s in _SHAPES.split(";") if s.strip()]
PROMPT_LEN = (16, 128) if CUDA else (4, 24)
COMPILE = os.environ.get("FASTMGRPO_BENCH_ROLLOUT_COMPILE", "1") != "0"
_RESULTS: dict[tuple[int, int], dict[str, object]] = {}  # shape -> provider -> tok/s or extra_info
_DECODE_COPIES: dict[int, torch.nn.Module] = {}  # id(model) -> its fused copy


def _decode_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with q/k/v and gate/up fused, as `DecodeWeights` gives the trainer's sampler."""
    if id(model) not in _DECODE_COPIES:
        _DECODE_COPIES[id(model)] = copy.deepcopy(model).requires_grad_(False)
        fuse_linears(_DECODE_COPIES[id(model)])
    return _DECODE_COPIES[id(model)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread on CPU: the tiny model spin-waits with two (as in tests/conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1 if not CUDA else n)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    if not CUDA:
        return build_tiny_model(arch="gemma3", vocab_size=32768, seed=0)[0]
    # Gemma 3 270M (the default model's config); random weights: speed does not depend on them
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, layer_types=types, max_position_embeddings=32768, rms_norm_eps=1e-6,
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def _prompts(n, vocab):
    g = torch.Generator().manual_seed(n)
    lens = torch.randint(PROMPT_LEN[0], PROMPT_LEN[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lens]  # no special ids


def _target(provider, model, prompts, new):
    if provider == "fastmgrpo":
        gen = torch.Generator(DEVICE).manual_seed(0)
        decode = _decode_copy(model)

        def run():
            sample(decode, prompts, max_new_tokens=new, temperature=1.0, stop_ids=set(), pad_id=0,
                   batch_size=len(prompts), generator=gen, compile=COMPILE)
            sync()
        return run
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)  # (N, L) left-padded
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=0, eos_token_id=1)
    if provider == "hf_static":
        kw["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert out.shape[1] == width + new
        sync()
    return run


@pytest.mark.parametrize("shape,provider", [(s, p) for s in SHAPES for p in PROVIDERS],
                         ids=[f"{s[0]}x{s[1]}-{p}" for s in SHAPES for p in PROVIDERS])
def test_rollout(benchmark, model, shape, provider):
    n, new = shape
    target = _target(provider, model, _prompts(n, model.config.vocab_size), new)
    benchmark.extra_info.update(device=device_name(), provider=provider, sequences=n, new_tokens=new,
                                prompt_len=list(PROMPT_LEN), dtype=str(model.dtype))
    t0 = time.perf_counter()
    target()  # warm-up: compiles and captures (fastmgrpo), compiles (hf_static on CUDA)
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - t0, 2)
    benchmark.pedantic(target, rounds=1 if CUDA else 3, warmup_rounds=0, iterations=1)
    if provider == "fastmgrpo" and CUDA:
        benchmark.extra_info.update(compile=COMPILE, kernels_per_decode_step=_kernels_per_step(_decode_copy(model)))
    toks = n * new / benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = round(toks, 1)
    print(f"\n{provider} {n}x{new}: {toks:.0f} tok/s")  # in the log even if a later provider times out
    seen = _RESULTS.setdefault(shape, {})
    seen[provider] = toks
    if provider == "fastmgrpo":
        seen["info"] = benchmark.extra_info  # the JSON is written at session end: fill in later
    hf = [seen[p] for p in ("hf_static", "hf_dynamic") if p in seen]
    if "info" in seen and hf:
        seen["info"]["ratio_vs_fastest_generate"] = round(seen["fastmgrpo"] / max(hf), 2)


def _kernels_per_step(model, replays: int = 8) -> float:
    """GPU kernels per replay of the full-batch decode step `sample` kept for `model` (all its
    slots are idle after the call, so replays leave the slot state as it is)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dec = next(reversed(sampler._DECODERS[model].values()))  # the most recently used decoder
    step = next(s for key, s in dec.steps.items() if key[0] == dec.capacity)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return round(len(kernels) / replays, 1)
