"""The whole trainer: phases of one step, packed vs padded micro-batches, peak memory vs vocabulary.

    test_trainer_step       Trainer.step() for GRPO (layers=1) and MGRPO (layers=2): tokens/s and
                            extra peak memory of the rollout, reference and train phases
    test_packed_vs_padded   forward + fused GRPO loss + backward over the same episodes, packed
                            (pack + packed_hidden_states) or right-padded (padded_hidden_states:
                            what a padding trainer computes); time, padding fraction, peak memory
    test_vocab_sweep        one training forward + backward at V = 4k / 64k (CUDA: 4k / 262k),
                            fused loss vs eager full logits, each in a fresh process

Models: CUDA: the default architecture (Gemma 3 270M config) with random weights, bf16 autocast
over fp32 master weights as in the Trainer; CPU: `build_tiny_model` (hidden 64), fp32. Both use
the tiny character tokenizer (random weights need no real one).
FASTMGRPO_BENCH_TRAINER="Q,G,H,C" overrides questions per step, group size, layer-2 samples and
max completion length of the first two tests.
Rewards in test_trainer_step: random weights never answer right, so every layer-2 group would be
discarded and an MGRPO step would train layer 1 only. A text-hash reward (right for about half the
answers, bench only) keeps layer-2 groups as real training does; FASTMGRPO_BENCH_REWARD=real
scores for real. l2_groups_kept / _discarded are in extra_info.
extra_info: tokens/s and seconds per phase, peak_mem_gib (extra peak over what was allocated
before: CUDA max_memory_allocated, CPU VmHWM after resetting it), sizes; test_trainer_step also
state_mem_gib (weights incl. the reference, gradients, AdamW state) and working_mem_gib = train
peak minus that (activations, logits, temporaries: the number to compare with TRL's).
"""
import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from benchutil import CUDA, DEVICE, device_name, held_models, peak_memory_bytes, state_bytes, sync, vm_kib
from fastmgrpo.kernels import GRPOLossConfig, fused_linear_grpo_loss, packed_grpo_loss
from fastmgrpo.kernels.reference import reference_grpo_loss

import fastmgrpo.mgrpo as mgrpo_mod
import fastmgrpo.trainer as trainer_mod
from fastmgrpo.attention import use_varlen_attention
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.data import synthetic_problems
from fastmgrpo.models import decoder, lm_head
from fastmgrpo.packing import microbatches, pack
from fastmgrpo.policy import packed_hidden_states
from fastmgrpo.testing import build_tiny_model, build_tiny_tokenizer, hash_reward, padded_hidden_states
from fastmgrpo.trainer import Trainer
from fastmgrpo.types import Episode

# Gemma 3 270M (the embedded default model), as in its converted config.json.
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=512, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    max_position_embeddings=32768, final_logit_softcapping=None, tie_word_embeddings=True,
)
AUTOCAST_DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sizes():
    env = os.environ.get("FASTMGRPO_BENCH_TRAINER")
    q, g, h, c = (int(x) for x in env.split(",")) if env else ((4, 8, 2, 256) if CUDA else (2, 4, 2, 16))
    return dict(questions_per_step=q, group_size=g, l2_samples=h, max_completion_length=c)


SIZES = _sizes()


