"""Reward per step, MGRPO vs GRPO: one short run each (same seed, model and data), one PNG.

    python bench/plot_rewards.py                       # toy task, tiny model (~1 min on CPU)

toy: every question is "Say 7." (answer 7) for a tiny random model (the learnable task of
tests/test_trainer.py). The real model's study (several seeds, held-out accuracy) is
bench/cpu_study.py; every training run also draws its own reward.png.
Each run goes through `fastmgrpo.train.run`, which writes `<runs>/layers{1,2}/metrics.jsonl`;
the plot is drawn from those files (`--plot-only` redraws it without training).
Needs matplotlib.
"""
import argparse
import json
from pathlib import Path

from fastmgrpo.config import MGRPOConfig
from fastmgrpo.testing import build_tiny_model
from fastmgrpo.train import run
from fastmgrpo.trainer import Trainer
from fastmgrpo.types import Problem

TASKS = {
    # tiny model, 3 new tokens, high learning rate: reward moves within tens of steps
    "toy": dict(model="tiny", dataset="toy", group_size=8, l2_samples=2, questions_per_step=2,
                max_completion_length=3, learning_rate=2e-2, beta=0.0, steps=30, prompt_shots=0,
                eval_dataset="none"),
}


def train_once(task: str, layers: int, out: Path, steps: int, seed: int) -> Path:
    """Run one training of `task` with `layers` (1 = GRPO, 2 = MGRPO); return its metrics.jsonl."""
    opts = dict(TASKS[task])
    opts.pop("steps")
    cfg = MGRPOConfig(**opts, layers=layers, max_steps=steps, seed=seed, output_dir=str(out), overwrite=True,
                      warmup_ratio=0.0, lr_schedule="constant")
    model, tok = build_tiny_model(seed=seed)
    problems = [Problem("Say 7.", "7", "synthetic", uid=i) for i in range(8)]
    run(cfg, Trainer(cfg, model=model, tokenizer=tok, problems=problems))
    return out / "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(runs: dict[int, list[dict]], title: str, png: Path) -> None:
    """Layer-1 reward per step for both runs, plus MGRPO's reward after correction (layer 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    styles = {1: ("GRPO (--layers 1)", "tab:blue"), 2: ("MGRPO (--layers 2)", "tab:orange")}
    for layers, history in sorted(runs.items()):
        label, color = styles[layers]
        steps = [m["step"] for m in history]
        ax.plot(steps, [m["reward_l1"] for m in history], "o-", color=color, label=f"{label}: layer-1 reward")
        if layers == 2:
            ax.plot(steps, [m["reward_l2"] for m in history], "s--", color=color, alpha=0.6,
                    label=f"{label}: reward after correction")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="toy")
    parser.add_argument("--steps", type=int, help="steps per run (default: per task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/plot_rewards"), help="run output folders")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mgrpo_vs_grpo.png"))
    parser.add_argument("--plot-only", action="store_true", help="redraw from existing metrics.jsonl")
    args = parser.parse_args(argv)
    steps = args.steps or TASKS[args.task]["steps"]
    runs = {}
    for layers in (1, 2):
        out = args.runs / args.task / f"layers{layers}"
        path = out / "metrics.jsonl" if args.plot_only else train_once(args.task, layers, out, steps, args.seed)
        runs[layers] = read_metrics(path)
    t = TASKS[args.task]
    what = 'tiny random model (hidden 64), toy task "Say 7."'
    title = (f"MGRPO vs GRPO, {what}\nseed {args.seed}, {t['questions_per_step']} questions x "
             f"G={t['group_size']} (H={t['l2_samples']}), {t['max_completion_length']} new tokens, "
             f"lr {t['learning_rate']}, one run each")
    plot(runs, title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
