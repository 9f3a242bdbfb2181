"""Trainer on tiny random models: a step trains, packing is exact, learning happens, resume is exact."""

import copy
import json
import random

import pytest
import torch

import fastmgrpo.mgrpo as mgrpo
import fastmgrpo.policy as policy_mod
import fastmgrpo.trainer as trainer_mod
from fastmgrpo.config import ConfigError, MGRPOConfig, build_parser
from fastmgrpo.data import synthetic_problems
from fastmgrpo.kernels import GRPOLossConfig, packed_grpo_loss, token_logprobs
from fastmgrpo.models import lm_head
from fastmgrpo.packing import pack
from fastmgrpo.policy import packed_hidden_states
from fastmgrpo.testing import build_tiny_model, hash_reward
from fastmgrpo.trainer import Trainer, TrainingError
from fastmgrpo.types import Episode, Problem


def make_trainer(tmp_path, problems=None, arch="gemma3", model_seed=None, **overrides):
    model_seed = random.randint(0, 10_000) if model_seed is None else model_seed
    model, tok = build_tiny_model(seed=model_seed, arch=arch)
    opts = dict(model="tiny", dataset="synthetic", output_dir=str(tmp_path), device="cpu",
                max_completion_length=6, group_size=3, l2_samples=2, questions_per_step=1,
                learning_rate=1e-3, warmup_ratio=0.0, beta=0.04, seed=random.randint(0, 10_000))
    opts.update(overrides)
    cfg = MGRPOConfig(**opts)
    return Trainer(cfg, model=model, tokenizer=tok, problems=problems or synthetic_problems(16, seed=1))


