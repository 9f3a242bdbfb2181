"""Trainer: rollout -> packed micro-batches -> fused GRPO loss -> num_iterations updates, logged.

`Trainer.step()` is the whole algorithm for one step; what it calls lives in modules of its own:
mgrpo.collect (the rollout: sampled, scored layer-1 and layer-2 episodes), policy.Policy (packed
micro-batches, the fused loss and backward), checkpoint (saving and resuming).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from . import sampler
from .attention import use_varlen_attention
from .checkpoint import (RUN_FILES, checkpoint_dir, checkpoint_to_resume, gather_state, load_state,
                         load_weights, prepare_output_dir, save_checkpoint)
from .config import ConfigError, MGRPOConfig
from .data import DatasetError, load_problems, step_questions
from .decode_weights import DecodeWeights
from .distributed import Dist, full_weights
from .files import atomic_write
from .lora import apply_lora
from .metrics import Max, Same, Sum, peak_memory_gb
from .mgrpo import Rollout, collect
from .models import check_trainable, compute_dtype, load_model, padding_id, resolve_device, stop_token_ids
from .outdir import check_outputs_apart
from .policy import METRICS, Policy, StepStats
from .prompts import eval_phrase, select_shots, stop_strings, training_prompts


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad steps, out of memory); the message says what to do."""


# The signals a user's session sends to stop a run: Ctrl-C, a scheduler / `docker stop` /
# `timeout`, a closed terminal or ssh session, Ctrl-\\. The CLI turns each into a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def deferred_signals(signums=STOP_SIGNALS, deliver: bool = True):
    """Hold the stop signals back until the block ends, so the block (an optimizer step and its
    step counter, a save) runs whole or not at all; then deliver them to the usual handler, or
    with deliver=False drop them (the process is already stopping: a second Ctrl-C must not
    change how it ends)."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda n, _: pending.append(n)) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for n in dict.fromkeys(pending if deliver else ()):
            signal.raise_signal(n)


def release_kv(mode: str, kept: int, device: torch.device) -> bool:
    """Whether to drop the sampler's kept K/V (`kept` bytes) before the update (--release-kv):
    'auto' does on CUDA when what is left to PyTorch (the driver's free memory plus what its
    allocator holds unused) is under a quarter of the card, where backward's activations and the
    fused loss's chunk might not fit beside the caches."""
    if not kept or mode == "never":
        return False
    if mode == "always":
        return True
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) < total // 4


