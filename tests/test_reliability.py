"""Crashes, kills and bad input: the CLI says what is wrong, and outputs stay usable."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import fastmgrpo.checkpoint as checkpoint_mod
import fastmgrpo.eval as eval_cli
import fastmgrpo.files as files_mod
import fastmgrpo.train as train_cli
from fastmgrpo.checkpoint import CheckpointError, latest_checkpoint, load_trainer_state
from fastmgrpo.config import ConfigError, parse_config
from fastmgrpo.data import synthetic_problems
from fastmgrpo.models import ModelError, check_tokenizer, load_model
from fastmgrpo.testing import build_tiny_model
from fastmgrpo.trainer import Trainer, TrainingError


@pytest.mark.slow
def test_kill_9_during_save_leaves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_trainer import make_trainer
        tr = make_trainer(__import__('pathlib').Path({str(tmp_path)!r}))
        while True:  # save, announce, repeat: the parent kills us somewhere inside a save
            tr.save()
            print(tr.step_idx, flush=True)
            tr.step_idx += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        done = [proc.stdout.readline() for _ in range(2)]  # two complete saves
        assert all(d.strip().isdigit() for d in done), done
        time.sleep(random.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    path = latest_checkpoint(tmp_path)
    assert path is not None and int(path.name.split("-")[1]) >= 1
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.isfinite(model(torch.randint(0, 50, (1, 9))).logits).all()
    tensors, state = load_trainer_state(path)
    assert state["step"] == int(path.name.split("-")[1]) and "optimizer" in tensors


def test_oom_exits_3_and_names_the_budget(monkeypatch, capsys, tmp_path):
    class OOMTrainer:
        def __init__(self, cfg):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_cli, "Trainer", OOMTrainer)
    assert train_cli.main(["--output-dir", str(tmp_path)]) == 3
    assert "--micro-batch-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_model", "bad_dataset_line", "empty_dataset", "bad_choice_type"])
def test_user_errors_are_named(case, tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    if case == "missing_model":
        argv, expect = ["--model", str(tmp_path / "nope")], str(tmp_path / "nope")
    elif case == "bad_dataset_line":
        n = random.randint(2, 6)
        bad.write_text('{"question": "q", "answer": "#### 1"}\n' * (n - 1) + "{not json\n")
        argv, expect = ["--model", "tiny-unused", "--dataset", str(bad)], f"{bad}:{n}"
    elif case == "empty_dataset":
        bad.write_text("")
        argv, expect = ["--dataset", str(bad)], str(bad)
    else:
        (tmp_path / "c.yaml").write_text("temperature: hot\n")
        argv, expect = ["--config", str(tmp_path / "c.yaml")], "temperature"
    if case in ("bad_dataset_line", "empty_dataset"):
        # Data errors must surface before any model is loaded: check load order with a sentinel.
        argv = argv + ["--model", str(tmp_path / "never-loaded")]
    code = train_cli.main(argv + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err


# --- issue 11: nothing lost, no traceback for a user's mistake ------------------------------


FAST = ["--dataset", "synthetic:8", "--max-completion-length", "4", "--group-size", "2",
        "--l2-samples", "1", "--questions-per-step", "1", "--beta", "0", "--device", "cpu",
        "--learning-rate", "1e-3", "--warmup-ratio", "0", "--seed", "3"]


@pytest.fixture
def tiny_cli(monkeypatch):
    """train.main with the tiny model (seed 7) injected; returns (main, trainers built)."""
    built = []

    def factory(cfg):
        model, tok = build_tiny_model(seed=7)
        built.append(Trainer(cfg, model=model, tokenizer=tok, problems=synthetic_problems(8, seed=1)))
        return built[-1]

    monkeypatch.setattr(train_cli, "Trainer", factory)
    return lambda *argv: train_cli.main([*FAST, *argv]), built


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_rerun_into_a_run_folder_needs_resume_or_overwrite(tiny_cli, tmp_path, capsys):
    main, _ = tiny_cli
    out = ["--output-dir", str(tmp_path)]
    assert main(*out, "--max-steps", "3") == 0
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert main(*out, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(tmp_path) in err
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # the first run is untouched
    assert main(*out, "--max-steps", "1", "--overwrite") == 0
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000001"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert Path(summary["checkpoint"]).is_dir()
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert main(*out, "--resume", "--overwrite") == 2


def test_sigterm_right_after_the_optimizer_step_saves_that_step(tiny_cli, tmp_path, monkeypatch):
    main, built = tiny_cli
    real = Trainer._optimizer_step
    after = {}

    def step_then_term(self, loss):
        norm = real(self, loss)
        after[self.step_idx + 1] = {k: v.clone() for k, v in self.model.state_dict().items()}
        if self.step_idx == 1:  # in step 2, weights updated, counter not yet
            signal.raise_signal(signal.SIGTERM)
        return norm

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_term)
    handler = signal.getsignal(signal.SIGTERM)
    code = main("--output-dir", str(tmp_path), "--max-steps", "5", "--save-every", "1", "--keep-checkpoints", "5")
    assert code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler  # restored for whoever runs next
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001", "step-000002"]
    for step in (1, 2):
        assert load_trainer_state(ckpts / f"step-{step:06d}")[1]["step"] == step
        saved = _weights(ckpts / f"step-{step:06d}")
        assert all(torch.equal(saved[k], after[step][k]) for k in saved)


def _trainer(out, **overrides):
    model, tok = build_tiny_model(seed=5)
    cfg = dict(model="tiny", dataset="synthetic", output_dir=str(out), device="cpu", group_size=2,
               l2_samples=1, questions_per_step=1, max_completion_length=4, beta=0.0, seed=2,
               learning_rate=1e-3)
    return Trainer(train_cli.MGRPOConfig(**{**cfg, **overrides}), model=model, tokenizer=tok,
                   problems=synthetic_problems(8, seed=1))


@pytest.mark.filterwarnings("ignore:.*missing; using")  # the fallback in the middle of a re-save
def test_checkpoint_files_are_fsynced_and_resaving_a_step_keeps_one_loadable(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, keep_checkpoints=1)
    tr.save()
    synced, real_fsync, real_replace = set(), files_mod.fsync_path, os.replace
    moments = []

    def fsync(path):
        synced.add(Path(path))
        real_fsync(path)

    def replace(src, dst):
        src = Path(src)
        if src.name.startswith(".tmp-step"):  # publishing a checkpoint: all of it on disk first
            assert {src, *src.rglob("*")} <= synced
        moments.append(checkpoint_mod.latest_checkpoint(tmp_path))  # around every step of the save
        real_replace(src, dst)
        moments.append(checkpoint_mod.latest_checkpoint(tmp_path))

    monkeypatch.setattr(files_mod, "fsync_path", fsync)
    monkeypatch.setattr(checkpoint_mod.os, "replace", replace)
    tr.save()  # the same step again
    assert len(moments) >= 2 and all(m is not None for m in moments), moments


def test_resume_skips_a_damaged_latest_and_names_bad_checkpoints(tmp_path):
    tr = _trainer(tmp_path)
    for _ in range(2):
        tr.step()
        tr.save()
    good, bad = tmp_path / "checkpoints" / "step-000001", tmp_path / "checkpoints" / "step-000002"
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a save cut short by a full disk
    with pytest.warns(UserWarning, match="truncated"):
        assert _trainer(tmp_path, resume=True).step_idx == 1
    torch.save({"something": torch.zeros(1)}, good / "trainer_state.pt")  # whole, but not ours
    with pytest.raises(CheckpointError, match="step-000001: trainer_state.pt has .* bytes, not the"):
        _trainer(tmp_path, resume=True)
    (good / "manifest.json").write_text(json.dumps(checkpoint_mod._manifest(good)))  # consistent, still not ours
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=str(good)):
        _trainer(tmp_path, resume=True)


def test_resume_with_a_run_changing_option_is_refused(tmp_path):
    _trainer(tmp_path).save()
    with pytest.raises(CheckpointError, match="group_size: 2 -> 3.*--allow-config-change"):
        _trainer(tmp_path, resume=True, group_size=3, max_steps=9)
    assert _trainer(tmp_path, resume=True, save_every=2, eval_limit=3).step_idx == 0  # runtime options
    assert _trainer(tmp_path, resume=True, group_size=3, allow_config_change=True).cfg.group_size == 3


def test_no_checkpoint_with_non_finite_weights(tmp_path):
    tr = _trainer(tmp_path)
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="not finite"):
        tr.save()
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_metrics_stay_valid_json(tmp_path):
    log = train_cli.MetricsLog(tmp_path, [], tensorboard=False)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    log.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert line == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def _broken_models(root):
    model, tok = build_tiny_model(seed=1)
    model.save_pretrained(root / "no_tokenizer")
    (root / "empty").mkdir()
    (root / "no_weights").mkdir()
    model.config.save_pretrained(root / "no_weights")
    tok.save_pretrained(root / "no_weights")
    (root / "fake.gguf").write_bytes(b"not a gguf file at all")
    return [root / n for n in ("no_tokenizer", "empty", "no_weights", "fake.gguf")]


def test_unusable_models_fail_in_one_line(tmp_path, capsys):
    for path in _broken_models(tmp_path):
        with pytest.raises(ModelError, match=str(path)):
            load_model(str(path), dtype=torch.float32, device="cpu")
        assert train_cli.main([*FAST, "--model", str(path), "--output-dir", str(tmp_path / "o")]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0] and not (tmp_path / "o" / "config.json").exists()
    # transformers builds a tokenizer for a folder without tokenizer files: one unknown token per text
    placeholder = AutoTokenizer.from_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ModelError, match="unknown tokens"):
        check_tokenizer(placeholder, tmp_path / "no_tokenizer")
    check_tokenizer(build_tiny_model()[1], "tiny")


def test_bad_paths_and_settings_fail_before_the_model_loads(tmp_path, capsys):
    never = str(tmp_path / "never-loaded")  # a model error would mean the check came too late
    (tmp_path / "file").write_text("x")
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("learning_rate: inf\n")
    cases = [  # (argv, text the error must name)
        (["--eval-dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--output-dir", str(tmp_path / "file")], "is a file"),
        (["--learning-rate", "inf"], "learning_rate"),
        (["--learning-rate", "nan"], "learning_rate"),
        (["--shaping-alpha", "-inf"], "shaping_alpha"),
        (["--config", str(bad_yaml)], "learning_rate"),
    ]
    for argv, expect in cases:
        assert train_cli.main(["--model", never, "--output-dir", str(tmp_path / "o"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expect in err and never not in err, (argv, err)
    for argv in (["--output", str(tmp_path)], ["--json", str(tmp_path / "file" / "s.json")]):
        assert eval_cli.main(["--model", never, "--dataset", "synthetic:2", *argv]) == 2
        assert never not in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--temperature", "inf"])
    assert e.value.code == 2


def test_config_numbers_yaml_exponents_and_negative_values(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-6\nshaping_alpha: -2E-3\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--l2-weight", "-1e-5", "--seed", "-4"])
    assert (cfg.learning_rate, cfg.shaping_alpha, cfg.l2_weight, cfg.seed) == (1e-6, -2e-3, -1e-5, -4)
    (tmp_path / "d.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(["--config", str(tmp_path / "d.yaml")])
    assert math.isclose(parse_config(["--entropy-coef=-1e-1"]).entropy_coef, -0.1)
    with pytest.raises(ConfigError, match="epsilon_low must be >= 0"):  # the loss's own rule, at parse time
        parse_config(["--epsilon-low=-1e-1"])
