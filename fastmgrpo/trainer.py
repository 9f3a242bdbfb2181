"""Trainer: rollout -> packed micro-batches -> fused GRPO loss -> num_iterations updates, logged.

`Trainer.step()` is the whole algorithm for one step; everything it calls is a plain function
in its own module (mgrpo.collect, packing.pack, kernels.packed_grpo_loss, ...).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import resource
import signal
import threading
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from .attention import use_varlen_attention
from .checkpoint import (checkpoint_dir, latest_checkpoint, load_trainer_state, prepare_output_dir,
                         save_checkpoint)
from .config import MGRPOConfig
from .data import load_problems
from .decode_weights import DecodeWeights
from .distributed import Dist, full_weights, no_grad_sync, wrap
from .kernels import GRPOLossConfig, packed_grpo_loss, token_logprobs
from .mgrpo import collect
from .models import compute_dtype, decoder, lm_head, load_model, padding_id, resolve_device, stop_token_ids
from .packing import microbatches, pack, packed_hidden_states
from .prompts import eval_phrase, layer1_prompt, select_shots, stop_strings
from .types import Episode


PROBE_NORM = {"num_sequences": 1, "num_tokens": 1}
METRICS = ("loss", "kl", "clip_ratio", "entropy")  # per update; global means after a sum over ranks


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad steps, out of memory); the message says what to do."""


# Options that may differ between a checkpoint and the run resuming it: where and how it runs,
# how long, and what it logs. Any other difference changes the run (--allow-config-change).
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "allow_config_change", "output_dir", "max_steps", "save_every",
    "keep_checkpoints", "eval_dataset", "eval_every", "eval_limit", "tensorboard", "max_bad_steps",
    "device", "precision", "micro_batch_tokens", "rollout_batch_size", "gradient_checkpointing",
    "fsdp", "strict_data",
})


def config_changes(saved: dict, cfg: MGRPOConfig) -> list[str]:
    """'key: old -> new' for every run-changing option where `cfg` differs from `saved`."""
    now = cfg.to_dict()
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & saved.keys())
            if k not in RESUMABLE_CHANGES and saved[k] != now[k]]


@contextlib.contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT/SIGTERM back until the block ends, then deliver them to the usual handler, so
    the block (an optimizer step and its step counter) runs whole or not at all."""
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
        for n in dict.fromkeys(pending):
            signal.raise_signal(n)


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


def peak_memory_gb(device: torch.device, reset: bool = False) -> float:
    """Peak GPU memory allocated since the last reset (reset=True starts a new phase); on CPU the
    process's peak resident memory (it cannot be reset per phase)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def loss_config(cfg: MGRPOConfig) -> GRPOLossConfig:
    return GRPOLossConfig(
        beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
        importance_sampling_level=cfg.importance_sampling_level,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        temperature=cfg.temperature or 1.0, delta=cfg.delta,
        use_bias_correction_kl=cfg.use_bias_correction_kl, entropy_coef=cfg.entropy_coef,
        memory_budget=cfg.loss_memory_mib * 2**20,
    )


