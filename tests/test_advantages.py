import itertools
import math
import random
import statistics

import pytest
import torch

from fastmgrpo.advantages import group_advantages, layer2_keep_mask, shaped_layer2_rewards


def reference_advantages(rewards: list[float], groups: list[int], scale: str) -> list[float]:
    """Loop over groups: R - mean, optionally over the group's or the batch's std + 1e-4."""
    out = [0.0] * len(rewards)
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        values = [rewards[i] for i in members]
        mean = sum(values) / len(values)
        for i in members:
            if len(set(values)) == 1:
                continue
            a = rewards[i] - mean
            if scale == "std":
                a /= statistics.stdev(values) + 1e-4
            elif scale == "batch":
                a /= statistics.stdev(rewards) + 1e-4
            out[i] = a
    return out


@pytest.mark.parametrize("scale", ["none", "std", "batch"])
@pytest.mark.parametrize("trial", range(5))
def test_matches_loop_reference(scale, trial):
    rng = random.Random()
    n = rng.randint(2, 60)
    # Sparse, unordered group ids (remapping must not assume 0..K-1), binary or graded rewards.
    ids = rng.sample(range(-50, 1000), rng.randint(1, n))
    groups = [rng.choice(ids) for _ in range(n)]
    graded = trial % 2 == 0
    rewards = [rng.random() * 3 if graded else float(rng.random() < 0.5) for _ in range(n)]
    got = group_advantages(
        torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups, dtype=torch.int64), scale
    )
    assert got.dtype == torch.float64
    expected = reference_advantages(rewards, groups, scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_equal_rewards_give_exact_zero():
    # 0.1 seven times: the float32 mean is not exactly 0.1, the advantage must still be exactly 0.
    rewards = torch.tensor([0.1] * 7 + [0.7] * 2 + [1.0, 0.0], dtype=torch.float32)
    groups = torch.tensor([5] * 7 + [2] * 2 + [9, 9])
    for scale in ("none", "std", "batch"):
        adv = group_advantages(rewards, groups, scale)
        assert not torch.isnan(adv).any()
        assert (adv[:9] == 0).all(), scale
        assert adv[9] > 0 > adv[10]


def test_single_member_groups_and_int_rewards():
    adv = group_advantages(torch.tensor([1, 0, 1]), torch.tensor([0, 1, 2]), "std")
    assert adv.dtype == torch.float32 and (adv == 0).all()
    assert (group_advantages(torch.tensor([3.0]), torch.tensor([0]), "batch") == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.int64), "rank")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("h", [1, 2, 3])
def test_discard_rule_truth_table(h):
    # Every (layer-1, corrections) outcome: dropped only when all H+1 answers are wrong.
    rows = list(itertools.product([False, True], repeat=h + 1))
    l1 = torch.tensor([r[0] for r in rows])
    l2 = torch.tensor([r[1:] for r in rows])
    keep = layer2_keep_mask(l1, l2)
    assert keep.tolist() == [any(r) for r in rows]
    assert keep.sum() == len(rows) - 1


def test_discard_rule_shape_check():
    with pytest.raises(ValueError):
        layer2_keep_mask(torch.ones(3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))


def test_shaping():
    g, h = 4, 3
    r2 = torch.randint(0, 2, (g, h)).float()
    r1 = torch.randint(0, 2, (g,)).float()
    alpha = random.uniform(0.1, 2.0)
    torch.testing.assert_close(shaped_layer2_rewards(r2, r1, 0.0), r2)
    got = shaped_layer2_rewards(r2, r1, alpha)
    for i, j in itertools.product(range(g), range(h)):
        expected = r2[i, j].item() + alpha * (r2[i, j].item() - r1[i].item())
        assert math.isclose(got[i, j].item(), expected, rel_tol=1e-6, abs_tol=1e-6)
