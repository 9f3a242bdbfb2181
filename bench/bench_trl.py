"""Side by side with TRL: `GRPOTrainer` (no vLLM) vs our Trainer with --layers 1 (plain GRPO).

Same weights (saved once to a temp dir, loaded by both), same problems, group size, lengths,
beta and steps. Providers, each in a fresh process (TRL/Liger patch model classes globally):
    trl_default   GRPOConfig at its defaults (gradient checkpointing, bf16 on CUDA)
    trl_fast      + `cache_implementation="static"`, + Liger (`use_liger_loss=True` where the
                  installed TRL has it, else `use_liger_kernel=True`; CUDA only: Triton kernels)
    fastmgrpo     our Trainer, layers=1, config defaults otherwise
Reported (extra_info), over the steps after one warm-up step: s_per_step (wall time per optimizer
step, generation included), completion_tokens_per_s, peak_mem_gib (absolute peak of the process:
CUDA max_memory_allocated, CPU VmHWM), the Liger module classes TRL actually swapped in, and
for fastmgrpo its ratios to trl_fast when both ran.
The benchmark time itself is the whole process (imports, loading, all steps). CPU runs use one
intra-op thread (tiny models; a second thread mostly spin-waits on a busy 2-core machine).

Sizes: CUDA: default architecture (Gemma 3 270M config, random weights), 8 questions x 8
generations x 256 new tokens, 2 steps; CPU: tiny model, 2 x 4 x 16, 2 steps.
FASTMGRPO_BENCH_TRL="Q,G,C,STEPS" overrides them. The TRL providers need `trl` and `datasets`
(they skip without); fastmgrpo runs regardless.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from benchutil import CUDA, device_name, held_models, state_bytes, vm_kib

from fastmgrpo.data import synthetic_problems
from fastmgrpo.prompts import layer1_prompt
from fastmgrpo.rewards import score
from fastmgrpo.types import Problem

PROVIDERS = ["trl_default", "trl_fast", "fastmgrpo"]
Q, G, C, STEPS = (int(x) for x in os.environ.get("FASTMGRPO_BENCH_TRL", "8,8,256,2" if CUDA else "2,4,16,2").split(","))
BETA, LR, SEED = 0.04, 1e-6, 0
_RESULTS = {}  # provider -> result of this session


def _problems():
    return synthetic_problems(Q * (STEPS + 1), seed=SEED)


def _peak_bytes() -> int:
    if CUDA:
        return torch.cuda.max_memory_allocated()
    return vm_kib("VmHWM") * 1024


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def run_fastmgrpo(model_dir: str, out_dir: str) -> dict:
    from fastmgrpo.config import MGRPOConfig
    from fastmgrpo.trainer import Trainer

    cfg = MGRPOConfig(model=model_dir, dataset="synthetic", output_dir=out_dir, layers=1, beta=BETA, prompt_shots=0,
                      learning_rate=LR, seed=SEED, questions_per_step=Q, group_size=G,
                      max_completion_length=C, max_steps=STEPS + 1, warmup_ratio=0.0)
    trainer = Trainer(cfg, problems=_problems())
    steps = [trainer.step() for _ in range(STEPS + 1)][1:]
    return {"step_s": [m["step_time"] for m in steps],
            "state_bytes": state_bytes(held_models(trainer), trainer.optimizer),
            "completion_tokens": [m["tokens_generated"] for m in steps],
            "rollout_s": [m["rollout_time"] for m in steps], "train_s": [m["train_time"] for m in steps]}


def run_trl(model_dir: str, out_dir: str, fast: bool) -> dict:
    import dataclasses

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": tok.decode(layer1_prompt(tok, p)), "answer": p.answer} for p in _problems()]

    def reward(completions, answer, **_):
        return [score(c, Problem("", a, "synthetic"))[0] for c, a in zip(completions, answer)]

    opts = dict(output_dir=out_dir, per_device_train_batch_size=G, gradient_accumulation_steps=Q,
                num_generations=G, max_completion_length=C, beta=BETA, learning_rate=LR, seed=SEED,
                max_steps=STEPS + 1, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, shuffle_dataset=False)
    if not CUDA:
        opts.update(bf16=False, use_cpu=True)
    if fast:
        opts["cache_implementation"] = "static"
        if CUDA:
            fields = {f.name for f in dataclasses.fields(GRPOConfig)}
            opts["use_liger_loss" if "use_liger_loss" in fields else "use_liger_kernel"] = True
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            _sync()
            times[-1] = time.perf_counter() - times[-1]

    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=GRPOConfig(**opts),
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          callbacks=[StepTimer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    liger = sorted({type(m).__name__ for m in trainer.model.modules() if "Liger" in type(m).__name__})
    ref = getattr(trainer, "ref_model", None)
    return {"step_s": times[1:], "completion_tokens": [m * Q * G for m in lengths[1:]],
            "state_bytes": state_bytes([trainer.model] + [ref] * (ref is not None), trainer.optimizer),
            "trl_options": {k: v for k, v in opts.items() if k != "output_dir"}, "liger_modules": liger}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bench_trainer import bench_model

    path = tmp_path_factory.mktemp("trl_model")
    model, tok = bench_model()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trl_side_by_side(benchmark, model_dir, tmp_path, provider):
    if provider != "fastmgrpo":  # ours runs without TRL: its numbers still count on a bare machine
        pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
        pytest.importorskip("datasets", reason="datasets is not installed (TRL needs a datasets.Dataset)")
    def run():
        out = subprocess.run([sys.executable, __file__, provider, str(model_dir), str(tmp_path)],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.group = f"TRL side by side {Q}x{G}x{C} {device_name()}"
    r = benchmark.pedantic(run, rounds=1, iterations=1)
    s_per_step = sum(r["step_s"]) / len(r["step_s"])
    tok_s = sum(r["completion_tokens"]) / sum(r["step_s"])
    working = r["peak_bytes"] - r["state_bytes"]
    _RESULTS[provider] = {"s_per_step": s_per_step, "tok_s": tok_s, "peak": r["peak_bytes"], "working": working}
    benchmark.extra_info.update(
        device=device_name(), provider=provider, questions=Q, generations=G, max_completion_length=C,
        beta=BETA, measured_steps=len(r["step_s"]), s_per_step=round(s_per_step, 3),
        completion_tokens_per_s=round(tok_s, 1), peak_mem_bytes=r["peak_bytes"],
        peak_mem_gib=round(r["peak_bytes"] / 2**30, 3), state_mem_gib=round(r["state_bytes"] / 2**30, 3),
        working_mem_bytes=working, working_mem_gib=round(working / 2**30, 3), trl_options=r.get("trl_options"),
        liger_modules=r.get("liger_modules"),
    )
    fast = _RESULTS.get("trl_fast")
    if provider == "fastmgrpo" and fast:
        benchmark.extra_info.update(tokens_per_s_vs_trl_fast=round(tok_s / fast["tok_s"], 2),
                                    peak_mem_vs_trl_fast=round(r["peak_bytes"] / fast["peak"], 2),
                                    working_mem_vs_trl_fast=round(working / max(fast["working"], 1), 2))


if __name__ == "__main__":  # the fresh process of one provider: PROVIDER MODEL_DIR OUT_DIR
    provider, model_path, out_path = sys.argv[1:4]
    if not CUDA:
        torch.set_num_threads(1)  # tiny models on a shared 2-core CPU: a second thread only spin-waits
    if provider == "fastmgrpo":
        result = run_fastmgrpo(model_path, out_path)
    else:
        result = run_trl(model_path, out_path, fast=provider == "trl_fast")
    print(json.dumps({**result, "peak_bytes": _peak_bytes()}))
