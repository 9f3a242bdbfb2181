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
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import ConfigError, MGRPOConfig, parse_config
from .data import DatasetError
from .files import WriteError, atomic_write, why_write_failed
from .models import ModelError
from .outdir import OutputDirError, unlock_output_dir
from .trainer import STOP_SIGNALS, Trainer, TrainingError, deferred_signals


class Interrupted(KeyboardInterrupt):
    """SIGTERM (scheduler, `docker stop`, `timeout`), SIGHUP (a closed terminal) or SIGQUIT
    handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def json_safe(metrics: dict) -> dict:
    """Non-finite floats as null: JSON has no Infinity/NaN, and strict readers reject them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def read_metrics(path: Path) -> list[dict]:
    """The step lines of a metrics.jsonl ([] when it does not exist). A last line cut short (no
    newline: a write that was interrupted) is dropped with a warning; any other line that is not
    a JSON object with a step raises CheckpointError naming file and line."""
    if not path.exists():
        return []
    raw = path.read_bytes().split(b"\n")
    if raw[-1].strip():
        warnings.warn(f"{path}:{len(raw)}: dropped an incomplete last line (a write cut short)", stacklevel=2)
    lines = []
    for lineno, line in enumerate(raw[:-1], start=1):
        try:
            step = json.loads(line.decode("utf-8")) if line.strip() else None
            if step is not None and not isinstance(step.get("step"), int):
                raise ValueError("no step number")
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}:{lineno}: not a metrics line ({type(e).__name__}: {e}); "
                                  "delete that line (or the file) to resume") from None
        if step is not None:
            lines.append(step)
    return lines


class MetricsLog:
    """metrics.jsonl (one line per step, fsynced; a failed write is undone) plus optional
    TensorBoard. `kept`: the lines of an earlier run to keep (a resumed run's, up to its
    checkpoint); the file is replaced atomically by them first."""

    def __init__(self, out: Path, kept: list[dict], tensorboard: bool):
        self.path = out / "metrics.jsonl"
        atomic_write(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, metrics: dict) -> None:
        """Append one step's line, whole or not at all (raises WriteError)."""
        line, size = (json.dumps(json_safe(metrics)) + "\n").encode("utf-8"), os.fstat(self.fd).st_size
        try:
            view = memoryview(line)
            while view:  # os.write may write part of it
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            os.ftruncate(self.fd, size)  # no torn line: the file ends with the previous step
            raise WriteError(f"cannot write {self.path}: {why_write_failed(e, self.path.parent)}; it "
                             f"holds the steps before step {metrics['step']}") from e
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        os.close(self.fd)
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
    atomic_write(out / "summary.json", json.dumps(json_safe(summary), indent=1))
    return summary


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _tell(message: str) -> None:
    """Print to stderr; a closed terminal (SIGHUP) must not turn a saved run into a traceback."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def run(cfg: MGRPOConfig, trainer: Trainer | None = None) -> dict:
    """Train for cfg.max_steps (from the resumed step), checkpoint, evaluate, summarise.

    Under torchrun every rank runs this loop (steps, evals and saves are collective); only rank
    0 prints and writes metrics and the summary (it returns {} elsewhere). The output folder's
    lock (taken by the Trainer) is given back when it returns.
    """
    try:
        return _run(cfg, trainer)
    finally:
        unlock_output_dir(Path(cfg.output_dir))


def _run(cfg: MGRPOConfig, trainer: Trainer | None) -> dict:
    # Read before the model loads: a damaged metrics file fails in a second, not after loading.
    earlier = read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if cfg.resume else []
    trainer = trainer or Trainer(cfg)
    main_rank = trainer.dist.is_main
    log = None
    if main_rank:  # steps after the checkpoint resumed from are replaced by this run's
        log = MetricsLog(trainer.out, [m for m in earlier if m["step"] <= trainer.step_idx], cfg.tensorboard)
    stats = trainer.data_stats
    if main_rank:
        print(f"{stats['problems']} problems from {cfg.dataset!r} ({stats['prompts_skipped']} skipped, "
              f"{stats['prompts_truncated']} truncated: longer than max_prompt_length="
              f"{cfg.max_prompt_length}); device {trainer.device}, {trainer.dtype}, "
              f"{trainer.dist.world} rank(s)", file=sys.stderr)
    history, checkpoint, t0 = [], None, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=trainer.step_idx, desc="MGRPO" if cfg.layers == 2 else "GRPO",
               unit="step", dynamic_ncols=True, disable=not main_rank)

    def record(metrics: dict) -> None:
        if log is not None:
            log.write(metrics)
        history.append(metrics)

    try:
        while trainer.step_idx < cfg.max_steps:
            metrics = trainer.step()
            if cfg.eval_every and trainer.step_idx % cfg.eval_every == 0:
                metrics.update(trainer.evaluate())  # the same greedy eval on every rank
            record(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", r1=f"{metrics['reward_l1']:.2f}",
                            r2=_fmt(metrics.get("reward_l2")))
            if cfg.save_every and trainer.step_idx % cfg.save_every == 0:
                checkpoint = trainer.save()
        if checkpoint is None or not checkpoint.name.endswith(f"{trainer.step_idx:06d}"):
            checkpoint = trainer.save()
    except KeyboardInterrupt:
        # A second signal must not cut this short, nor change how the run ends: dropped.
        with deferred_signals(deliver=False):
            pending = trainer.last_metrics  # a step interrupted after its update (in eval, say)
            if pending is not None and pending["step"] > (history[-1]["step"] if history else 0):
                record(pending)  # before the checkpoint that claims its step
            if trainer.dist.world == 1:  # ranks interrupted mid-collective cannot save together
                checkpoint = trainer.save()  # steps are applied whole: weights match the step
                _tell(f"\ninterrupted; checkpoint saved to {checkpoint}; continue with --resume")
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
    """CLI entry point; the exit status: 2 unusable input, 3 CUDA OOM, 4 an output could not be
    written (disk full), 128+signal interrupted."""
    # A signal the caller ignores stays ignored: `nohup` means a closed terminal must not stop the run.
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS
                if s != signal.SIGINT and signal.getsignal(s) is not signal.SIG_IGN}
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DatasetError, FileNotFoundError, TrainingError, CheckpointError, ModelError,
            OutputDirError) as e:
        _tell(f"error: {e}")
        return 2
    except WriteError as e:
        _tell(f"error: {e}")
        return 4
    except torch.cuda.OutOfMemoryError:
        print("error: CUDA out of memory. Lower --micro-batch-tokens (or --rollout-batch-size / "
              "--max-completion-length); checkpoints and metrics written so far are intact.",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
