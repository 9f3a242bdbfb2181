"""Self-correction metrics, pass@k, `evaluate` on a tiny model, and the `fastmgrpo.eval` CLI."""

from __future__ import annotations

import itertools
import random

import pytest

from fastmgrpo.metrics import correction_metrics, pass_at_k


@pytest.mark.parametrize("seed", range(5))
def test_correction_metrics_match_a_counting_loop(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    t1 = [rng.random() < 0.5 for _ in range(n)]
    t2 = [rng.random() < 0.5 for _ in range(n)]
    right1 = right2 = fixed = broken = 0
    for a, b in zip(t1, t2):
        right1 += a
        right2 += b
        if not a and b:
            fixed += 1
        if a and not b:
            broken += 1
    m = correction_metrics(t1, t2)
    assert m["n"] == n
    assert m["acc_t1"] == pytest.approx(right1 / n)
    assert m["acc_t2"] == pytest.approx(right2 / n)
    assert m["delta"] == pytest.approx((right2 - right1) / n)
    assert m["delta_i_to_c"] == pytest.approx(fixed / n)
    assert m["delta_c_to_i"] == pytest.approx(broken / n)


def test_correction_metrics_hand_example_and_errors():
    m = correction_metrics([True, False, False, True], [True, True, False, False])
    assert m == {"acc_t1": 0.5, "acc_t2": 0.5, "delta": 0.0,
                 "delta_i_to_c": 0.25, "delta_c_to_i": 0.25, "n": 4}
    with pytest.raises(ValueError, match="length"):
        correction_metrics([True], [True, False])
    with pytest.raises(ValueError):
        correction_metrics([], [])


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(8))
def test_pass_at_k_matches_subset_enumeration(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(1, 12)
    k = rng.randint(1, n)
    cs = [rng.randint(0, n) for _ in range(rng.randint(1, 5))]
    expected = [_pass_at_k_brute_force(n, c, k) for c in cs]
    assert pass_at_k(n, cs[0], k) == pytest.approx(expected[0])
    assert pass_at_k(n, cs, k) == pytest.approx(sum(expected) / len(expected))
    assert pass_at_k([n] * len(cs), cs, k) == pytest.approx(sum(expected) / len(expected))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k([4, 4], [1], 1)
