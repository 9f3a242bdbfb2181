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
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import ConfigError, MGRPOConfig, parse_config
from .data import DatasetError
from .env import cpu_threads
from .files import WriteError, atomic_write, why_write_failed
from .models import ModelError
from .outdir import OutputDirError, unlock_output_dir
from .plots import write_reward_plot
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
    """The step lines of a metrics.jsonl or evals.jsonl ([] when it does not exist). A last line cut short (no
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
    """`name` in `out` (metrics.jsonl: one line per step; evals.jsonl: one per held-out eval,
    step 0 = before training), fsynced, a failed write undone, plus optional TensorBoard.
    `kept`: the lines of an earlier run to keep (a resumed run's, up to its checkpoint); the
    file is replaced atomically by them first."""

    def __init__(self, out: Path, kept: list[dict], tensorboard: bool, name: str = "metrics.jsonl"):
        self.path = out / name
        atomic_write(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), filename_suffix=f".{name}")

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


def summarize(history: list[dict], evals: list[dict], out: Path, checkpoint: Path | None, wall: float,
              data_stats: dict) -> dict:
    """Run summary (also written to summary.json): means over this session's steps, and the
    held-out metrics of the first eval (before training) and the last (after), keyed by step."""
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
    atomic_write(out / "summary.json", json.dumps(json_safe(summary), indent=1))
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
        write_reward_plot(read_metrics(out / "metrics.jsonl") + read_metrics(out / "evals.jsonl"),
                          out / "reward.png", title=title)
    except Exception as e:  # noqa: BLE001 - the plot must never cost the run its exit status
        _tell(f"warning: reward.png not written: {e}")


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
    earlier = {name: read_metrics(Path(cfg.output_dir) / name) if cfg.resume else []
               for name in ("metrics.jsonl", "evals.jsonl")}
    trainer = trainer or Trainer(cfg)
    main_rank = trainer.dist.is_main
    log = eval_log = None
    if main_rank:  # steps after the checkpoint resumed from are replaced by this run's
        log, eval_log = (MetricsLog(trainer.out, [m for m in kept if m["step"] <= trainer.step_idx], cfg.tensorboard,
                                    name) for name, kept in earlier.items())
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

    def record(metrics: dict) -> None:
        if log is not None:
            log.write(metrics)
        history.append(metrics)

    def evaluate() -> None:  # every rank evaluates (the eval is collective); rank 0 logs it
        held_out.update({"step": trainer.step_idx, **trainer.evaluate()})
        if eval_log is not None:
            eval_log.write(held_out)

    try:
        if trainer.eval_problems and trainer.step_idx == 0:
            evaluate()
        while trainer.step_idx < cfg.max_steps:
            metrics = trainer.step()
            record(metrics)
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
            eval_log.close()
            draw(trainer.out, cfg)
    if not main_rank:
        return {}
    evals = read_metrics(trainer.out / "evals.jsonl")
    summary = summarize(history, evals, trainer.out, checkpoint, time.perf_counter() - t0, trainer.data_stats)
    print("\n".join(f"{k:>26}: {_fmt(v)}" for k, v in summary.items()))
    print(before_after(evals) or "no held-out eval (--eval-dataset none)")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; the exit status: 2 unusable input, 3 CUDA OOM, 4 an output could not be
    written (disk full), 128+signal interrupted."""
    # A signal the caller ignores stays ignored: `nohup` means a closed terminal must not stop the run.
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS
                if s != signal.SIGINT and signal.getsignal(s) is not signal.SIG_IGN}
    try:
        cfg = parse_config(argv)
        torch.set_num_threads(cpu_threads())
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
