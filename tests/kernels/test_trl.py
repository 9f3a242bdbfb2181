"""`use_in_trl()`: one real TRL GRPOTrainer step with our loss vs TRL's own loss vs Liger's.

Each run trains one optimizer step (plain SGD, lr 1, no clipping, so the weight change is the
gradient) from the same saved tiny model, data and seed; the completions are then identical, so
loss, metrics and weight changes must agree to float32 rounding.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed")
pytest.importorskip("datasets", reason="datasets is not installed (TRL needs a datasets.Dataset)")

from fastmgrpo.kernels import FusedLinearGRPOLoss, use_in_trl  # noqa: E402
from fastmgrpo.testing import build_tiny_model  # noqa: E402

# measured: max |Δw − Δw_ref| / max |Δw_ref| over tensors vs TRL's own loss: 2.6e-6 (dapo), 1.4e-5 (grpo)
GRAD_RTOL = 1e-4
LOSS_ATOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny untied-head Llama whose EOS logit is raised, so completions end at varied lengths
    (at equal lengths the on-policy GRPO loss is exactly 0 and would compare nothing)."""
    model, tok = build_tiny_model(arch="llama")
    with torch.no_grad():
        probe = model.model(input_ids=torch.randint(6, 100, (8, 32), generator=torch.Generator().manual_seed(0)))
        mean = probe.last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.lm_head.weight[tok.eos_token_id] = 1.5 * mean / mean.norm()
    path = tmp_path_factory.mktemp("trl_tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _one_step(model_dir, out_dir, loss_type, patch=None):
    """One GRPOTrainer step; returns (logged metrics, {param: weight change})."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):
        return [float(sum(map(ord, c)) % 7) for c in completions]

    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=4, max_completion_length=12, beta=0.04, loss_type=loss_type,
        learning_rate=1.0, optim="sgd", max_grad_norm=0.0, max_steps=1, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        gradient_checkpointing=False, shuffle_dataset=False, seed=0,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": f"{a}+{a}="} for a in range(4)]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    if patch is None:
        trainer.train()
    else:
        with patch:
            trainer.train()
    delta = {k: before[k] - p.detach() for k, p in trainer.model.named_parameters()}
    return trainer.state.log_history[0], delta


def _max_rel_err(delta, ref):
    return max(((delta[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref if ref[k].abs().max() > 0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_trl_step_matches_trl_and_liger(model_dir, tmp_path, loss_type):
    ref_log, ref_delta = _one_step(model_dir, tmp_path, loss_type)
    assert ref_log["completions/min_length"] < ref_log["completions/max_length"], "lengths must vary"
    if loss_type == "dapo":  # on-policy grpo's loss is -mean(A) = 0 whatever the lengths; its gradient is not
        assert abs(ref_log["loss"]) > 1e-3, "a zero loss would compare nothing"
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    # a patch applies when created, so each is created just before its run
    runs = {"fastmgrpo": use_in_trl, "liger": lambda: use_in_trl(liger.LigerFusedLinearGRPOLoss, compiled=False)}
    for name, make_patch in runs.items():
        log, delta = _one_step(model_dir, tmp_path, loss_type, make_patch())
        assert "entropy" not in log, f"{name}: TRL's own loss ran, not the patched one"
        assert log["loss"] == pytest.approx(ref_log["loss"], abs=LOSS_ATOL), name
        assert log["clip_ratio/region_mean"] == pytest.approx(ref_log["clip_ratio/region_mean"], abs=1e-6), name
        assert log["kl"] == pytest.approx(ref_log["kl"], abs=1e-6), name
        assert sum(d.abs().sum() for d in delta.values()) > 0
        err = _max_rel_err(delta, ref_delta)
        print(f"{loss_type} {name}: loss {log['loss']:.3e} vs {ref_log['loss']:.3e}, max rel weight-change err {err:.1e}")
        assert err < GRAD_RTOL, name


def test_undo_restores_trl():
    from trl import GRPOTrainer

    original = GRPOTrainer._compute_loss
    with use_in_trl():
        assert GRPOTrainer._compute_loss is not original
    assert GRPOTrainer._compute_loss is original
    assert "_fastmgrpo_loss_factory" not in GRPOTrainer.__dict__


def test_swaps_the_liger_name_where_trl_still_builds_it(monkeypatch):
    """TRL versions with a Liger GRPO path look up `LigerFusedLinearGRPOLoss` in grpo_trainer."""
    import trl.trainer.grpo_trainer as grpo

    sentinel = object()
    monkeypatch.setattr(grpo, "LigerFusedLinearGRPOLoss", sentinel, raising=False)
    original = grpo.GRPOTrainer._compute_loss
    patch = use_in_trl(backend="torch")
    assert grpo.GRPOTrainer._compute_loss is original
    loss = grpo.LigerFusedLinearGRPOLoss(beta=0.0, loss_type="grpo")
    assert isinstance(loss, FusedLinearGRPOLoss) and loss.backend == "torch" and loss.beta == 0.0
    patch.undo()
    assert grpo.LigerFusedLinearGRPOLoss is sentinel


def test_unsupported_option_is_named(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, top_entropy_quantile=0.5, max_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    with use_in_trl(), pytest.raises(NotImplementedError, match="top_entropy_quantile"):
        trainer.train()


def test_kernels_import_does_not_import_trl():
    code = "import sys, fastmgrpo.kernels; sys.exit('trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