def hidden_rows(model, batch, dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states at the rows that predict completion tokens: (M, H)."""
    with torch.autocast(batch.input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = packed_hidden_states(model, batch)
    return hidden[batch.target_rows].to(dtype)


class Stopwatch:
    """Time summed over `with` blocks, read once at the end: CUDA events on a GPU (no host sync
    per block; the host returns before the device work is done), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda, self.spans, self.total = device.type == "cuda", [], 0.0

    def __enter__(self):
        if self.cuda:
            self.spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.spans[-1][0].record()
        else:
            self.total -= time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.spans[-1][1].record()
        else:
            self.total += time.perf_counter()

    def seconds(self) -> float:
        """The summed time; on CUDA this waits for the last block's events."""
        if self.spans:
            self.spans[-1][1].synchronize()
        return self.total + sum(a.elapsed_time(b) for a, b in self.spans) / 1e3


class PolicyLoss(torch.nn.Module):
    """The policy's loss on one packed micro-batch, as the forward that DDP / FSDP2 wrap.

    sampler_is_cap: cap C of the truncated importance-sampling correction min(pi_old /
    pi_sampler, C) per token (None: off).
    """

    def __init__(self, model, loss_cfg: GRPOLossConfig, dtype: torch.dtype, sampler_is_cap=None):
        super().__init__()
        self.model, self.loss_cfg, self.dtype, self.sampler_is_cap = model, loss_cfg, dtype, sampler_is_cap

    def forward(self, batch, ref_lp, old_lp, normaliser: dict):
        """old_lp None (the first update on a rollout): the current weights are the old policy,
        so the ratio is exactly 1, and their log-probs come back (detached, (M,) fp32) to be
        frozen for later updates; otherwise old_lp is used and None comes back."""
        # The fp32 master head goes in as it is: the fused pass computes in hidden's dtype and
        # adds d_W straight into the fp32 .grad (no 16-bit (V, H) copy kept for backward).
        weight, bias = lm_head(self.model)
        hidden = hidden_rows(self.model, batch, self.dtype)  # (M, H)
        logp = None
        if old_lp is None and self.sampler_is_cap is not None:  # the IS ratio is needed before the loss
            with torch.no_grad():
                logp = token_logprobs(hidden.detach(), weight, batch.targets, temperature=self.loss_cfg.temperature,
                                      bias=bias, memory_budget=self.loss_cfg.memory_budget, check_values=False)
        is_ratio = None
        if self.sampler_is_cap is not None:
            frozen = logp if old_lp is None else old_lp
            is_ratio = (frozen - batch.sampler_logprobs).exp().clamp(max=self.sampler_is_cap)  # (M,)
        loss, metrics = packed_grpo_loss(
            hidden, weight, batch.targets, batch.cu_targets, batch.advantages, old_lp, ref_lp,
            config=self.loss_cfg, bias=bias, seq_weights=batch.weights, vllm_is_ratio=is_ratio,
            return_entropy=True, return_logprobs=old_lp is None and logp is None,
            cu_seqlens_host=batch.cu_targets_host or None, check_values=False, **normaliser)
        logp = metrics.pop("logprobs", logp)  # the fused pass's own log-probs: no extra LM-head pass
        return loss, metrics, logp


class Trainer:
    """Owns the policy, optional reference model, optimizer, data cursor and output files.

    Under torchrun each rank owns whole questions of every step (see `step`); `self.model` is
    the plain model (rollout, eval, saving) and `self.policy` its DDP/FSDP2-wrapped loss.
    """

    def __init__(self, cfg: MGRPOConfig, model=None, tokenizer=None, problems=None):
        self.cfg = cfg
        self.dist, self.device = Dist.from_env(resolve_device(cfg.device))
        if cfg.questions_per_step % self.dist.world:
            raise TrainingError(f"questions_per_step={cfg.questions_per_step} must be a multiple of the "
                                f"number of ranks ({self.dist.world}): each rank takes whole questions")
        self.dtype = compute_dtype(cfg.precision, self.device)
        # Everything a user can get wrong is checked before the model loads: output folder,
        # checkpoint and its config, training and eval data.
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            prepare_output_dir(self.out, resume=cfg.resume, overwrite=cfg.overwrite)
        self.dist.barrier()
        checkpoint = self._checkpoint_to_resume() if cfg.resume else None
        if problems is None:
            problems = load_problems(cfg.dataset, strict=cfg.strict_data, seed=cfg.seed)
        self.eval_problems = (load_problems(cfg.eval_dataset, limit=cfg.eval_limit, seed=cfg.seed)
                              if cfg.eval_dataset else None)
        torch.manual_seed(cfg.seed)
        if model is None:
            # fp32 master weights; bf16 compute comes from autocast on GPU.
            model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=self.device)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        use_varlen_attention(self.model)  # packed micro-batches: attention within each sequence
        if checkpointing(cfg, self.device):
            self.model.gradient_checkpointing_enable()
        self.ref_model = None
        if cfg.beta > 0:
            # The frozen reference only runs under autocast in the compute dtype: keep it in that
            # dtype (2 bytes a parameter in bf16 instead of 4 for an fp32 copy).
            self.ref_model = copy.deepcopy(self.model).to(self.dtype).eval().requires_grad_(False)
        # Sampling reads a compute-dtype copy refreshed in place before each rollout (the model
        # itself in fp32), so kept CUDA graphs read weights at fixed addresses, never autocast's.
        self.decode_weights = DecodeWeights(self.model, self.dtype)
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_strings = stop_strings(tokenizer, cfg.stop)
        self.pad_id = padding_id(tokenizer, self.stop_ids)
        self.problems, self.prompts, self.data_stats = self._load_data(problems)
        if checkpoint is not None:
            self._load_weights(checkpoint)  # before wrapping: FSDP2 shards what the model holds
        self.loss_cfg = loss_config(cfg)
        self.policy = wrap(PolicyLoss(self.model, self.loss_cfg, self.dtype, cfg.sampler_is_cap),
                           decoder(self.model).layers, self.dist, cfg.fsdp)
        # A one-token, zero-weight micro-batch: pads a rank's micro-batches to the most any rank
        # has (FSDP2 gathers weights in every forward: the counts must agree), and runs the FSDP2
        # root first (FSDP2 takes the first module to run forward as its root; rollout would
        # otherwise run the layers first).
        self._probe = (pack([Episode([self.pad_id], [self.pad_id], [0.0], 0.0, False, layer=1, group=0)]).to(
            self.device), None if self.ref_model is None else torch.zeros(1, device=self.device))
        with torch.no_grad(), full_weights(self.policy):  # which also leaves every unit sharded
            self.policy(*self._probe, None, PROBE_NORM)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step_idx, self.bad_steps = 0, 0
        if checkpoint is not None:
            self._load_state(checkpoint)
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1), encoding="utf-8")

    # --- data -----------------------------------------------------------------------------
    def _load_data(self, problems):
        cfg = self.cfg
        # Exemplars leave the training set: a question must not be trained on with its answer shown.
        self.shots = select_shots(problems, cfg.prompt_shots, cfg.seed)
        shown = {s.question for s in self.shots}
        kept, prompts, truncated, skipped = [], [], 0, 0
        for p in (p for p in problems if p.question not in shown):
            ids = layer1_prompt(self.tokenizer, p, self.shots)
            if len(ids) > cfg.max_prompt_length:
                if cfg.prompt_overflow == "skip":
                    skipped += 1
                    continue
                ids, truncated = ids[-cfg.max_prompt_length:], truncated + 1
            kept.append(p)
            prompts.append(ids)
        if not problems:
            raise TrainingError(f"no problems in {cfg.dataset!r}")
        if not kept:
            raise TrainingError(f"no usable problems in {cfg.dataset!r}: all {skipped} prompts exceed "
                                f"max_prompt_length={cfg.max_prompt_length}")
        return kept, prompts, {"problems": len(kept), "prompts_skipped": skipped,
                               "prompts_truncated": truncated}

    def _batch_indices(self, step: int) -> list[int]:
        """Questions of `step`: a fresh seeded permutation per epoch, so resume needs only `step`."""
        n, q = len(self.problems), self.cfg.questions_per_step
        out = []
        for k in range(step * q, step * q + q):
            epoch, pos = divmod(k, n)
            perm = list(range(n))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(perm)
            out.append(perm[pos])
        return out

    # --- one step -------------------------------------------------------------------------
    def step(self) -> dict:
        """One rollout batch and its num_iterations optimizer updates; rank r of W takes
        questions r, r+W, ... of the step's batch.

        Whole groups stay on one rank, so advantages need no communication; each layer's loss
        is normalised by that layer's global counts (sequences, tokens), and metrics come back
        reduced over ranks (loss, kl, clip_ratio, entropy, grad_norm: means over the updates).
        """
        cfg, d, t0 = self.cfg, self.dist, time.perf_counter()
        peak_memory_gb(self.device, reset=True)
        idx = self._batch_indices(self.step_idx)[d.rank::d.world]
        # Sampling RNGs are a function of (seed, step, rank): resume needs no RNG state.
        rng = random.Random(f"{cfg.seed}/{self.step_idx}/{d.rank}")
        generator = torch.Generator(device=self.device).manual_seed(rng.getrandbits(63))
        self.model.eval()
        with torch.no_grad(), self._autocast(), full_weights(self.policy):
            rollout = collect(self.decode_weights.refresh(), self.tokenizer, [self.problems[i] for i in idx],
                              [self.prompts[i] for i in idx], cfg, rng=rng, generator=generator,
                              stop_ids=self.stop_ids, pad_id=self.pad_id, stop_strings=self.stop_strings)
        t_rollout, rollout_peak = time.perf_counter(), peak_memory_gb(self.device, reset=True)
        episodes = rollout.episodes
        self.model.train()
        plan = self._plan(episodes)
        caches = [{} for _ in plan]  # per micro-batch: ref and frozen old log-probs
        totals = dict.fromkeys(METRICS, 0.0)
        # Metrics stay on the device ((K,) tensors) until one read-back per update (the optimizer
        # step needs the loss) and one at the end of the step: micro-batches add no host syncs.
        side = {"ref_time": Stopwatch(self.device), "mismatch": torch.zeros(2, device=self.device),
                "mismatch_tokens": 0}  # mismatch: (sum, max) of |old - sampler log-prob|
        grad_norms = []
        with contextlib.ExitStack() as held:
            for it in range(cfg.num_iterations):
                update = torch.zeros(len(METRICS), device=self.device)
                for i, (mb, cache) in enumerate(zip(plan, caches)):
                    with no_grad_sync(self.policy, skip=i < len(plan) - 1):  # reduce gradients once
                        self._accumulate(mb, cache, update, side)
                if it == 0:  # from the first weight change to the step counter: all or nothing
                    held.enter_context(deferred_signals())
                values, grad_norm = self._optimizer_step(update)
                grad_norms.append(grad_norm)
                for k, v in zip(METRICS, values):
                    totals[k] += v / cfg.num_iterations
            self.step_idx += 1
        mis_sum, mis_max = side["mismatch"].tolist()  # the step's last host sync
        mis_sum, mis_tokens = d.sum([mis_sum, side["mismatch_tokens"]])
        t_end = time.perf_counter()
        metrics = {
            "step": self.step_idx, **rollout.stats, **totals, "ref_time": side["ref_time"].seconds(),
            "sampler_logp_diff_mean": mis_sum / max(mis_tokens, 1),
            "sampler_logp_diff_max": d.max([mis_max])[0],
            "grad_norm": sum(grad_norms) / len(grad_norms), "lr": self.scheduler.get_last_lr()[0],
            "tokens_trained": float(sum(e.num_tokens for e in episodes)),
            "sequences": float(len(episodes)), "padding_fraction": 0.0,
            "rollout_time": t_rollout - t0, "train_time": t_end - t_rollout, "step_time": t_end - t0,
            "rollout_peak_gb": rollout_peak, "train_peak_gb": (train_peak := peak_memory_gb(self.device)),
            "peak_memory_gb": max(rollout_peak, train_peak),
            "skipped": not all(math.isfinite(g) for g in grad_norms),
        }
        # Already global: step, lr, grad_norm, the summed totals and the mismatch (averaging keeps them).
        return d.reduce_metrics(
            metrics, sums={"tokens_generated", "tokens_trained", "sequences", "l2_groups_kept",
                           "l2_groups_discarded"},
            maxes={"ref_time", "rollout_time", "train_time", "step_time", "peak_memory_gb",
                   "rollout_peak_gb", "train_peak_gb"})

    def _plan(self, episodes: list[Episode]) -> list:
        """Packed micro-batches on the device, each holding one layer, as (batch, normaliser,
        share) with that layer's global counts (J = w1*J_L1 + w2*J_L2, so layer 2 never dilutes
        layer 1) and share = its fraction of all global completion tokens (metrics, which the
        loss returns as per-layer token means, add up to means over all tokens). None entries
        are the zero-weight probe, padding every rank to the most micro-batches any rank has.
        Packed once per rollout: the inner updates reuse them."""
        layers = (1, 2)
        local = [[e for e in episodes if e.layer == layer] for layer in layers]
        counts = self.dist.sum([x for eps in local  # [n_seq_1, n_tok_1, n_seq_2, n_tok_2]
                                for x in (len(eps), sum(len(e.completion_ids) for e in eps))])
        all_tokens = max(1.0, sum(counts[1::2]))
        plan = []
        for k, eps in enumerate(local):
            n_seq, n_tok = int(counts[2 * k]), int(counts[2 * k + 1])
            norm = {"num_sequences": max(1, n_seq), "num_tokens": max(1, n_tok)}
            plan += [(pack(mb).to(self.device), norm, n_tok / all_tokens)
                     for mb in microbatches(eps, self.cfg.micro_batch_tokens)]
        return plan + [None] * (int(self.dist.max([len(plan)])[0]) - len(plan))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _ref_logprobs(self, batch) -> torch.Tensor | None:
        if self.ref_model is None:
            return None
        with torch.no_grad():
            w, b = lm_head(self.ref_model)
            return token_logprobs(hidden_rows(self.ref_model, batch, self.dtype), w, batch.targets,
                                  temperature=self.loss_cfg.temperature, bias=b,
                                  memory_budget=self.loss_cfg.memory_budget, check_values=False)

    def _accumulate(self, entry, cache: dict, update: torch.Tensor, side: dict) -> None:
        """Forward + backward of one plan entry (None: the zero-weight probe); gradients add up
        across micro-batches, and so do the METRICS into `update` ((K,) fp32, on the device; no
        host sync). `cache` keeps what the inner updates share: the reference log-probs and the
        old log-probs frozen on the first update."""
        if entry is None:
            loss, _, _ = self.policy(*self._probe, None, PROBE_NORM)
            (loss * 0.0).backward()
            return
        batch, normaliser, share = entry
        if "ref" not in cache:
            with side["ref_time"]:
                cache["ref"] = self._ref_logprobs(batch)
        loss, m, logp = self.policy(batch, cache["ref"], cache.get("old"), normaliser)
        if logp is not None:
            cache["old"] = logp
            diff = (logp - batch.sampler_logprobs).abs()  # (M,)
            if diff.numel():
                mis = side["mismatch"]
                side["mismatch"] = torch.stack([mis[0] + diff.sum(), torch.maximum(mis[1], diff.max())])
                side["mismatch_tokens"] += diff.numel()
        # DDP/FSDP2 average gradients over ranks; each rank's loss is its share of the global sum.
        (loss * self.dist.world).backward()
        # Losses are divided by their layer's global counts: micro-batch values add up; the
        # metrics are per-layer token means, weighted by the layer's share of all tokens.
        zero = loss.new_zeros(())
        update += torch.stack([loss.detach()] + [m.get(k, zero) * share for k in METRICS[1:]])

    def _optimizer_step(self, update: torch.Tensor) -> tuple[list[float], float]:
        """Clip and apply; a NaN/Inf loss or gradient skips the update (counted, then fatal).

        update: this rank's (K,) METRICS on the device. Returns (their sums over ranks, grad norm),
        read back in the update's one host sync."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else update.new_zeros(())
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP2
        *values, grad_norm = torch.cat([update, grad_norm.reshape(1).to(update)]).tolist()
        values = self.dist.sum(values)
        loss = values[0]
        if math.isfinite(loss) and math.isfinite(grad_norm):
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
        with torch.no_grad(), self._autocast(), full_weights(self.policy):
            summary, _ = evaluate(self.decode_weights.refresh(), self.tokenizer, self.eval_problems,
                                  max_new_tokens=cfg.max_completion_length, temperature=0.0, top_p=1.0,
                                  batch_size=cfg.rollout_batch_size, l2_format=cfg.l2_format,
                                  phrase=eval_phrase(cfg.guiding_phrases), pass_k=0,
                                  seed=cfg.seed, stop=self.stop_strings, shots=self.shots)
        return {f"eval_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}

    # --- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the full model and optimizer state (gathered from all ranks, written by rank
        0; it loads on any number of ranks). Every rank must call it."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        named = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        # Tied weights (gathered into separate copies) are saved once, under the model's own name.
        weights = {k: v for k, v in get_model_state_dict(self.model, options=full).items() if k in named}
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a checkpoint that cannot be used must not replace one that can
            raise TrainingError(f"weights are not finite ({bad[0]}, ...), so no checkpoint was written "
                                f"at step {self.step_idx}; lower --learning-rate")
        tensors = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=full),
                   "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        state = {"step": self.step_idx, "bad_steps": self.bad_steps, "config": self.cfg.to_dict()}
        if self.dist.is_main:
            save_checkpoint(self.out, self.step_idx, self.model, self.tokenizer, tensors, state,
                            keep=self.cfg.keep_checkpoints, weights=weights)
        self.dist.barrier()  # nobody reads or resumes before rank 0 is done
        return checkpoint_dir(self.out, self.step_idx)

    def _checkpoint_to_resume(self) -> Path:
        """The checkpoint --resume continues from, its config checked against this run's."""
        path = latest_checkpoint(self.out)
        if path is None:
            raise TrainingError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("config", {})
        changes = config_changes(saved, self.cfg)
        if changes and not self.cfg.allow_config_change:
            raise TrainingError(f"--resume from {path}: options differ from the checkpoint's run "
                                f"({'; '.join(changes)}); pass --allow-config-change to accept them")
        return path

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise TrainingError(f"{path}: cannot load model.safetensors ({e})") from e
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise TrainingError(f"{path}: checkpoint does not match the model "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def _load_state(self, path: Path) -> None:
        """Optimizer (sharded again under FSDP2), scheduler, RNG and step of a checkpoint."""
        try:
            tensors, state = load_trainer_state(path)
            set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(tensors["scheduler"])
            torch.set_rng_state(tensors["torch_rng"])
            self.step_idx, self.bad_steps = state["step"], state["bad_steps"]
        except Exception as e:  # noqa: BLE001 - torch.load / state-dict errors come in many types
            raise TrainingError(f"{path}: cannot load the trainer state ({type(e).__name__}: {e})") from e
