"""LoRA (--lora-rank): adapters train, the base stays bit-identical and is the reference, the
sampler decodes merged weights, checkpoints are PEFT's and resume exactly, export merges."""

import copy
import json
import random

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fastmgrpo.mgrpo as mgrpo  # noqa: E402
import fastmgrpo.policy as policy_mod  # noqa: E402
from fastmgrpo import eval as eval_cli  # noqa: E402
from fastmgrpo import export, train  # noqa: E402
from fastmgrpo.attention import use_varlen_attention  # noqa: E402
from fastmgrpo.config import ConfigError, MGRPOConfig  # noqa: E402
from fastmgrpo.kernels import GRPOLossConfig, token_logprobs  # noqa: E402
from fastmgrpo.lora import merged_weights  # noqa: E402
from fastmgrpo.models import lm_head  # noqa: E402
from fastmgrpo.packing import pack  # noqa: E402
from fastmgrpo.testing import build_tiny_model, hash_reward  # noqa: E402
from fastmgrpo.trainer import Trainer  # noqa: E402
from fastmgrpo.types import Problem  # noqa: E402
from test_trainer import make_trainer, random_episodes  # noqa: E402

LORA = dict(lora_rank=4, lora_alpha=8.0)


def logprobs(model, batch):
    """Packed log-probs of batch.targets under `model` in fp32: (M,)."""
    with torch.no_grad():
        return token_logprobs(policy_mod.hidden_rows(model, batch, torch.float32), lm_head(model)[0], batch.targets)


def adapter_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_adapters_train_the_base_stays_bit_identical_and_is_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    seen = []  # (reference log-probs the trainer used, its batch)
    real_reference = policy_mod.reference_logprobs

    def recording(model, batch, loss_cfg, dtype):
        seen.append((real_reference(model, batch, loss_cfg, dtype), batch))
        return seen[-1][0]

    monkeypatch.setattr(policy_mod, "reference_logprobs", recording)
    tr = make_trainer(tmp_path, group_size=8, questions_per_step=3, beta=0.04, **LORA)
    base = copy.deepcopy(tr.model)
    base_state = {k: v.clone() for k, v in tr.model.state_dict().items() if "lora_" not in k}
    trained = adapter_names(tr.model)
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in tr.optimizer.param_groups[0]["params"])
    assert {id(p) for p in tr.optimizer.param_groups[0]["params"]} == \
        {id(p) for p in tr.model.parameters() if p.requires_grad}
    assert not lm_head(tr.model)[0].requires_grad  # the fused loss gets a frozen head: no d_W
    assert tr.policy.ref_model is tr.model  # no second model
    for _ in range(3):
        assert not tr.step()["skipped"]
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    assert all(after[k].abs().max() > 0 for k in after if "lora_B" in k)  # B starts at zero

    # The reference log-probs of the last step (adapters trained twice by then) are the frozen
    # base's, bit for bit, while the policy's differ.
    plain = base.merge_and_unload()  # a plain copy of the base: B was 0 when it was copied
    use_varlen_attention(plain)
    ref, batch = seen[-1]
    assert torch.equal(ref, logprobs(plain, batch))
    assert (logprobs(tr.model, batch) - ref).abs().max() > 1e-4


def test_fused_loss_with_a_frozen_head_gives_the_same_hidden_gradient_and_no_head_gradient():
    torch.manual_seed(random.randint(0, 1000))
    n, h, v = 24, 16, 50
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * h ** -0.5
    targets, adv = torch.randint(0, v, (n,)), torch.randn(3)
    cu = torch.tensor([0, 5, 14, n], dtype=torch.int32)
    old, ref = -torch.rand(n) * 4, -torch.rand(n) * 4
    grads = []
    for frozen in (False, True):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)
        loss, _ = policy_mod.packed_grpo_loss(x, w, targets, cu, adv, old, ref, config=GRPOLossConfig(beta=0.04),
                                              num_sequences=3, num_tokens=n)
        loss.backward()
        grads.append((loss.detach(), x.grad, w.grad))
    (loss, d_h, d_w), (loss_frozen, d_h_frozen, d_w_frozen) = grads
    assert d_w is not None and d_w.abs().max() > 0 and d_w_frozen is None
    assert torch.equal(loss, loss_frozen) and torch.equal(d_h, d_h_frozen)


