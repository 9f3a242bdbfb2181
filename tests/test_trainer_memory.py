"""The trainer's host syncs, batch copies and activation memory (issue 12, item 4)."""
import collections
import contextlib
import traceback

import pytest
import torch
from test_trainer import fixed_rollout, make_trainer, random_episodes

import fastmgrpo.policy as policy_mod
import fastmgrpo.trainer as trainer_mod
from fastmgrpo.attention import use_varlen_attention
from fastmgrpo.testing import build_tiny_model
from fastmgrpo.packing import pack
from fastmgrpo.policy import packed_hidden_states

# Calls that read a tensor back to the host. On CPU none of them waits for a device, so they are
# counted where they are called: every one would be a sync on CUDA, except the optimizer's CPU
# step counters and the per-sequence attention fallback (a CPU path: on CUDA torch's varlen_attn
# takes the boundaries on the device).
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "nonzero")
EXEMPT = ("torch/optim/", "fastmgrpo/attention.py")


@contextlib.contextmanager
def host_reads():
    """Count host reads of tensors made while the block runs: yields a Counter by call site."""
    sites, saved = collections.Counter(), {n: getattr(torch.Tensor, n) for n in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if not any(e in caller.filename for e in EXEMPT):
                sites[f"{name} {caller.filename}:{caller.lineno}"] += 1
            return saved[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield sites
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_host_syncs_per_step_do_not_grow_with_micro_batches(tmp_path, monkeypatch, num_iterations):
    """One read-back per optimizer update (loss and grad norm together) and one at the end of the
    step (the sampler mismatch), however many micro-batches: metrics stay on the device."""
    counts = {}
    for budget in (1000, 16):  # one micro-batch per layer, or about one per sequence
        tr = make_trainer(tmp_path / str(budget), model_seed=2, seed=2, micro_batch_tokens=budget, beta=0.04,
                          num_iterations=num_iterations, max_steps=2)
        fixed_rollout(monkeypatch, len(tr.tokenizer), 12, seed=7)
        micro_batches = []
        plan = tr.policy.plan
        monkeypatch.setattr(tr.policy, "plan", lambda *a: micro_batches.append(len(p := plan(*a))) or p)
        with host_reads() as sites:
            m = tr.step()
        assert not m["skipped"]
        counts[budget] = (micro_batches[0], sum(sites.values()), dict(sites))
    (few, syncs_few, _), (many, syncs_many, where) = counts[1000], counts[16]
    assert many >= few + 5, counts  # the bound is tested where it matters
    assert syncs_many == syncs_few == num_iterations + 1, where


def test_metrics_equal_the_per_micro_batch_values(tmp_path, monkeypatch):
    """The device-side sums give the same loss and metrics as adding each micro-batch's values."""
    seen = []
    real = policy_mod.packed_grpo_loss

    def spy(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        seen.append((loss.item(), {k: v.item() for k, v in m.items() if k != "logprobs"}, kwargs))
        return loss, m

    tr = make_trainer(tmp_path, model_seed=3, seed=3, micro_batch_tokens=24, beta=0.04)
    eps = fixed_rollout(monkeypatch, len(tr.tokenizer), 10, seed=8)
    monkeypatch.setattr(policy_mod, "packed_grpo_loss", spy)
    m = tr.step()
    calls = [c for c in seen if c[2]["num_tokens"] > 1]  # not the probe
    total = {layer: sum(len(e.completion_ids) for e in eps if e.layer == layer) for layer in (1, 2)}
    assert m["loss"] == pytest.approx(sum(c[0] for c in calls), rel=1e-6, abs=1e-9)
    for k in ("kl", "clip_ratio", "entropy"):
        # each call's metric is its layer's token mean: weight by the layer's share of all tokens
        want = sum(c[1][k] * c[2]["num_tokens"] for c in calls) / sum(total.values())
        assert m[k] == pytest.approx(want, rel=1e-5, abs=1e-9), k


def test_batch_copy_keeps_values_and_skips_pinning_on_cpu():
    """PackedBatch.to: same values; on CPU nothing is pinned (pinning is for host->CUDA copies)."""
    batch = pack(random_episodes(50, 5))
    moved = batch.to("cpu")
    for k, v in batch.__dict__.items():
        if isinstance(v, torch.Tensor):
            assert moved.__dict__[k] is v  # already there: no copy
        else:
            assert moved.__dict__[k] == v
    assert list(batch.cu_targets_host) == batch.cu_targets.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned, non-blocking copies need CUDA")
def test_batch_copy_to_cuda_is_pinned_and_exact():
    batch = pack(random_episodes(50, 5))
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    for k, v in batch.__dict__.items():
        if isinstance(v, torch.Tensor):
            assert moved.__dict__[k].is_cuda and torch.equal(moved.__dict__[k].cpu(), v), k


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward over one packed forward (tensors counted once each;
    parameters excluded): the activation memory a micro-batch holds at its peak."""
    params = {p.data_ptr() for p in model.parameters()}
    kept = {}

    def pack_hook(t):
        if t.data_ptr() not in params:
            kept[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        hidden = packed_hidden_states(model, batch)
    hidden.float().pow(2).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_gradient_checkpointing_keeps_only_layer_inputs_and_the_same_gradients(arch):
    """Checkpointing on the packed varlen path: gradients unchanged, and autograd keeps far less
    (each decoder layer's input instead of its intermediates)."""
    out = {}
    batch = pack(random_episodes(build_tiny_model(seed=4, arch=arch)[0].config.vocab_size, 12))
    for ckpt in (False, True):
        model, _ = build_tiny_model(seed=4, arch=arch)
        use_varlen_attention(model)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
        out[ckpt] = saved_activation_bytes(model, batch), {n: p.grad for n, p in model.named_parameters()
                                                           if p.grad is not None}
    (plain, g_plain), (ckpt, g_ckpt) = out[False], out[True]
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7, msg=n)
    print(f"{arch}: autograd keeps {plain} bytes, {ckpt} with checkpointing")
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_checkpointing_default_is_on_for_large_cuda_micro_batches():
    from fastmgrpo.config import MGRPOConfig, parse_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trainer_mod.checkpointing(MGRPOConfig(micro_batch_tokens=4096), cuda)
    assert not trainer_mod.checkpointing(MGRPOConfig(micro_batch_tokens=1024), cuda)
    assert not trainer_mod.checkpointing(MGRPOConfig(micro_batch_tokens=4096), cpu)
    assert not trainer_mod.checkpointing(parse_config(["--no-gradient-checkpointing"]), cuda)
    assert trainer_mod.checkpointing(parse_config(["--gradient-checkpointing", "--micro-batch-tokens", "64"]), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_cuda_syncs_per_step_do_not_grow_with_micro_batches(tmp_path, monkeypatch):
    """On the GPU, counted by torch itself: a step's synchronizing calls do not depend on the
    number of micro-batches. The per-sequence attention fallback (where torch's varlen_attn
    cannot serve a layer) reads the boundaries once per forward; those reads are counted apart."""
    import warnings

    import fastmgrpo.attention as attention

    bounds, real_bounds = [], attention._host_bounds
    monkeypatch.setattr(attention, "_host_bounds", lambda cu: bounds.append(1) or real_bounds(cu))
    counts = {}
    for budget in (1000, 16):
        tr = make_trainer(tmp_path / str(budget), model_seed=2, seed=2, micro_batch_tokens=budget, beta=0.04,
                          device="cuda", precision="bf16", max_steps=3)
        fixed_rollout(monkeypatch, len(tr.tokenizer), 12, seed=7)
        tr.step()  # warm-up: allocator, optimizer state, lazy initialisation
        bounds.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tr.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        counts[budget] = (syncs - len(bounds), syncs, len(bounds))
    print("CUDA syncs per step (without fallback reads, all, fallback reads):", counts)
    assert counts[16][0] == counts[1000][0], counts
