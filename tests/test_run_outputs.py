"""What a run shows its user: reward.png (per-step series and held-out evals) and the
before/after held-out accuracy in the summary (issue 18)."""

import copy
import os
import json
import random

import pytest

from fastmgrpo import eval as eval_mod
from fastmgrpo import mgrpo, train
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.data import load_problems, synthetic_problems
from fastmgrpo.plots import moving_average
from fastmgrpo.testing import build_tiny_model, hash_reward
from fastmgrpo.trainer import Trainer


def rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("layers", [1, 2])
def test_run_writes_reward_plot_and_before_after(tmp_path, monkeypatch, layers):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    monkeypatch.setattr(eval_mod, "score", hash_reward)  # held-out verdicts that a tiny model can vary
    plotted = []
    real_plot = train.write_reward_plot
    monkeypatch.setattr(train, "write_reward_plot", lambda *a, **k: plotted.append(real_plot(*a, **k)))
    steps, seed = random.randint(2, 4), random.randint(0, 1000)
    cfg = MGRPOConfig(model="tiny", dataset="synthetic:ops=1-2", output_dir=str(tmp_path), device="cpu",
                      layers=layers, max_completion_length=5, group_size=4, l2_samples=2, questions_per_step=2,
                      learning_rate=3e-2, warmup_ratio=0.0, beta=0.0, seed=seed, max_steps=steps, eval_limit=6,
                      prompt_shots=0)
    model, tok = build_tiny_model(seed=seed)
    initial = copy.deepcopy(model)
    trainer = Trainer(cfg, model=model, tokenizer=tok, problems=synthetic_problems(32, seed, 1, 2))
    assert trainer.eval_problems == load_problems("synthetic:ops=1-2,heldout", limit=6)
    held = {p.question for p in trainer.eval_problems}
    assert held.isdisjoint(p.question for p in trainer.problems + trainer.shots)
    summary = train.run(cfg, trainer)

    metrics, evals = rows(tmp_path / "metrics.jsonl"), rows(tmp_path / "evals.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [e["step"] for e in evals] == [0, steps]
    # the PNG is an image, and what was drawn is exactly the logged steps and evals
    image = matplotlib_image.imread(tmp_path / "reward.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0
    (series,) = plotted
    assert series["reward_l1"] == (list(range(1, steps + 1)), [m["reward_l1"] for m in metrics])
    assert series["acc_l1"][1] == [m["acc_l1"] for m in metrics]
    assert ("reward_l2" in series) == (layers == 2)
    assert series["eval_acc_t1"] == ([0, steps], [e["eval_acc_t1"] for e in evals])
    assert series["eval_acc_t2"][1] == [e["eval_acc_t2"] for e in evals]

    # before/after: the step-0 and last evals are the greedy eval of the initial and final model
    for step, net in ((0, initial), (steps, trainer.model)):
        want, _ = eval_mod.evaluate(net, tok, trainer.eval_problems, max_new_tokens=5, progress=False,
                                    stop=trainer.stop_strings, shots=trainer.shots, seed=seed)
        assert summary[f"heldout_acc_t1_step{step}"] == pytest.approx(want["acc_t1"])
        assert summary[f"heldout_acc_t2_step{step}"] == pytest.approx(want["acc_t2"])
    assert summary["heldout_problems"] == 6


def test_moving_average():
    values = [random.random() for _ in range(20)]
    window = random.randint(1, 6)
    want = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(20)]
    assert moving_average(values, window) == pytest.approx(want)


def test_eval_none_and_resume_keep_evals(tmp_path, monkeypatch):
    """--eval-dataset none evaluates nothing; a resumed run keeps the step-0 eval and adds the last."""
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    seed = random.randint(0, 1000)
    opts = dict(model="tiny", dataset="synthetic:ops=1", device="cpu", max_completion_length=4, group_size=2,
                l2_samples=1, questions_per_step=1, beta=0.0, seed=seed, eval_limit=3, learning_rate=1e-3,
                lr_schedule="constant", warmup_ratio=0.0)

    def go(out, **kw):
        cfg = MGRPOConfig(**{**opts, "output_dir": str(out), **kw})
        model, tok = build_tiny_model(seed=seed)
        return train.run(cfg, Trainer(cfg, model=model, tokenizer=tok, problems=synthetic_problems(8, seed, 1, 1)))

    summary = go(tmp_path / "none", eval_dataset="none", max_steps=1)
    assert not any(k.startswith("heldout") for k in summary)
    assert rows(tmp_path / "none" / "evals.jsonl") == []
    go(tmp_path / "r", max_steps=1)
    go(tmp_path / "r", max_steps=2, resume=True)
    assert [e["step"] for e in rows(tmp_path / "r" / "evals.jsonl")] == [0, 1, 2]


def test_cpu_threads_follow_omp_or_affinity(monkeypatch):
    from fastmgrpo.env import cpu_threads

    n = random.randint(1, 64)
    monkeypatch.setenv("OMP_NUM_THREADS", str(n))
    assert cpu_threads() == n
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == len(os.sched_getaffinity(0))