def test_sampler_decodes_merged_weights_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    tr = make_trainer(tmp_path, group_size=8, questions_per_step=3, learning_rate=2e-2, **LORA)
    decode = tr.decode_weights.model
    assert not isinstance(decode, PeftModel) and all(not p.requires_grad for p in decode.parameters())
    addresses = [p.data_ptr() for p in decode.parameters()]
    tr.step()
    tr.step()
    assert tr.decode_weights.refresh() is decode
    assert [p.data_ptr() for p in decode.parameters()] == addresses  # captured graphs stay valid
    random.seed(1)
    batch = pack(random_episodes(tr.model.config.vocab_size, 4))
    tr.model.eval()
    want = logprobs(tr.model, batch)  # base + adapter, unmerged
    err = (logprobs(decode, batch) - want).abs().max().item()
    print(f"merged vs unmerged log-prob error {err:.2e}")
    assert err < 1e-4  # fp32 rounding of a different summation order
    assert (logprobs(copy.deepcopy(tr.model).unload(), batch) - want).abs().max() > 1e-3


def test_bf16_base_fp32_adapters_and_a_bf16_merged_decode_copy(tmp_path, monkeypatch):
    """The GPU dtypes (bf16 compute), on CPU: the frozen base in bf16, the adapters in fp32, the
    decode copy holding base + B·A·scale summed in fp32 and rounded once to bf16."""
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    tr = make_trainer(tmp_path, precision="bf16", group_size=8, questions_per_step=3, learning_rate=2e-2,
                      **LORA)
    dtypes = {n: p.dtype for n, p in tr.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    for _ in range(2):
        assert not tr.step()["skipped"]
    params = dict(tr.decode_weights.refresh().named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    merged = dict(merged_weights(tr.model))
    assert merged and all(torch.equal(params[n], w.to(torch.bfloat16)) for n, w in merged.items())
    base = {n.replace("base_layer.", "").removeprefix("base_model.model."): p
            for n, p in tr.model.named_parameters() if "lora_" not in n}
    assert sum(not torch.equal(params[n], base[n]) for n in merged) > len(merged) // 2  # adapters moved them


def test_resume_is_exact_and_the_checkpoint_is_peft_format(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    seed, model_seed = random.randint(0, 1000), random.randint(0, 1000)
    kw = dict(seed=seed, model_seed=model_seed, max_steps=4, **LORA)
    full = make_trainer(tmp_path / "a", **kw)
    losses_full = [full.step()["loss"] for _ in range(4)]

    first = make_trainer(tmp_path / "b", **kw)
    losses = [first.step()["loss"] for _ in range(2)]
    ckpt = first.save()
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == LORA["lora_rank"]
    base, _ = build_tiny_model(seed=model_seed)
    loaded = PeftModel.from_pretrained(base, ckpt)
    for (n, p), (m, q) in zip(first.model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n.replace(".default", "") == m.replace(".default", "") and torch.equal(p, q), n
    del first  # the "killed" run
    second = make_trainer(tmp_path / "b", resume=True, **kw)
    assert second.step_idx == 2
    losses += [second.step()["loss"] for _ in range(2)]
    assert losses == losses_full
    for (n, p), q in zip(full.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_merged_export_and_eval_of_an_adapter_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(mgrpo, "score", hash_reward)
    model, tok = build_tiny_model(seed=random.randint(0, 1000))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = MGRPOConfig(model=str(tmp_path / "tiny"), dataset="synthetic:8", output_dir=str(tmp_path / "run"),
                      device="cpu", prompt_shots=0, eval_dataset="none", max_completion_length=6, group_size=8,
                      questions_per_step=3,
                      learning_rate=2e-2, warmup_ratio=0.0, max_steps=2, **LORA)
    tr = Trainer(cfg)
    tr.step()
    tr.step()
    ckpt = tr.save()
    assert export.main(["--merge", str(ckpt), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    use_varlen_attention(merged)
    random.seed(2)
    batch = pack(random_episodes(len(tok), 4))
    tr.model.eval()
    want = logprobs(tr.model, batch)
    err = (logprobs(merged, batch) - want).abs().max().item()
    print(f"merged export vs base + adapter: {err:.2e}")
    assert err < 1e-4 and (logprobs(model, batch) - want).abs().max() > 1e-3
    assert export.main(["--merge", str(ckpt), str(tmp_path / "merged")]) == 2  # never overwrites

    records = {}
    for name, path in (("adapter", ckpt), ("merged", tmp_path / "merged")):
        out = tmp_path / f"{name}.jsonl"
        assert eval_cli.main(["--model", str(path), "--dataset", "synthetic:4", "--limit", "4",
                              "--max-new-tokens", "6", "--device", "cpu", "--no-progress",
                              "--output", str(out)]) == 0
        records[name] = out.read_text()
    assert records["adapter"] == records["merged"]


@pytest.mark.slow
def test_lora_learns_the_one_token_task(tmp_path):
    """test_trainer's learnable task (every answer is 7, one-token completions), adapters only.

    The head is frozen, and a random-initialised one (std 0.02) caps every logit at |h|·|e| ≈ 8 x
    0.16 ≈ 1.3: no adapter could make "7" likely (at most ~4 %; full fine-tuning learns by growing
    the head). The head row of "7" is made 8x longer: the task becomes learnable (a logit up to
    ~10) while "7" stays unlikely at the start (a logit of std ~1.3 instead of ~0.16: 0.2-5 %).
    The prompt has no "7" (the tied embedding makes that token 8x louder in the input too).
    Seeds 1-3 went from ~0.02 to 0.86-0.91 (mean of the last 8 steps), most of it in 8 steps.
    """
    seed = random.randint(0, 1000)
    model, tok = build_tiny_model(seed=seed)
    with torch.no_grad():
        lm_head(model)[0][tok.convert_tokens_to_ids("7")].mul_(8.0)
    problems = [Problem("Say seven.", "7", "synthetic", uid=i) for i in range(8)]
    cfg = MGRPOConfig(model="tiny", dataset="synthetic", output_dir=str(tmp_path), device="cpu", layers=1,
                      prompt_shots=0, eval_dataset="none",
                      group_size=16, questions_per_step=4, max_completion_length=1, learning_rate=2e-2,
                      warmup_ratio=0.0, beta=0.0, temperature=1.5, lr_schedule="constant", seed=seed,
                      max_steps=30, lora_rank=8, lora_alpha=16.0)
    tr = Trainer(cfg, model=model, tokenizer=tok, problems=problems)
    rewards = [tr.step()["reward_l1"] for _ in range(30)]  # step 1 samples before any update
    assert sum(rewards[-8:]) / 8 > rewards[0] + 0.5, (seed, rewards)


def test_bad_lora_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--fsdp is not supported with --lora-rank"):
        MGRPOConfig(lora_rank=8, fsdp=True)
    with pytest.raises(ConfigError, match="lora_alpha > 0"):
        MGRPOConfig(lora_rank=8, lora_alpha=0.0)
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        MGRPOConfig(lora_rank=-1)
    model, tok = build_tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "tiny"), "--dataset", "synthetic:4", "--device", "cpu",
            "--output-dir", str(tmp_path / "run"), "--lora-rank", "4", "--lora-targets", "no_such_proj"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err  # after the model-loading progress bar: one line, no traceback
    assert err.split("\n")[-2].startswith("error: --lora-targets no_such_proj:") and "Traceback" not in err