@pytest.mark.parametrize("layers", [1, 2])
def test_step_changes_every_parameter_tensor(tmp_path, monkeypatch, layers):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    # Three groups of 8: the chance that every group's rewards are all equal (no signal) is ~1e-6.
    tr = make_trainer(tmp_path, layers=layers, group_size=8, questions_per_step=3)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.step()
    assert torch.isfinite(torch.tensor(m["loss"])) and not m["skipped"]
    assert m["grad_norm"] > 0
    unchanged = [n for n, p in tr.model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == []
    assert (m.get("reward_l2") is not None) == (layers == 2)
    assert m["tokens_trained"] > m["tokens_generated"] > 0


def random_episodes(vocab, n):
    eps = []
    for i in range(n):
        p, c = random.randint(1, 9), random.randint(1, 7)
        eps.append(Episode(
            prompt_ids=[random.randrange(vocab) for _ in range(p)],
            completion_ids=[random.randrange(vocab) for _ in range(c)],
            sampler_logprobs=[random.uniform(-6, -1) for _ in range(c)], reward=0.0, correct=False,
            layer=1 + i % 2, group=0, advantage=random.gauss(0, 1), weight=random.choice([1.0, 0.5]),
        ))
    return eps


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_packed_loss_and_grads_equal_one_by_one(arch, loss_type):
    model, tok = build_tiny_model(seed=random.randint(0, 1000), arch=arch)
    model.train()
    eps = random_episodes(len(tok), 5)
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.0, max_completion_length=8)
    norm = {"num_sequences": len(eps), "num_tokens": sum(len(e.completion_ids) for e in eps)}
    w = lambda: lm_head(model)[0]  # noqa: E731

    batch = pack(eps)
    hidden = packed_hidden_states(model, batch)[batch.target_rows]
    loss_packed, _ = packed_grpo_loss(hidden, w(), batch.targets, batch.cu_targets, batch.advantages,
                                      batch.sampler_logprobs, config=cfg, seq_weights=batch.weights, **norm)
    loss_packed.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    loss_single = 0.0
    for e in eps:  # each sequence alone through the plain (unpacked) model forward
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        h = model.get_decoder()(input_ids=ids).last_hidden_state[0]
        rows = h[len(e.prompt_ids) - 1: -1]
        loss, _ = packed_grpo_loss(
            rows, w(), torch.tensor(e.completion_ids), torch.tensor([0, len(e.completion_ids)], dtype=torch.int32),
            torch.tensor([e.advantage]), torch.tensor(e.sampler_logprobs), config=cfg,
            seq_weights=torch.tensor([e.weight]), **norm)
        loss.backward()
        loss_single += loss.item()
    assert loss_packed.item() == pytest.approx(loss_single, rel=1e-4, abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_packed[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.slow
def test_reward_rises_on_a_learnable_task(tmp_path):
    """Every answer is 7 and a completion is one token: the tiny model must learn to say "7".

    At initialisation about 1 completion in 100 does (one character out of the vocabulary);
    GRPO alone must find and reinforce it. (Longer completions let it collapse onto "777".)
    """
    seed = random.randint(0, 1000)
    problems = [Problem("Say 7.", "7", "synthetic", uid=i) for i in range(8)]
    # 64 samples a step at temperature 1.5, so even a model that starts far from "7" finds it.
    tr = make_trainer(tmp_path, problems=problems, layers=1, group_size=16, questions_per_step=4,
                      max_completion_length=1, learning_rate=2e-2, beta=0.0, temperature=1.5,
                      lr_schedule="constant", seed=seed, max_steps=30)
    rewards = [tr.step()["reward_l1"] for _ in range(30)]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.3, (seed, rewards)


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    seed = random.randint(0, 1000)
    full = make_trainer(tmp_path / "a", seed=seed, max_steps=4)
    init = {k: v.clone() for k, v in full.model.state_dict().items()}
    losses_full = [full.step()["loss"] for _ in range(4)]

    def fresh(out, resume):
        model, tok = build_tiny_model()
        model.load_state_dict(init)
        cfg = MGRPOConfig(**{**full.cfg.to_dict(), "output_dir": str(out), "resume": resume})
        return Trainer(cfg, model=model, tokenizer=tok, problems=full.problems)

    first = fresh(tmp_path / "b", False)
    losses = [first.step()["loss"] for _ in range(2)]
    first.save()
    del first  # the "killed" run
    second = fresh(tmp_path / "b", True)
    assert second.step_idx == 2
    losses += [second.step()["loss"] for _ in range(2)]
    assert losses == pytest.approx(losses_full, rel=1e-5, abs=1e-7)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fastmgrpo.checkpoint import latest_checkpoint
    from fastmgrpo.files import WriteError

    tr = make_trainer(tmp_path)
    tr.step()
    good = tr.save()
    tr.step()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tr.tokenizer, "save_pretrained", boom)
    with pytest.raises(WriteError, match="disk full; the partial copy was removed"):
        tr.save()
    assert latest_checkpoint(tmp_path) == good and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(good)
    ids = torch.randint(0, len(tr.tokenizer), (1, 12))
    assert torch.isfinite(reloaded(ids).logits).all()


def test_nan_steps_are_skipped_then_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    tr = make_trainer(tmp_path, max_bad_steps=2)
    real = policy_mod.packed_grpo_loss

    def nan_loss(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), m

    monkeypatch.setattr(policy_mod, "packed_grpo_loss", nan_loss)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.step()
    assert m["skipped"] is True
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    with pytest.raises(TrainingError, match="2 steps in a row"):
        tr.step()


@pytest.mark.slow
def test_cli_end_to_end_writes_metrics_and_loadable_checkpoint(tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model, tok = build_tiny_model(seed=random.randint(0, 1000))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmgrpo.train", "--model", str(tmp_path / "tiny"), "--dataset",
           "synthetic:8", "--max-steps", "2", "--output-dir", str(out), "--max-completion-length", "6",
           "--device", "cpu", "--group-size", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("loss", "reward_l1", "reward_l2", "acc_l1", "acc_after_correction", "delta_i_to_c",
                "delta_c_to_i", "l2_groups_kept", "l2_groups_discarded", "kl", "clip_ratio", "entropy",
                "grad_norm", "lr", "tokens_generated", "tokens_trained",
                "step_time", "peak_memory_gb"):
        assert key in lines[0], key
    summary = json.loads((out / "summary.json").read_text())
    ckpt = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert ckpt.config.vocab_size == model.config.vocab_size
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2


@pytest.mark.slow
def test_cli_reports_bad_config(tmp_path, capsys):
    import subprocess
    import sys

    from fastmgrpo import train

    (tmp_path / "c.yaml").write_text("group_size: 4\nno_such_option: 1\n")
    proc = subprocess.run([sys.executable, "-m", "fastmgrpo.train", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_option" in proc.stderr
    (tmp_path / "d.json").write_text('{"group_size": "four"}')  # in-process: the entry point ran above
    assert train.main(["--config", str(tmp_path / "d.json")]) == 2
    assert "group_size" in capsys.readouterr().err


# --- objective: per-layer normalisation, mu inner updates, old log-probs -------------------------

def fixed_rollout(monkeypatch, vocab, n, seed, weights=None):
    """Replace rollout by n fixed random episodes (both layers, non-zero advantages); returns them."""
    random.seed(seed)
    eps = random_episodes(vocab, n)
    for e in eps:
        e.weight = e.weight if weights is None else weights[e.layer]
    monkeypatch.setattr(trainer_mod, "collect", lambda *a, **k: mgrpo.Rollout(copy.deepcopy(eps), {}))
    return eps


def recorded_losses(monkeypatch):
    """Calls of packed_grpo_loss made by the trainer: (keyword arguments plus `old` and `seqs`,
    the completion ids of each packed sequence; metrics)."""
    calls, real = [], policy_mod.packed_grpo_loss

    def spy(hidden, weight, targets, cu, adv, old=None, ref=None, **kw):
        loss, m = real(hidden, weight, targets, cu, adv, old, ref, **kw)
        ids, cu = targets.tolist(), cu.tolist()
        seqs = [tuple(ids[a:b]) for a, b in zip(cu, cu[1:])]
        calls.append(({"old": old, "seqs": seqs, **kw}, {k: v.clone() for k, v in m.items()}))
        return loss, m

    monkeypatch.setattr(policy_mod, "packed_grpo_loss", spy)
    return calls


def alone_logprobs(model, e):
    """(c,) log-probs of e's completion from full logits, the sequence run on its own."""
    h = model.get_decoder()(input_ids=torch.tensor([e.prompt_ids + e.completion_ids])).last_hidden_state[0]
    logits = h[len(e.prompt_ids) - 1: -1] @ lm_head(model)[0].T  # (c, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(e.completion_ids)[:, None])[:, 0]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_each_layer_is_normalised_by_its_own_counts(tmp_path, monkeypatch, loss_type):
    """J = w1*J_L1 + w2*J_L2, each over its own layer's sequences/tokens, whatever the packing."""
    w = {1: 0.7, 2: 1.3}
    tr = make_trainer(tmp_path, model_seed=3, seed=3, loss_type=loss_type, beta=0.0, max_grad_norm=0.0,
                      micro_batch_tokens=24)
    eps = fixed_rollout(monkeypatch, len(tr.tokenizer), 9, seed=5, weights=w)
    grads = {}
    tr.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    m = tr.step()

    ref, _ = build_tiny_model(seed=3)
    L = tr.cfg.max_completion_length
    want = 0.0
    for layer in (1, 2):
        mine = [e for e in eps if e.layer == layer]
        n_seq, n_tok = len(mine), sum(len(e.completion_ids) for e in mine)
        for e in mine:
            lp = alone_logprobs(ref, e)
            per_token = -e.advantage * torch.exp(lp - lp.detach())  # ratio 1, on-policy
            if loss_type == "grpo":
                j = per_token.mean() / n_seq
            else:
                j = per_token.sum() / (n_tok if loss_type == "dapo" else n_seq * L)
            want = want + w[layer] * j
    want.backward()
    assert m["loss"] == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mu1_ratio_is_exactly_one_and_sampler_mismatch_is_logged(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, model_seed=4, seed=4, beta=0.04)
    eps = fixed_rollout(monkeypatch, len(tr.tokenizer), 6, seed=6)
    calls = recorded_losses(monkeypatch)
    m = tr.step()
    assert calls and all(kw["old"] is None and kw["vllm_is_ratio"] is None for kw, _ in calls)
    assert all(mt["ratio_mean"].item() == 1.0 and mt["clip_ratio"].item() == 0.0 for _, mt in calls)

    ref, _ = build_tiny_model(seed=4)
    with torch.no_grad():
        diff = torch.cat([(alone_logprobs(ref, e) - torch.tensor(e.sampler_logprobs)).abs() for e in eps])
    assert m["sampler_logp_diff_mean"] == pytest.approx(diff.mean().item(), rel=1e-5)
    assert m["sampler_logp_diff_max"] == pytest.approx(diff.max().item(), rel=1e-5)


def test_mu2_makes_two_updates_with_old_logprobs_frozen_and_the_clip_acting(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, model_seed=5, seed=5, num_iterations=2, max_steps=2, beta=0.0,
                      learning_rate=5e-2, lr_schedule="linear")
    eps = fixed_rollout(monkeypatch, len(tr.tokenizer), 6, seed=7)
    calls = recorded_losses(monkeypatch)
    steps = []
    tr.optimizer.register_step_pre_hook(lambda *_: steps.append(None))
    m = tr.step()
    assert len(steps) == 2 and tr.scheduler.last_epoch == 2 and tr.step_idx == 1
    # Linear decay over max_steps * mu = 4 updates: this step's two ran at the peak and 3/4 of it
    # (the logged lr is the mean of the rates the step's updates applied).
    assert m["lr"] == pytest.approx(5e-2 * (1 + 0.75) / 2)
    first, second = calls[: len(calls) // 2], calls[len(calls) // 2:]
    assert all(kw["old"] is None and mt["clip_ratio"].item() == 0.0 for kw, mt in first)
    ref, _ = build_tiny_model(seed=5)
    with torch.no_grad():
        by_targets = {tuple(e.completion_ids): alone_logprobs(ref, e) for e in eps}
    for kw, _ in second:  # old = the initial policy's log-probs
        want = torch.cat([by_targets[k] for k in kw["seqs"]])
        torch.testing.assert_close(kw["old"], want, rtol=1e-5, atol=1e-5)
    assert sum(mt["clip_ratio"].item() for _, mt in second) > 0


def test_sampler_is_correction_is_truncated_ratio_to_the_sampler(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="sampler_is_cap"):
        MGRPOConfig(sampler_is_cap=0.0)
    cap = 1.5
    tr = make_trainer(tmp_path, model_seed=6, seed=6, sampler_is_cap=cap, beta=0.0)
    eps = fixed_rollout(monkeypatch, len(tr.tokenizer), 6, seed=8)
    calls = recorded_losses(monkeypatch)
    tr.step()
    ref, _ = build_tiny_model(seed=6)
    with torch.no_grad():
        by_targets = {tuple(e.completion_ids): (alone_logprobs(ref, e) - torch.tensor(e.sampler_logprobs))
                      .exp().clamp(max=cap) for e in eps}
    ratios = []
    for kw, _ in calls:
        got = kw["vllm_is_ratio"]
        torch.testing.assert_close(got, torch.cat([by_targets[k] for k in kw["seqs"]]), rtol=1e-5, atol=1e-6)
        ratios.append(got)
    ratios = torch.cat(ratios)
    assert (ratios == cap).any() and (ratios < cap).any()  # the cap truncates some tokens, not all


def test_prompt_shots_prefix_every_prompt_and_leave_the_training_set(tmp_path):
    problems = synthetic_problems(12, seed=4)
    tr = make_trainer(tmp_path, problems=problems, prompt_shots=3, seed=5, max_prompt_length=4096)
    shown = [p.question for p in tr.shots]
    assert len(set(shown)) == 3 and set(shown) <= {p.question for p in problems}
    assert [p.question for p in tr.problems] == [p.question for p in problems if p.question not in shown]
    for p, ids in zip(tr.problems, tr.prompts):
        text = tr.tokenizer.decode(ids)
        # The exemplars come first, each with its answer, then the question itself.
        positions = [text.index(q) for q in shown] + [text.rindex(p.question)]
        assert positions == sorted(positions)
        assert all(f"#### {s.answer}" in text for s in tr.shots)


def test_loss_aggregation_default_is_the_papers_grpo():
    assert MGRPOConfig().loss_type == "grpo"
    assert MGRPOConfig(loss_type="dapo").loss_type == "dapo"
    help_text = next(a.help for a in build_parser()._actions if a.dest == "loss_type")
    assert "default: 'grpo'" in help_text and "dapo" in help_text


def test_reference_model_is_kept_in_the_compute_dtype(tmp_path):
    """bf16 precision: the frozen reference is a bf16 copy (half the bytes of an fp32 one), and its
    log-probs stay within bf16 rounding of the fp32 policy it was copied from."""
    tr = make_trainer(tmp_path, precision="bf16", beta=0.04, model_seed=3, seed=4)
    assert {p.dtype for p in tr.policy.ref_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
    random.seed(5)
    batch = pack(random_episodes(tr.model.config.vocab_size, 4))
    ref = policy_mod.reference_logprobs(tr.policy.ref_model, batch, tr.policy.loss_cfg, tr.dtype)
    with torch.no_grad():
        w, _ = lm_head(tr.model)
        fp32 = token_logprobs(policy_mod.hidden_rows(tr.model, batch, torch.float32), w, batch.targets)
        autocast = token_logprobs(policy_mod.hidden_rows(tr.model, batch, torch.bfloat16),
                                  w.to(torch.bfloat16), batch.targets)  # fp32 weights, bf16 compute
    err, err_autocast = (ref - fp32).abs().max().item(), (autocast - fp32).abs().max().item()
    print(f"bf16 reference error {err:.2e}, fp32 weights under bf16 autocast {err_autocast:.2e}")
    assert 0 < err <= 2 * err_autocast + 1e-3  # computes in bf16, no worse than autocast


def test_loss_memory_budget_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="loss_memory_mib"):
        MGRPOConfig(loss_memory_mib=0)
    assert MGRPOConfig(loss_memory_mib=3).loss_config().memory_budget == 3 * 2**20