def lr_lambda(cfg: MGRPOConfig):
    """Linear warm-up over warmup_ratio of all updates, then cosine/linear decay or constant.

    The schedule counts optimizer updates (max_steps * num_iterations), not rollout steps, so a
    run with mu inner updates decays over the same fraction of its training as with mu = 1.
    """
    total = cfg.max_steps * cfg.num_iterations
    warmup = math.ceil(cfg.warmup_ratio * total)

    def f(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        progress = (update - warmup) / max(1, total - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    return f


# Micro-batches from this many tokens checkpoint by default on CUDA: Gemma 3 270M keeps about
# 88 KB per token per layer for backward without it, 5 KB with it (tests/test_trainer_memory.py
# measures both), i.e. ~3 GiB at 2,048 tokens x 18 layers against ~0.35 GiB plus one layer's
# recompute; smaller micro-batches would leave the GPU idle instead.
CHECKPOINT_FROM_TOKENS = 2048


def checkpointing(cfg: MGRPOConfig, device: torch.device) -> bool:
    """Whether decoder layers recompute their activations in backward (--gradient-checkpointing,
    or by default on CUDA for micro-batches of CHECKPOINT_FROM_TOKENS tokens or more)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return device.type == "cuda" and cfg.micro_batch_tokens >= CHECKPOINT_FROM_TOKENS


class Trainer:
    """Owns the policy, optional reference model, optimizer, data cursor and output files.

    Under torchrun each rank owns whole questions of every step (see `step`); `self.model` is
    the plain model (rollout, eval, saving) and `self.policy` its DDP/FSDP2-wrapped loss.
    """

    def __init__(self, cfg: MGRPOConfig, model=None, tokenizer=None, problems=None):
        self.cfg = cfg
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.dist, self.device = Dist.from_env(resolve_device(cfg.device))
        if cfg.questions_per_step % self.dist.world:
            raise TrainingError(f"questions_per_step={cfg.questions_per_step} must be a multiple of the "
                                f"number of ranks ({self.dist.world}): each rank takes whole questions")
        self.dtype = compute_dtype(cfg.precision, self.device)
        # Everything a user can get wrong is checked before the model loads: output folder,
        # checkpoint and its config, training and eval data.
        self.out = Path(cfg.output_dir)
        check_outputs_apart([("--output-dir", self.out / name) for name in RUN_FILES],
                            [("--model", cfg.model), ("--dataset", cfg.dataset), ("--eval-dataset", cfg.eval_dataset)])
        if self.dist.is_main:
            prepare_output_dir(self.out, resume=cfg.resume, overwrite=cfg.overwrite)
        self.dist.barrier()
        checkpoint = (checkpoint_to_resume(self.out, cfg.to_dict(), cfg.allow_config_change)
                      if cfg.resume else None)
        if problems is None:
            problems = load_problems(cfg.dataset, strict=cfg.strict_data, seed=cfg.seed)
        eval_spec = cfg.eval_spec()
        self.eval_problems = load_problems(eval_spec, limit=cfg.eval_limit, seed=cfg.seed) if eval_spec else None
        # Held-out questions are neither exemplars nor trained on (the same exemplars as
        # `fastmgrpo.eval --dataset <eval set> --seed <seed>` draws).
        held_out = {p.question for p in self.eval_problems or ()}
        try:
            self.shots = select_shots(problems, cfg.prompt_shots, cfg.seed, exclude=held_out)
        except ValueError as e:
            raise DatasetError(f"--prompt-shots {cfg.prompt_shots}: {e} in {cfg.dataset!r}") from e
        torch.manual_seed(cfg.seed)
        if model is None:
            # fp32 master weights; bf16 compute comes from autocast on GPU.
            model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=self.device)
        check_trainable(model, cfg.model)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        if cfg.lora_rank:  # adapters train; the base (the reference too) stays frozen in self.dtype
            self.model = apply_lora(self.model, cfg, self.dtype)
        use_varlen_attention(self.model)  # packed micro-batches: attention within each sequence
        if checkpointing(cfg, self.device):
            self.model.gradient_checkpointing_enable()
            if cfg.lora_rank:  # reentrant checkpoints pass gradients only to inputs that need them
                self.model.enable_input_require_grads()
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_strings = stop_strings(tokenizer, cfg.stop)
        self.pad_id = padding_id(tokenizer, self.stop_ids)
        self.problems, self.prompts, self.data_stats = training_prompts(
            tokenizer, problems, self.shots, cfg.max_prompt_length, cfg.prompt_overflow, held_out)
        # The frozen reference is the initial model (copied before a resume loads its weights), and
        # it only runs in the compute dtype: kept in it (2 bytes a parameter in bf16). Under LoRA
        # it is the policy itself with the adapters off (lora.reference_weights): no copy.
        ref_model = None
        if cfg.beta > 0:
            ref_model = self.model if cfg.lora_rank else copy.deepcopy(self.model).to(self.dtype).eval().requires_grad_(False)
        if checkpoint is not None:
            load_weights(self.model, checkpoint, self.device)  # before wrapping: FSDP2 shards what it holds
        # Sampling reads a compute-dtype copy refreshed in place before each rollout (the model
        # itself in fp32), so kept CUDA graphs read weights at fixed addresses, never autocast's.
        self.decode_weights = DecodeWeights(self.model, self.dtype)
        self.policy = Policy.build(self.model, ref_model, cfg, self.dtype, self.dist, self.pad_id)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                           betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step_idx, self.bad_steps = 0, 0
        self.last_metrics: dict | None = None  # the newest step's, set with its step counter
        if checkpoint is not None:
            state = load_state(checkpoint, self.model, self.optimizer, self.scheduler)
            self.step_idx, self.bad_steps = state["step"], state["bad_steps"]
        if self.dist.is_main:
            atomic_write(self.out / "config.json", json.dumps(cfg.to_dict(), indent=1))

    def step(self) -> dict:
        """One rollout batch and its num_iterations optimizer updates; rank r of W takes
        questions r, r+W, ... of the step's batch.

        Whole groups stay on one rank, so advantages need no communication; each layer's loss
        is normalised by that layer's global counts (sequences, tokens), and metrics come back
        reduced over ranks (loss, kl, clip_ratio, entropy, grad_norm: means over the updates).
        """
        times = {"start": time.perf_counter()}
        peak_memory_gb(self.device, reset=True)
        rollout = self._rollout()
        times["rollout"], rollout_peak = time.perf_counter(), peak_memory_gb(self.device, reset=True)
        if release_kv(self.cfg.release_kv, sampler.kept_bytes(self.decode_weights.model), self.device):
            sampler.release(self.decode_weights.model)
        self.model.train()
        plan = self.policy.plan(rollout.episodes, self.cfg.micro_batch_tokens)
        stats, updates, rates = StepStats.start(self.device), [], []
        with contextlib.ExitStack() as held:
            for it in range(self.cfg.num_iterations):
                # the decode copy equals the weights until the first update changes them
                sums = self.policy.backward(plan, stats, self.decode_weights.model if it == 0 else None)
                if it == 0:  # from the first weight change to the step counter and its metrics: all or nothing
                    held.enter_context(deferred_signals())
                rates.append(self.optimizer.param_groups[0]["lr"])  # the rate this update applies
                updates.append(self._optimizer_step(sums))
            self.step_idx += 1
            times["train"] = time.perf_counter()
            self.last_metrics = self._metrics(rollout, updates, rates, stats, times, rollout_peak)
        return self.last_metrics

    def _rollout(self) -> Rollout:
        """This rank's questions of the step, sampled from the decode copy and scored."""
        cfg, d = self.cfg, self.dist
        idx = step_questions(self.step_idx, len(self.problems), cfg.questions_per_step, cfg.seed)[d.rank::d.world]
        # Sampling RNGs are a function of (seed, step, rank): resume needs no RNG state.
        rng = random.Random(f"{cfg.seed}/{self.step_idx}/{d.rank}")
        generator = torch.Generator(device=self.device).manual_seed(rng.getrandbits(63))
        self.model.eval()
        with torch.no_grad(), self._autocast(), full_weights(self.policy.module):
            return collect(self.decode_weights.refresh(), self.tokenizer, [self.problems[i] for i in idx],
                           [self.prompts[i] for i in idx], cfg, rng=rng, generator=generator,
                           stop_ids=self.stop_ids, pad_id=self.pad_id, stop_strings=self.stop_strings)

    def _metrics(self, rollout: Rollout, updates: list, rates: list[float], stats: StepStats, times: dict,
                 rollout_peak: float) -> dict:
        """The step's metrics, each typed by how ranks combine it, reduced over ranks. `updates`:
        (METRICS sums over ranks, grad norm) per optimizer update; `rates`: the learning rate each
        update applied (logged: their mean)."""
        mis_sum, mis_max = stats.mismatch.tolist()  # the step's last host sync
        mis_sum, mis_tokens = self.dist.sum([mis_sum, stats.tokens])
        grad_norms = [g for _, g in updates]
        train_peak = peak_memory_gb(self.device)
        metrics = {
            "step": self.step_idx, **rollout.stats,
            **{k: Same(sum(v[i] for v, _ in updates) / len(updates)) for i, k in enumerate(METRICS)},
            "ref_time": Max(stats.ref_time.seconds()),
            "sampler_logp_diff_mean": Same(mis_sum / max(mis_tokens, 1)),
            "sampler_logp_diff_max": Same(self.dist.max([mis_max])[0]),
            "grad_norm": Same(sum(grad_norms) / len(grad_norms)), "lr": Same(sum(rates) / len(rates)),
            "tokens_trained": Sum(sum(e.num_tokens for e in rollout.episodes)),
            "sequences": Sum(len(rollout.episodes)),
            "rollout_time": Max(times["rollout"] - times["start"]), "train_time": Max(times["train"] - times["rollout"]),
            "step_time": Max(times["train"] - times["start"]), "rollout_peak_gb": Max(rollout_peak),
            "train_peak_gb": Max(train_peak), "peak_memory_gb": Max(max(rollout_peak, train_peak)),
            "skipped": not all(math.isfinite(g) for g in grad_norms),
        }
        return self.dist.reduce_metrics(metrics)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _optimizer_step(self, sums: torch.Tensor) -> tuple[list[float], float]:
        """Clip and apply; a NaN/Inf loss or gradient skips the update (counted, then fatal).

        sums: this rank's (K,) METRICS on the device. Returns (their sums over ranks, grad norm),
        read back in the update's one host sync."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else sums.new_zeros(())
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP2
        *values, grad_norm = torch.cat([sums, grad_norm.reshape(1).to(sums)]).tolist()
        values = self.dist.sum(values)
        if math.isfinite(values[0]) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            grad_norm, self.bad_steps = float("nan"), self.bad_steps + 1
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise TrainingError(f"{self.bad_steps} steps in a row had a NaN/Inf loss or gradient; "
                                    "lower --learning-rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return values, grad_norm

    def evaluate(self) -> dict:
        """Self-correction eval (acc@t1, acc@t2, transitions) on the held-out file, greedy."""
        from .eval import evaluate

        cfg = self.cfg
        self.model.eval()
        with torch.no_grad(), self._autocast(), full_weights(self.policy.module):
            summary, _ = evaluate(self.decode_weights.refresh(), self.tokenizer, self.eval_problems,
                                  max_new_tokens=cfg.max_completion_length, temperature=0.0, top_p=1.0,
                                  batch_size=cfg.rollout_batch_size, l2_format=cfg.l2_format,
                                  phrase=eval_phrase(cfg.guiding_phrases), pass_k=0,
                                  seed=cfg.seed, stop=self.stop_strings, shots=self.shots)
        return {f"eval_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}

    def save(self) -> Path:
        """Checkpoint the full model and optimizer state (gathered from all ranks, written by rank
        0; it loads on any number of ranks). Every rank must call it."""
        weights, tensors = gather_state(self.model, self.optimizer, self.scheduler)
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a checkpoint that cannot be used must not replace one that can
            raise TrainingError(f"weights are not finite ({bad[0]}, ...), so no checkpoint was written "
                                f"at step {self.step_idx}; lower --learning-rate")
        state = {"step": self.step_idx, "bad_steps": self.bad_steps, "config": self.cfg.to_dict()}
        if self.dist.is_main:
            save_checkpoint(self.out, self.step_idx, self.model, self.tokenizer, tensors, state,
                            keep=self.cfg.keep_checkpoints, weights=weights)
        self.dist.barrier()  # nobody reads or resumes before rank 0 is done
        return checkpoint_dir(self.out, self.step_idx)