def bench_model(vocab_size=None, seed=0):
    """(model, tokenizer): fp32, on DEVICE. CUDA: Gemma 3 270M architecture; CPU: tiny model."""
    if not CUDA:
        model, tok = build_tiny_model(vocab_size=vocab_size, seed=seed)
        return model, tok
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = build_tiny_tokenizer()
    config = Gemma3TextConfig(**{**GEMMA3_270M, "vocab_size": vocab_size or GEMMA3_270M["vocab_size"]},
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Tiny models on CPU: a second intra-op thread mostly spin-waits (see tests/conftest.py)."""
    n = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _autocast():
    return torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=CUDA)


def _mark():
    """Reset the peak-memory high-water mark; return current usage in bytes."""
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # no reset: VmHWM stays the process peak so far (an upper bound)
        pass
    return vm_kib("VmRSS") * 1024


def _peak_since(base):
    if CUDA:
        sync()
        return torch.cuda.max_memory_allocated() - base
    return max(0, vm_kib("VmHWM") * 1024 - base)


def _gib(nbytes):
    return None if nbytes is None else round(nbytes / 2**30, 3)


# --- Trainer.step phases ----------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2], ids=["grpo", "mgrpo"])
def test_trainer_step(benchmark, tmp_path, monkeypatch, layers):
    if os.environ.get("FASTMGRPO_BENCH_REWARD", "hash") == "hash":
        monkeypatch.setattr(mgrpo_mod, "score", hash_reward)
    model, tok = bench_model()
    cfg = MGRPOConfig(model="bench", dataset="synthetic", output_dir=str(tmp_path), device=DEVICE.type,
                      prompt_shots=0, eval_dataset="none",
                      layers=layers, beta=0.04, learning_rate=1e-6, max_steps=100, **SIZES)
    trainer = Trainer(cfg, model=model, tokenizer=tok, problems=synthetic_problems(64, seed=0))
    # Peak memory per phase: the rollout is `collect`; the rest of step() trains (incl. reference).
    # Absolute peaks (model, optimizer state and activations): CUDA max_memory_allocated, CPU VmHWM.
    peaks, collect = {"train": []}, trainer_mod.collect

    def measured_collect(*args, **kwargs):
        peaks["resident"] = base = _mark()
        out = collect(*args, **kwargs)
        peaks["rollout"] = base + _peak_since(base)
        peaks["train_base"] = _mark()
        return out

    monkeypatch.setattr(trainer_mod, "collect", measured_collect)
    history = []

    def step():
        history.append(trainer.step())
        peaks["train"].append(peaks["train_base"] + _peak_since(peaks["train_base"]))

    step()  # warm-up (allocator, optimizer state, kernel compilation)
    benchmark.group = f"trainer step {device_name()}"
    benchmark.pedantic(step, rounds=2, warmup_rounds=0, iterations=1)
    runs = history[1:]

    def mean(key):
        return sum(m[key] for m in runs) / len(runs)

    train_only = mean("train_time") - mean("ref_time")
    state = state_bytes(held_models(trainer), trainer.optimizer)
    train_peak = max(peaks["train"][1:])
    benchmark.extra_info.update(
        device=device_name(), layers=layers, **SIZES, beta=cfg.beta,
        tokens_generated=mean("tokens_generated"), tokens_trained=mean("tokens_trained"),
        rollout_s=mean("rollout_time"), ref_s=mean("ref_time"), train_s=train_only,
        rollout_tokens_per_s=round(mean("tokens_generated") / mean("rollout_time")),
        ref_tokens_per_s=round(mean("tokens_trained") / mean("ref_time")),
        train_tokens_per_s=round(mean("tokens_trained") / train_only),
        step_tokens_per_s=round((mean("tokens_generated") + mean("tokens_trained")) / mean("step_time")),
        resident_mem_gib=_gib(peaks["resident"]), rollout_peak_mem_gib=_gib(peaks["rollout"]),
        train_peak_mem_gib=_gib(train_peak), state_mem_gib=_gib(state),
        working_mem_bytes=train_peak - state, working_mem_gib=_gib(train_peak - state),
        l2_groups_kept=mean("l2_groups_kept") if layers == 2 else None,
        l2_groups_discarded=mean("l2_groups_discarded") if layers == 2 else None,
        reward=os.environ.get("FASTMGRPO_BENCH_REWARD", "hash"),
        peak_mem_gib=_gib(max(peaks["rollout"], *peaks["train"][1:])),
    )


# --- packed vs padded micro-batches -----------------------------------------------------------

def synthetic_episodes(vocab, questions, group, l2, comp_len, prompt_len, seed=0):
    """MGRPO-shaped episodes: Q*G layer-1 answers, then Q*G*H corrections whose prompts hold
    the layer-1 prompt + answer + a 16-token phrase; completion lengths uniform in [C/8, C]."""
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def episode(prompt, layer):
        c = rng.randint(max(1, comp_len // 8), comp_len)
        return Episode(prompt, tokens(c), [rng.uniform(-6, -1) for _ in range(c)], 0.0, False,
                       layer=layer, group=0, advantage=rng.gauss(0, 1))

    l1 = [episode(p, 1) for p in (tokens(rng.randint(prompt_len // 2, prompt_len)) for _ in range(questions))
          for _ in range(group)]
    l2 = [episode(e.prompt_ids + e.completion_ids + tokens(16), 2) for e in l1 for _ in range(l2)]
    return l1 + l2


def _padded_batches(episodes, n_batches):
    """Consecutive chunks in rollout order, as many as the packed micro-batches."""
    size = -(-len(episodes) // n_batches)
    return [episodes[i:i + size] for i in range(0, len(episodes), size)]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_packed_vs_padded(benchmark, layout):
    model, tok = bench_model()
    model.train()
    if layout == "packed":
        use_varlen_attention(model)  # what the trainer runs (flash-attn models keep flash-attn)
    budget = 4096 if CUDA else 512
    eps = synthetic_episodes(len(tok), SIZES["questions_per_step"], SIZES["group_size"], SIZES["l2_samples"],
                             SIZES["max_completion_length"], prompt_len=128 if CUDA else 32)
    packed_mbs = microbatches(eps, budget)
    mbs = packed_mbs if layout == "packed" else _padded_batches(eps, len(packed_mbs))
    batches = [pack(mb).to(DEVICE) for mb in mbs]  # loss inputs: the same in both layouts
    refs = [b.sampler_logprobs + 0.01 * torch.randn_like(b.sampler_logprobs) for b in batches]
    cfg = GRPOLossConfig(beta=0.04, loss_type="dapo", max_completion_length=SIZES["max_completion_length"])
    norm = {"num_sequences": len(eps), "num_tokens": sum(len(e.completion_ids) for e in eps)}
    real = sum(e.num_tokens for e in eps)
    computed = real if layout == "packed" else sum(len(mb) * max(e.num_tokens for e in mb) for mb in mbs)

    def train():
        model.zero_grad(set_to_none=True)
        for mb, batch, ref in zip(mbs, batches, refs):
            weight = lm_head(model)[0]  # fp32 master head, as the trainer passes it (d_W into fp32)
            with _autocast():
                hidden = (packed_hidden_states(model, batch) if layout == "packed"
                          else padded_hidden_states(model, mb))  # (T, H) in packed row order
            loss, _ = packed_grpo_loss(hidden[batch.target_rows].to(AUTOCAST_DTYPE), weight, batch.targets,
                                       batch.cu_targets, batch.advantages, batch.sampler_logprobs, ref,
                                       config=cfg, seq_weights=batch.weights, **norm)
            loss.backward()
        sync()

    peak = peak_memory_bytes(train)  # also the warm-up
    benchmark.group = f"packed vs padded {device_name()}"
    benchmark.pedantic(train, rounds=3, warmup_rounds=0, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=device_name(), layout=layout, sequences=len(eps), micro_batches=len(mbs),
        token_budget=budget, real_tokens=real, computed_tokens=computed,
        padding_fraction=round(1 - real / computed, 4), tokens_per_s=round(real / mean),
        peak_mem_bytes=peak, peak_mem_gib=_gib(peak),
    )


# --- peak memory vs vocabulary size, fused vs full logits --------------------------------------

VOCABS = [4096, 262144] if CUDA else [4096, 65536]
B_SWEEP, T_SWEEP = (8, 1024) if CUDA else (8, 256)


def vocab_probe(vocab: int, loss: str) -> dict:
    """One forward + loss + backward of a fresh model with `vocab` rows, in this process.

    Completion = last 3/4 of each of B_SWEEP sequences of T_SWEEP tokens; beta=0.04 with given
    reference log-probs. Returns the extra peak over the state after set-up and the time.
    """
    model, _ = bench_model(vocab_size=vocab)
    model.train()
    ids = torch.randint(0, vocab, (B_SWEEP, T_SWEEP + 1), device=DEVICE)  # (B, T+1)
    mask = torch.zeros(B_SWEEP, T_SWEEP, device=DEVICE)
    mask[:, T_SWEEP // 4:] = 1
    adv = torch.randn(B_SWEEP, device=DEVICE)
    ref = 0.01 * torch.randn(B_SWEEP, T_SWEEP, device=DEVICE) - math.log(vocab)  # ~ a random model's logp
    base = _mark()
    t0 = time.perf_counter()
    with _autocast():
        hidden = decoder(model)(input_ids=ids[:, :-1], use_cache=False).last_hidden_state  # (B, T, H)
    hidden, weight, targets = hidden.to(AUTOCAST_DTYPE), lm_head(model)[0].to(AUTOCAST_DTYPE), ids[:, 1:]
    if loss == "fused":
        out, _ = fused_linear_grpo_loss(hidden, weight, targets, mask, adv, ref_per_token_logps=ref,
                                        config=GRPOLossConfig(beta=0.04))
    else:
        out, _, _ = reference_grpo_loss(hidden, weight, targets, mask, adv, ref_logps=ref, beta=0.04)
    out.backward()
    sync()
    seconds = time.perf_counter() - t0
    return {"peak_increase_bytes": _peak_since(base), "seconds": seconds, "loss": out.item()}


@pytest.mark.parametrize("loss", ["fused", "eager"])
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v // 1024}k")
def test_vocab_sweep(benchmark, vocab, loss):
    def probe():
        out = subprocess.run([sys.executable, __file__, str(vocab), loss], capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0 and "OutOfMemoryError" in out.stderr:
            pytest.skip(f"{loss} at V={vocab} runs out of memory")
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.group = f"vocab sweep (fresh process, fwd+bwd) {device_name()}"
    result = benchmark.pedantic(probe, rounds=1, iterations=1)
    peak = result["peak_increase_bytes"]
    benchmark.extra_info.update(device=device_name(), vocab=vocab, loss=loss, B=B_SWEEP, T=T_SWEEP,
                                fwd_bwd_s=round(result["seconds"], 4), peak_mem_bytes=peak,
                                peak_mem_gib=_gib(peak), loss_value=result["loss"])


if __name__ == "__main__":  # the fresh process of test_vocab_sweep: VOCAB LOSS
    torch.manual_seed(0)
    print(json.dumps(vocab_probe(int(sys.argv[1]), sys.argv[2])))
