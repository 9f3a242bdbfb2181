"""Crashes, kills and bad input: the CLI says what is wrong, and outputs stay usable."""

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastmgrpo.train as train_cli
from fastmgrpo.checkpoint import latest_checkpoint, load_trainer_state


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
