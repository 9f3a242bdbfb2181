"""`python -m fastmgrpo.train`: MGRPO (or GRPO with --layers 1) from the command line.

With no arguments: a short real MGRPO run on the embedded Gemma 3 270M model and generated
arithmetic word problems (README: "The default job"), on GPU when present, else CPU, with a
held-out eval before and after and the reward curve in reward.png. `--help` lists every option.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import ConfigError, MGRPOConfig, parse_config
from .data import DatasetError
from .env import cpu_threads
from .models import ModelError
from .plots import write_reward_plot
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


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl / evals.jsonl file ([] if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


class MetricsLog:
    """metrics.jsonl (one line per training step) and evals.jsonl (one line per held-out eval,
    step 0 = before training), flushed and fsynced, plus optional TensorBoard."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool):
        self.paths = {"metrics": out / "metrics.jsonl", "evals": out / "evals.jsonl"}
        self.files = {}
        for name, path in self.paths.items():
            # drop steps after the checkpoint we resume from (or all, on a fresh run)
            kept = [row for row in read_jsonl(path) if row.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
            self.files[name] = path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, metrics: dict, to: str = "metrics") -> None:
        """Append one row (a dict with 'step') to metrics.jsonl (`to`='metrics') or evals.jsonl."""
        file = self.files[to]
        file.write(json.dumps(json_safe(metrics)) + "\n")
        file.flush()
        os.fsync(file.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        if self.tb is not None:
            self.tb.close()


def _mean(history: list[dict], key: str) -> float | None:
    vals = [m[key] for m in history if key in m]
    return sum(vals) / len(vals) if vals else None


def summarize(history: list[dict], evals: list[dict], out: Path, checkpoint: Path | None, wall: float,
              data_stats: dict) -> dict:
    """Run summary (also written to summary.json): means over this session's steps, and the
    held-out accuracy of the first eval (before training) and the last (after)."""
    summary = {
        **data_stats,
        "steps": len(history),
        "reward_l1": _mean(history, "reward_l1"),
        "reward_l2": _mean(history, "reward_l2"),
        "acc_l1": _mean(history, "acc_l1"),
        "acc_after_correction": _mean(history, "acc_after_correction"),
    }
    if evals:
        first, last = evals[0], evals[-1]
        summary["heldout_problems"] = first.get("eval_problems")
        for key in ("acc_t1", "acc_t2", "delta_i_to_c", "delta_c_to_i"):
            summary[f"heldout_{key}_step{first['step']}"] = first.get(f"eval_{key}")
            summary[f"heldout_{key}_step{last['step']}"] = last.get(f"eval_{key}")
    summary.update({
        "tokens_per_s": sum(m["tokens_generated"] + m["tokens_trained"] for m in history) / max(wall, 1e-9),
        "wall_time_s": wall,
        # CPU seconds of this process (all threads): on shared cores, wall time over-states
        # what the run costs; cpu_time_s / threads is about its wall time on idle cores.
        "cpu_time_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "threads": torch.get_num_threads(),
        "output_dir": str(out),
        "checkpoint": str(checkpoint) if checkpoint else None,
    })
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1), encoding="utf-8")
    return summary


def before_after(evals: list[dict]) -> str:
    """One line: held-out acc@t1 and acc@t2 at the first eval and at the last."""
    if len(evals) < 2:
        return ""
    a, b = evals[0], evals[-1]
    return (f"held-out ({a.get('eval_problems')} problems, greedy): acc@t1 {_fmt(a.get('eval_acc_t1'))} -> "
            f"{_fmt(b.get('eval_acc_t1'))}, acc@t2 {_fmt(a.get('eval_acc_t2'))} -> {_fmt(b.get('eval_acc_t2'))} "
            f"(step {a['step']} -> step {b['step']})")


def draw(out: Path, cfg: MGRPOConfig) -> None:
    """reward.png from the run's metrics.jsonl and evals.jsonl; a failure only warns."""
    title = (f"{'MGRPO' if cfg.layers == 2 else 'GRPO'} on {cfg.dataset}, model {cfg.model}, seed {cfg.seed}, "
             f"G={cfg.group_size}, lr {cfg.learning_rate:g}")
    try:
        write_reward_plot(read_jsonl(out / "metrics.jsonl") + read_jsonl(out / "evals.jsonl"),
                          out / "reward.png", title=title)
    except Exception as e:  # noqa: BLE001 - the plot must never cost the run its exit status
        print(f"warning: reward.png not written: {e}", file=sys.stderr)


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
    held_out = {}

    def evaluate() -> None:  # every rank evaluates (the eval is collective); rank 0 logs it
        held_out.update({"step": trainer.step_idx, **trainer.evaluate()})
        if log is not None:
            log.write(held_out, to="evals")

    try:
        if trainer.eval_problems and trainer.step_idx == 0:
            evaluate()
        while trainer.step_idx < cfg.max_steps:
            metrics = trainer.step()
            if log is not None:
                log.write(metrics)
            history.append(metrics)
            if trainer.eval_problems and (trainer.step_idx == cfg.max_steps or
                                          cfg.eval_every and trainer.step_idx % cfg.eval_every == 0):
                evaluate()
            bar.update(1)
            bar.set_postfix(r1=f"{metrics['reward_l1']:.2f}", acc1=f"{metrics['acc_l1']:.2f}",
                            acc2=_fmt(metrics.get("acc_after_correction")), loss=f"{metrics['loss']:.4f}",
                            heldout=_fmt(held_out.get("eval_acc_t1")))
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
            draw(trainer.out, cfg)
    if not main_rank:
        return {}
    evals = read_jsonl(trainer.out / "evals.jsonl")
    summary = summarize(history, evals, trainer.out, checkpoint, time.perf_counter() - t0, trainer.data_stats)
    print("\n".join(f"{k:>26}: {_fmt(v)}" for k, v in summary.items()))
    print(before_after(evals) or "no held-out eval (--eval-dataset none)")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; the exit status: 2 unusable input, 3 CUDA OOM, 128+signal interrupted."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        cfg = parse_config(argv)
        torch.set_num_threads(cpu_threads())
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
