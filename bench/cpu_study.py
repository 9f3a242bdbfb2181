"""The CPU quality study of the README: GRPO (--layers 1) against MGRPO (--layers 2) on the default
job, several seeds each, held-out accuracy before and after training.

    python bench/cpu_study.py run      # the runs, one after another (skips finished ones)
    python bench/cpu_study.py report   # the README table and bench/cpu_study.png from the run folders

Each run is `python -m fastmgrpo.train` with the default options plus `--layers`, `--seed` and,
for GRPO, `--group-size` GRPO_GROUP: G*(1+H) layer-1 samples per question, so both arms sample
about as many sequences (and tokens) per question; the report counts both.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from fastmgrpo.config import MGRPOConfig

DEFAULTS = MGRPOConfig()
GRPO_GROUP = DEFAULTS.group_size * (1 + DEFAULTS.l2_samples)
# MGRPO first: its seed-0 run is the default job (python -m fastmgrpo.train, no arguments)
ARMS = {"MGRPO": ["--layers", "2"], "GRPO": ["--layers", "1", "--group-size", str(GRPO_GROUP)]}
METRICS = (("acc_t1", "acc@t1"), ("acc_t2", "acc@t2"), ("delta_i_to_c", "Δi→c"), ("delta_c_to_i", "Δc→i"))


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return root / f"{arm.lower()}-seed{seed}"


def run_all(root: Path, seeds: list[int], extra: list[str]) -> None:
    """Train every (seed, arm) whose folder has no summary.json yet; seeds outer, so a cut-short
    study still has both arms of its first seeds."""
    for seed in seeds:
        for arm, flags in ARMS.items():
            out = run_dir(root, arm, seed)
            if (out / "summary.json").exists():
                continue
            root.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "fastmgrpo.train", *flags, "--seed", str(seed), "--output-dir", str(out),
                   "--overwrite", *extra]
            t0 = time.time()
            # the log lies beside the run folder: --overwrite refuses folders holding foreign files
            with open(out.with_suffix(".log"), "w") as log:
                status = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"{arm} seed {seed}: exit {status} in {time.time() - t0:.0f} s ({out})", flush=True)


def read(out: Path) -> dict | None:
    """A finished run: its evals (first = before, last = after) and its token and time counts."""
    if not (out / "summary.json").exists():
        return None
    rows = lambda name: [json.loads(ln) for ln in (out / name).read_text().splitlines() if ln.strip()]
    metrics, evals = rows("metrics.jsonl"), rows("evals.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    return {"before": evals[0], "after": evals[-1], "wall_s": summary["wall_time_s"], "cpu_s": summary["cpu_time_s"],
            "sampled": sum(m["tokens_generated"] for m in metrics), "trained": sum(m["tokens_trained"] for m in metrics),
            "steps": [m["step"] for m in metrics], "reward": [m["reward_l1"] for m in metrics],
            "reward_l2": [m.get("reward_l2") for m in metrics]}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def table(runs: dict[str, list[dict]]) -> str:
    """The README table: per arm, mean ± SE over seeds of each held-out metric before and after,
    plus sampled tokens, CPU and wall time (wall depends on what else the cores ran) and how many
    seeds improved acc@t1."""
    head = ["arm", "seeds"] + [f"{label} {when}" for _, label in METRICS for when in ("before", "after")]
    head += ["seeds acc@t1 up", "sampled tokens", "CPU s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, rs in runs.items():
        if not rs:
            continue
        cells = [arm, str(len(rs))]
        for key, _ in METRICS:
            for when in ("before", "after"):
                m, se = mean_se([r[when][f"eval_{key}"] for r in rs])
                cells.append(f"{m:.3f} ± {se:.3f}")
        up = sum(r["after"]["eval_acc_t1"] > r["before"]["eval_acc_t1"] for r in rs)
        cells += [f"{up}/{len(rs)}"] + ["{:.0f} ± {:.0f}".format(*mean_se([r[k] for r in rs]))
                                        for k in ("sampled", "cpu_s", "wall_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], png: Path) -> None:
    """Left: layer-1 training reward per step, every run; right: held-out acc@t1/acc@t2 before and
    after, per run (thin) and mean ± SE (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmgrpo.plots import moving_average

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colors = {"GRPO": "tab:blue", "MGRPO": "tab:orange"}
    for arm, rs in runs.items():
        for i, r in enumerate(rs):
            left.plot(r["steps"], moving_average(r["reward"], 5), color=colors[arm], alpha=0.7,
                      label=f"{arm} layer-1 reward (5-step avg)" if i == 0 else None)
        for k, (key, style) in enumerate((("acc_t1", "-"), ("acc_t2", "--"))):
            x = [0 + 0.05 * k, 1 + 0.05 * k]
            for r in rs:
                right.plot(x, [r["before"][f"eval_{key}"], r["after"][f"eval_{key}"]], style, color=colors[arm],
                           alpha=0.25)
            if rs:
                stats = [mean_se([r[w][f"eval_{key}"] for r in rs]) for w in ("before", "after")]
                right.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o" + style,
                               color=colors[arm], lw=2, capsize=3, label=f"{arm} held-out {key.replace('_', '@')}")
    left.set(xlabel="step", ylabel="training reward, layer 1", ylim=(-0.05, 1.05))
    right.set(xticks=[0, 1], xticklabels=["before", "after"], ylabel="held-out accuracy (greedy)",
              ylim=(-0.05, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"CPU study: default job ({DEFAULTS.dataset}), GRPO G={GRPO_GROUP} vs MGRPO "
                 f"G={DEFAULTS.group_size} H={DEFAULTS.l2_samples}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--root", type=Path, default=Path("runs/cpu_study"), help="run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("cpu_study.png"))
    args, extra = parser.parse_known_args(argv)  # anything else: more train flags (run)
    if args.command == "run":
        run_all(args.root, args.seeds, extra)
        return
    runs = {arm: [r for s in args.seeds if (r := read(run_dir(args.root, arm, s)))] for arm in ARMS}
    print(table(runs))
    plot(runs, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
