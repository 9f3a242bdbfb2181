"""--release-kv: the sampler's kept K/V caches are dropped before the update when asked, or
('auto') when what is left to PyTorch on the GPU is under a quarter of the card."""
import random
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from test_trainer import make_trainer

from fastmgrpo import sampler, trainer


def _keep_fake_decoder(model, shapes, dtype=torch.bfloat16) -> int:
    """Register kept K/V buffers of `shapes` for `model` as `sample` would; return their bytes."""
    k = {i: torch.empty(s, dtype=dtype) for i, s in enumerate(shapes)}
    v = {i: torch.empty(s, dtype=dtype) for i, s in enumerate(shapes)}
    sampler._DECODERS[model] = OrderedDict(key=SimpleNamespace(cache=SimpleNamespace(k=k, v=v)))
    return 2 * sum(torch.Size(s).numel() for s in shapes) * torch.empty((), dtype=dtype).element_size()


def test_kept_bytes_counts_every_buffer_and_release_drops_them():
    model = torch.nn.Linear(2, 2)
    rng = random.Random(41)
    shapes = [(rng.randint(1, 8), rng.randint(1, 3), rng.randint(4, 64), 16) for _ in range(3)]
    want = _keep_fake_decoder(model, shapes)
    assert sampler.kept_bytes(model) == want > 0
    sampler.release(model)
    assert sampler.kept_bytes(model) == 0


def test_auto_releases_below_a_quarter_of_the_card(monkeypatch):
    total, reserved, allocated = 80 << 30, 30 << 30, 20 << 30  # 10 GiB held unused by the allocator
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
    cuda = torch.device("cuda", 0)
    for free, released in ((total // 4 - (reserved - allocated) - 1, True), (total // 4 - (reserved - allocated), False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, total))
        assert trainer.release_kv("auto", 1, cuda) is released
        assert trainer.release_kv("always", 1, cuda) and not trainer.release_kv("never", 1, cuda)
    assert not trainer.release_kv("always", 0, cuda)  # nothing kept, nothing to drop
    assert not trainer.release_kv("auto", 1, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["always", "never"])
def test_trainer_drops_kept_caches_before_the_update(tmp_path, monkeypatch, mode):
    tr = make_trainer(tmp_path, release_kv=mode)
    model = tr.decode_weights.model
    seen = []
    real_backward = tr.policy.backward

    def backward(*args, **kwargs):
        seen.append(sampler.kept_bytes(model))
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(tr.policy, "backward", backward)
    real_rollout = tr._rollout

    def rollout():  # the rollout ends with caches kept, as on CUDA
        out = real_rollout()
        _keep_fake_decoder(model, [(4, 1, 32, 16)])
        return out

    monkeypatch.setattr(tr, "_rollout", rollout)
    tr.step()
    assert (seen[0] == 0) is (mode == "always") and len(seen) == 1
    sampler.release(model)
