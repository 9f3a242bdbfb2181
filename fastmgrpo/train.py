"""`python -m fastmgrpo.train`: MGRPO (or GRPO with --layers 1) from the command line.

With no arguments: a short real MGRPO run on the embedded Gemma 3 270M model and GSM8K data,
on GPU when present, else CPU. `--help` lists every option.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import ConfigError, MGRPOConfig, parse_config
from .data import DatasetError
from .models import ModelError
from .trainer import Trainer, TrainingError, deferred_signals


class Interrupted(KeyboardInterrupt):
    """SIGTERM (scheduler, `docker stop`, `timeout`) handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def json_safe(metrics: dict) -> dict:
    """Non-finite floats as null: JSON has no Infinity/NaN, and strict readers reject them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class MetricsLog:
    """metrics.jsonl (one line per step, flushed and fsynced) plus optional TensorBoard."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # drop steps after the checkpoint we resume from (or all, on a fresh run)
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(json_safe(metrics)) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _mean(history: list[dict], key: str) -> float | None:
    vals = [m[key] for m in history if key in m]
    return sum(vals) / len(vals) if vals else None


def summarize(history: list[dict], out: Path, checkpoint: Path | None, wall: float,
              data_stats: dict) -> dict:
    """Run summary (also written to summary.json)."""
    summary = {
        **data_stats,
        "steps": len(history),
        "reward_l1": _mean(history, "reward_l1"),
        "reward_l2": _mean(history, "reward_l2"),
        "acc_l1": _mean(history, "acc_l1"),
        "acc_after_correction": _mean(history, "acc_after_correction"),
        "tokens_per_s": sum(m["tokens_generated"] + m["tokens_trained"] for m in history) / max(wall, 1e-9),
        "wall_time_s": wall,
        "output_dir": str(out),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1), encoding="utf-8")
    return summary


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run(cfg: MGRPOConfig, trainer: Trainer | None = None) -> dict:
    """Train for cfg.max_steps (from the resumed step), checkpoint, evaluate, summarise.

    Under torchrun every rank runs this loop (steps, evals and saves are collective); only rank
    0 prints and writes metrics and the summary (it returns {} elsewhere).
    """
    trainer = trainer or Trainer(cfg)
    main_rank = trainer.dist.is_main
    log = MetricsLog(trainer.out, trainer.step_idx, cfg.tensorboard) if main_rank else None
    stats = trainer.data_stats
    if main_rank:
        print(f"{stats['problems']} problems from {cfg.dataset!r} ({stats['prompts_skipped']} skipped, "
              f"{stats['prompts_truncated']} truncated: longer than max_prompt_length="
              f"{cfg.max_prompt_length}); device {trainer.device}, {trainer.dtype}, "
              f"{trainer.dist.world} rank(s)", file=sys.stderr)
    history, checkpoint, t0 = [], None, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=trainer.step_idx, desc="MGRPO" if cfg.layers == 2 else "GRPO",
               unit="step", dynamic_ncols=True, disable=not main_rank)
    try:
        while trainer.step_idx < cfg.max_steps:
            metrics = trainer.step()
            if cfg.eval_every and trainer.step_idx % cfg.eval_every == 0 and cfg.eval_dataset:
                metrics.update(trainer.evaluate())  # the same greedy eval on every rank
            if log is not None:
                log.write(metrics)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", r1=f"{metrics['reward_l1']:.2f}",
                            r2=_fmt(metrics.get("reward_l2")))
            if cfg.save_every and trainer.step_idx % cfg.save_every == 0:
                checkpoint = trainer.save()
        if checkpoint is None or not checkpoint.name.endswith(f"{trainer.step_idx:06d}"):
            checkpoint = trainer.save()
    except KeyboardInterrupt:
        if trainer.dist.world == 1:  # ranks interrupted mid-collective cannot save together
            with deferred_signals():  # a second Ctrl-C / SIGTERM must not cut this save short
                checkpoint = trainer.save()  # steps are applied whole: weights match the step
            print(f"\ninterrupted; checkpoint saved to {checkpoint}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    if not main_rank:
        return {}
    summary = summarize(history, trainer.out, checkpoint, time.perf_counter() - t0, trainer.data_stats)
    print("\n".join(f"{k:>22}: {_fmt(v)}" for k, v in summary.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; the exit status: 2 unusable input, 3 CUDA OOM, 128+signal interrupted."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DatasetError, FileNotFoundError, TrainingError, CheckpointError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: CUDA out of memory. Lower --micro-batch-tokens (or --rollout-batch-size / "
              "--max-completion-length); checkpoints and metrics written so far are intact.",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
