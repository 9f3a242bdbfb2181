"""The reward curve of a run: `reward.png` beside metrics.jsonl, redrawn from the step history.

Top panel: per step, layer-1 reward and accuracy and (MGRPO) reward and accuracy after
correction, each with a moving average. Bottom panel: acc@t1 and acc@t2 of the held-out evals
(step 0 is the model before training). Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
from pathlib import Path

from .files import atomic_write

# (metrics key, label, colour) of the training-batch series and of the held-out evals
TRAIN_SERIES = (("reward_l1", "reward, layer 1", "tab:blue"), ("acc_l1", "acc, layer 1", "tab:cyan"),
                ("reward_l2", "reward, layer 2", "tab:orange"), ("acc_after_correction", "acc after correction",
                                                                 "tab:red"))
EVAL_SERIES = (("eval_acc_t1", "held-out acc@t1", "tab:green"), ("eval_acc_t2", "held-out acc@t2", "tab:purple"))


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def series(history: list[dict], keys) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of the steps in `history` (dicts with 'step') that have a finite
    value for key; keys without any such step are left out."""
    out = {}
    for key, *_ in keys:
        points = [(m["step"], float(m[key])) for m in history if isinstance(m.get(key), (int, float))]
        if points:
            out[key] = ([s for s, _ in points], [v for _, v in points])
    return out


def write_reward_plot(history: list[dict], png: Path, title: str = "", window: int = 5) -> dict:
    """Draw `history` (metrics.jsonl rows; eval rows may be step 0) to `png`; return the plotted
    {key: (steps, values)} of TRAIN_SERIES and EVAL_SERIES (raw values; the moving average over
    `window` steps is drawn on top of the training series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = series(history, TRAIN_SERIES), series(history, EVAL_SERIES)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for key, label, color in TRAIN_SERIES:
        if key in train:
            steps, values = train[key]
            top.plot(steps, values, ".", color=color, alpha=0.35)
            top.plot(steps, moving_average(values, window), "-", color=color, label=f"{label} ({window}-step avg)")
    for key, label, color in EVAL_SERIES:
        if key in evals:
            bottom.plot(*evals[key], "o-", color=color, label=label)
    for ax, ylabel in ((top, "training batch"), (bottom, "held-out (greedy)")):
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=7)
    bottom.set_xlabel("step")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic_write(png, image.getvalue())  # a kill mid-write leaves the previous curve, not half a PNG
    return {**train, **evals}
