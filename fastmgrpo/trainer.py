"""Trainer: rollout -> packed micro-batches -> fused GRPO loss -> one optimizer step, logged.

`Trainer.step()` is the whole algorithm for one step; everything it calls is a plain function
in its own module (mgrpo.collect, packing.pack, kernels.packed_grpo_loss, ...).
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from .attention import use_varlen_attention
from .checkpoint import checkpoint_dir, latest_checkpoint, load_trainer_state, save_checkpoint
from .config import MGRPOConfig
from .data import load_problems
from .distributed import Dist, full_weights, no_grad_sync, wrap
from .kernels import GRPOLossConfig, packed_grpo_loss, token_logprobs
from .mgrpo import collect
from .models import compute_dtype, decoder, lm_head, load_model, resolve_device, stop_token_ids
from .packing import microbatches, pack, packed_hidden_states
from .prompts import layer1_prompt, select_shots, stop_strings
from .types import Episode


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad steps, out of memory); the message says what to do."""


def lr_lambda(cfg: MGRPOConfig):
    """Linear warm-up over warmup_ratio*max_steps, then cosine/linear decay or constant."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    return f


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
    )


def hidden_rows(model, batch, dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states at the rows that predict completion tokens: (M, H)."""
    with torch.autocast(batch.input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = packed_hidden_states(model, batch)
    return hidden[batch.target_rows].to(dtype)


class PolicyLoss(torch.nn.Module):
    """The policy's loss on one packed micro-batch, as the forward that DDP / FSDP2 wrap."""

    def __init__(self, model, loss_cfg: GRPOLossConfig, dtype: torch.dtype):
        super().__init__()
        self.model, self.loss_cfg, self.dtype = model, loss_cfg, dtype

    def forward(self, batch, ref_lp, normaliser: dict):
        weight, bias = lm_head(self.model)
        return packed_grpo_loss(
            hidden_rows(self.model, batch, self.dtype), weight.to(self.dtype), batch.targets,
            batch.cu_targets, batch.advantages, batch.old_logprobs, ref_lp, config=self.loss_cfg,
            bias=None if bias is None else bias.to(self.dtype), seq_weights=batch.weights,
            return_entropy=True, **normaliser)


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
        if problems is None:  # before the model: a bad data file fails fast
            problems = load_problems(cfg.dataset, strict=cfg.strict_data, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        if model is None:
            # fp32 master weights; bf16 compute comes from autocast on GPU.
            model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=self.device)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        use_varlen_attention(self.model)  # packed micro-batches: attention within each sequence
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_strings = stop_strings(tokenizer, cfg.stop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.problems, self.prompts, self.data_stats = self._load_data(problems)
        self.out = Path(cfg.output_dir)
        checkpoint = self._checkpoint_to_resume() if cfg.resume else None
        if checkpoint is not None:
            self._load_weights(checkpoint)  # before wrapping: FSDP2 shards what the model holds
        self.loss_cfg = loss_config(cfg)
        self.policy = wrap(PolicyLoss(self.model, self.loss_cfg, self.dtype), decoder(self.model).layers,
                           self.dist, cfg.fsdp)
        # A one-token, zero-weight micro-batch: pads a rank's micro-batches to the most any rank
        # has (FSDP2 gathers weights in every forward: the counts must agree), and runs the FSDP2
        # root first (FSDP2 takes the first module to run forward as its root; rollout would
        # otherwise run the layers first).
        self._probe = (pack([Episode([self.pad_id], [self.pad_id], [0.0], 0.0, False, layer=1, group=0)]).to(
            self.device), None if self.ref_model is None else torch.zeros(1, device=self.device))
        with torch.no_grad(), full_weights(self.policy):  # which also leaves every unit sharded
            self.policy(*self._probe, {"num_sequences": 1, "num_tokens": 1})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step_idx, self.bad_steps = 0, 0
        if checkpoint is not None:
            self._load_state(checkpoint)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
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
        """One optimizer step; rank r of W takes questions r, r+W, ... of the step's batch.

        Whole groups stay on one rank, so advantages need no communication; the loss normaliser
        (sequences, tokens) is the global one, and metrics come back reduced over ranks.
        """
        cfg, d, t0 = self.cfg, self.dist, time.perf_counter()
        peak_memory_gb(self.device, reset=True)
        idx = self._batch_indices(self.step_idx)[d.rank::d.world]
        # Sampling RNGs are a function of (seed, step, rank): resume needs no RNG state.
        rng = random.Random(f"{cfg.seed}/{self.step_idx}/{d.rank}")
        generator = torch.Generator(device=self.device).manual_seed(rng.getrandbits(63))
        self.model.eval()
        with torch.no_grad(), self._autocast(), full_weights(self.policy):
            rollout = collect(self.model, self.tokenizer, [self.problems[i] for i in idx],
                              [self.prompts[i] for i in idx], cfg, rng=rng, generator=generator,
                              stop_ids=self.stop_ids, pad_id=self.pad_id, stop_strings=self.stop_strings)
        t_rollout, rollout_peak = time.perf_counter(), peak_memory_gb(self.device, reset=True)
        episodes = rollout.episodes
        n_seq, n_tok = d.sum([len(episodes), sum(len(e.completion_ids) for e in episodes)])
        normaliser = {"num_sequences": int(n_seq), "num_tokens": int(n_tok)}
        self.model.train()
        totals = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "ref_time": 0.0}
        mbs = microbatches(episodes, cfg.micro_batch_tokens)
        mbs += [None] * (int(d.max([len(mbs)])[0]) - len(mbs))  # None: the zero-weight probe
        plan = mbs * cfg.num_iterations
        for i, mb in enumerate(plan):
            with no_grad_sync(self.policy, skip=i < len(plan) - 1):  # reduce gradients once
                self._accumulate(None if mb is None else pack(mb).to(self.device), normaliser, totals)
        summed = ("loss", "kl", "clip_ratio", "entropy")  # shares of global means: add up
        totals.update(zip(summed, d.sum([totals[k] for k in summed])))
        grad_norm = self._optimizer_step(totals["loss"])
        t_end = time.perf_counter()
        metrics = {
            "step": self.step_idx + 1, **rollout.stats, **{k: v for k, v in totals.items()},
            "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
            "tokens_trained": float(sum(e.num_tokens for e in episodes)),
            "sequences": float(len(episodes)), "padding_fraction": 0.0,
            "rollout_time": t_rollout - t0, "train_time": t_end - t_rollout, "step_time": t_end - t0,
            "rollout_peak_gb": rollout_peak, "train_peak_gb": (train_peak := peak_memory_gb(self.device)),
            "peak_memory_gb": max(rollout_peak, train_peak), "skipped": not math.isfinite(grad_norm),
        }
        self.step_idx += 1
        # Already global: step, lr, grad_norm and the summed totals (averaging keeps them).
        return d.reduce_metrics(
            metrics, sums={"tokens_generated", "tokens_trained", "sequences", "l2_groups_kept",
                           "l2_groups_discarded"},
            maxes={"ref_time", "rollout_time", "train_time", "step_time", "peak_memory_gb",
                   "rollout_peak_gb", "train_peak_gb"})

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _accumulate(self, batch, normaliser: dict, totals: dict) -> None:
        """Forward + backward of one packed micro-batch (None: the zero-weight probe); gradients
        add up across micro-batches."""
        if batch is None:
            loss, _ = self.policy(*self._probe, normaliser)
            (loss * 0.0).backward()
            return
        ref_lp = None
        if self.ref_model is not None:
            t = time.perf_counter()
            with torch.no_grad():
                w, b = lm_head(self.ref_model)
                ref_lp = token_logprobs(hidden_rows(self.ref_model, batch, self.dtype), w.to(self.dtype),
                                        batch.targets, temperature=self.loss_cfg.temperature,
                                        bias=None if b is None else b.to(self.dtype))
            totals["ref_time"] += time.perf_counter() - t
        loss, m = self.policy(batch, ref_lp, normaliser)
        # DDP/FSDP2 average gradients over ranks; each rank's loss is its share of the global sum.
        (loss * self.dist.world / self.cfg.num_iterations).backward()
        # Losses and metrics are already divided by the global counts: micro-batch values add up.
        totals["loss"] += loss.item() / self.cfg.num_iterations  # sync point, once per micro-batch
        for k in ("kl", "clip_ratio", "entropy"):
            if k in m:
                totals[k] += float(m[k]) / self.cfg.num_iterations

    def _optimizer_step(self, loss: float) -> float:
        """Clip and apply; a NaN/Inf loss or gradient skips the update (counted, then fatal)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else 0.0
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)  # FSDP2
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
        return grad_norm

    def evaluate(self) -> dict:
        """Self-correction eval (acc@t1, acc@t2, transitions) on the held-out file, greedy."""
        from .eval import evaluate

        cfg = self.cfg
        problems = load_problems(cfg.eval_dataset, limit=cfg.eval_limit, seed=cfg.seed)
        self.model.eval()
        with torch.no_grad(), self._autocast(), full_weights(self.policy):
            summary, _ = evaluate(self.model, self.tokenizer, problems,
                                  max_new_tokens=cfg.max_completion_length, temperature=0.0, top_p=1.0,
                                  batch_size=cfg.rollout_batch_size, l2_format=cfg.l2_format,
                                  phrase=cfg.guiding_phrases[1 % len(cfg.guiding_phrases)], pass_k=0,
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
        tensors = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=full),
                   "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        state = {"step": self.step_idx, "bad_steps": self.bad_steps, "config": self.cfg.to_dict()}
        if self.dist.is_main:
            save_checkpoint(self.out, self.step_idx, self.model, self.tokenizer, tensors, state,
                            keep=self.cfg.keep_checkpoints, weights=weights)
        self.dist.barrier()  # nobody reads or resumes before rank 0 is done
        return checkpoint_dir(self.out, self.step_idx)

    def _checkpoint_to_resume(self) -> Path:
        path = latest_checkpoint(self.out)
        if path is None:
            raise TrainingError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        return path

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise TrainingError(f"{path}: checkpoint does not match the model "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def _load_state(self, path: Path) -> None:
        """Optimizer (sharded again under FSDP2), scheduler, RNG and step of a checkpoint."""
        tensors, state = load_trainer_state(path)
        set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        self.step_idx, self.bad_steps = state["step"], state["bad_steps"]
