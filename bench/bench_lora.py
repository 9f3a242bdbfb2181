"""LoRA (--lora-rank 16) vs full fine-tuning: held bytes per parameter, peak memory, one step.

    test_full_vs_lora[full|lora]  one Trainer step on the default model (Gemma 3 270M, the
                                  cached conversion) in a fresh process per mode (peaks do not
                                  mix): held bytes per base parameter (weights of every model the
                                  trainer keeps, gradients, AdamW state: benchutil.state_bytes),
                                  peak memory of the step (CUDA max_memory_allocated, CPU VmHWM),
                                  step / rollout / train seconds; LoRA also times one merge into
                                  the decode copy and a greedy decode (4 x 32 tokens) from the
                                  merged copy vs from the PEFT model with adapters unmerged
    test_projection               held bytes of Qwen2.5-1.5B and Llama-3-8B shapes (meta-device
                                  models, no weights) on one GPU, full vs LoRA r=16, against 80 GB

Short settings (one question, group of 4, 32 new tokens, layer 1 only, beta 0.04): the step
time is a comparison, not a throughput number; on a shared CPU it moves with the load.
FASTMGRPO_BENCH_LORA="Q,G,C" overrides questions, group size and completion length.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from benchutil import CUDA, device_name, held_models, state_bytes, vm_kib

RANK = 16
GB = 1e9


def _settings():
    q, g, c = (int(x) for x in os.environ.get("FASTMGRPO_BENCH_LORA", "1,4,32").split(","))
    return dict(questions_per_step=q, group_size=g, max_completion_length=c)


def _reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes():
    return torch.cuda.max_memory_allocated() if CUDA else vm_kib("VmHWM") * 1024


def one_step(mode: str) -> dict:
    """Build a Trainer on the default model (`mode` 'full' or 'lora'), run one step; in this process."""
    import tempfile

    from fastmgrpo.config import MGRPOConfig
    from fastmgrpo.trainer import Trainer

    lora = dict(lora_rank=RANK, lora_alpha=2.0 * RANK) if mode == "lora" else {}
    cfg = MGRPOConfig(dataset="synthetic:64", output_dir=tempfile.mkdtemp(), layers=1, beta=0.04,
                      learning_rate=1e-6, **_settings(), **lora)
    trainer = Trainer(cfg)
    base = {p.data_ptr(): p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    params = sum(p.numel() for p in base.values())  # the model's own, each tied tensor once
    _reset_peak()
    metrics = trainer.step()
    held = state_bytes(held_models(trainer), trainer.optimizer)  # AdamW state exists after a step
    trained = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    decode = decode_costs(trainer) if mode == "lora" else {}
    return {"mode": mode, "device": device_name(), "base_params": params, "trained_params": trained, **decode,
            "held_bytes": held, "held_bytes_per_base_param": round(held / params, 2),
            "step_peak_bytes": _peak_bytes(), "step_s": metrics["step_time"],
            "rollout_s": metrics["rollout_time"], "train_s": metrics["train_time"],
            "ref_s": metrics["ref_time"], "tokens_trained": metrics["tokens_trained"], **_settings()}


def decode_costs(trainer, prompts: int = 4, new_tokens: int = 32) -> dict:
    """Seconds of one merge into the decode copy (what each rollout adds) and of a greedy decode
    of `prompts` x `new_tokens` from the merged copy and from the PEFT model, adapters unmerged."""
    from fastmgrpo.sampler import sample

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    ids = trainer.prompts[:prompts]
    with torch.no_grad(), trainer._autocast():
        merged, merge_s = timed(trainer.decode_weights.refresh)
        runs = {name: timed(lambda m=m: sample(m, ids, max_new_tokens=new_tokens, temperature=0.0, stop_ids=set(),
                                                 pad_id=trainer.pad_id))
                for name, m in (("merged", merged), ("unmerged", trainer.model.eval()))}
    (a, merged_s), (b, unmerged_s) = runs["merged"], runs["unmerged"]
    return {"merge_s": merge_s, "decode_merged_s": merged_s, "decode_unmerged_s": unmerged_s,
            "decode_tokens": prompts * new_tokens,
            "decode_same_tokens": [c.token_ids for c in a] == [c.token_ids for c in b]}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_full_vs_lora(benchmark, mode):
    pytest.importorskip("peft")

    def probe():
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}

    benchmark.group = f"full vs LoRA r={RANK}, default model, one step {device_name()}"
    result = benchmark.pedantic(probe, rounds=1, iterations=1)
    benchmark.extra_info.update(result, step_peak_gib=round(result["step_peak_bytes"] / 2**30, 3),
                                held_gib=round(result["held_bytes"] / 2**30, 3))
    print(json.dumps(result))


# Decoder shapes (public configs): Qwen2.5-1.5B (tied head) and Llama-3-8B.
LARGE = {
    "Qwen2.5-1.5B": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   tie_word_embeddings=True)),
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 tie_word_embeddings=False)),
}


def projected_gb(arch: str, shape: dict) -> dict:
    """Held GB on one GPU (bf16 compute, beta > 0): full = fp32 master + fp32 gradient + AdamW
    (2 x fp32) + bf16 reference + bf16 decode copy = 20 B/param; LoRA = bf16 frozen base + bf16
    merged decode copy = 4 B/param, plus 16 B per adapter parameter (fp32, gradient, AdamW)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **shape))
    params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "adapter_params": adapters, "full_gb": 20 * params / GB,
            "lora_gb": (4 * params + 16 * adapters) / GB}


def test_projection():
    pytest.importorskip("peft")
    rows = {name: projected_gb(arch, shape) for name, (arch, shape) in LARGE.items()}
    for name, r in rows.items():
        print(f"{name}: {r['params'] / 1e9:.2f}B params, {r['adapter_params'] / 1e6:.1f}M adapter params; "
              f"held full {r['full_gb']:.1f} GB, LoRA r={RANK} {r['lora_gb']:.1f} GB (80 GB GPU)")
    assert rows["Llama-3-8B"]["full_gb"] > 80 > 2 * rows["Llama-3-8B"]["lora_gb"]


if __name__ == "__main__":  # the fresh process of test_full_vs_lora: MODE
    print(json.dumps(one_step(sys.argv[1])))
