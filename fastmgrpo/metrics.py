"""Step metrics and how ranks combine them; self-correction metrics; pass@k; timers and memory.

Every float a training step reports is typed where it is produced: `Sum` (counts, added over
ranks), `Mean` (rates over equal-sized local batches, averaged), `Max` (times and memory, the
slowest rank's) or `Same` (already global). `distributed.Dist.reduce_metrics` refuses an untyped
float, so a new metric cannot be combined the wrong way by default. The self-correction metrics
(SCoRe definitions) and the unbiased pass@k estimator are pure functions of per-problem
outcomes, used by `fastmgrpo.eval` and by the trainer on each step's batch.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from math import prod

import torch


class Metric(float):
    """A step metric: a float that says how ranks combine it (`op`)."""

    op = ""


class Sum(Metric):
    """Added over ranks (tokens, sequences, groups)."""

    op = "sum"


class Mean(Metric):
    """Averaged over ranks (rates over equal-sized local batches)."""

    op = "mean"


class Max(Metric):
    """The largest rank's (times, memory)."""

    op = "max"


class Same(Metric):
    """Already global, equal on every rank (reduced losses, grad norm, learning rate)."""

    op = "same"


class Stopwatch:
    """Time summed over `with` blocks, read once at the end: CUDA events on a GPU (no host sync
    per block; the host returns before the device work is done), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda, self.spans, self.total = device.type == "cuda", [], 0.0

    def __enter__(self):
        if self.cuda:
            self.spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.spans[-1][0].record()
        else:
            self.total -= time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.spans[-1][1].record()
        else:
            self.total += time.perf_counter()

    def seconds(self) -> float:
        """The summed time; on CUDA this waits for the last block's events."""
        if self.spans:
            self.spans[-1][1].synchronize()
        return self.total + sum(a.elapsed_time(b) for a, b in self.spans) / 1e3


def peak_memory_gb(device: torch.device, reset: bool = False) -> float:
    """Peak GPU memory allocated since the last reset (reset=True starts a new phase); on CPU the
    process's peak resident memory (it cannot be reset per phase)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def correction_metrics(t1_correct: Sequence[bool], t2_correct: Sequence[bool]) -> dict:
    """Accuracy before and after one self-correction round, and the transition rates.

    Args:
        t1_correct: per problem, whether the first attempt was right.
        t2_correct: per problem (same order), whether the corrected attempt was right.

    Returns:
        dict with `acc_t1`, `acc_t2`, `delta` (acc_t2 - acc_t1), `delta_i_to_c` (fraction of
        all problems wrong at t1 and right at t2), `delta_c_to_i` (right at t1, wrong at t2),
        all floats in [0, 1] except `delta` in [-1, 1], and `n` (number of problems).
        `delta == delta_i_to_c - delta_c_to_i` holds exactly up to rounding.
    """
    if len(t1_correct) != len(t2_correct):
        raise ValueError(
            f"t1_correct and t2_correct differ in length: {len(t1_correct)} vs {len(t2_correct)}"
        )
    n = len(t1_correct)
    if n == 0:
        raise ValueError("correction_metrics needs at least one problem")
    pairs = [(bool(a), bool(b)) for a, b in zip(t1_correct, t2_correct)]
    acc_t1 = sum(a for a, _ in pairs) / n
    acc_t2 = sum(b for _, b in pairs) / n
    return {
        "acc_t1": acc_t1,
        "acc_t2": acc_t2,
        "delta": acc_t2 - acc_t1,
        "delta_i_to_c": sum(b and not a for a, b in pairs) / n,
        "delta_c_to_i": sum(a and not b for a, b in pairs) / n,
        "n": n,
    }


def _pass_at_k_one(n: int, c: int, k: int) -> float:
    # 1 - C(n-c, k) / C(n, k), as a product to avoid huge binomials (Chen et al. 2021, Codex).
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(n: int | Sequence[int], c: int | Sequence[int], k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021), averaged over problems.

    Args:
        n: samples drawn per problem; one int for all problems or one per problem.
        c: correct samples per problem; one int (a single problem) or one per problem.
        k: the k of pass@k, 1 <= k <= n.

    Returns:
        mean over problems of 1 - C(n - c, k) / C(n, k).
    """
    cs = [c] if isinstance(c, int) else list(c)
    ns = [n] * len(cs) if isinstance(n, int) else list(n)
    if len(ns) != len(cs) or not cs:
        raise ValueError(f"pass@k needs one n per problem and at least one problem, got {ns}, {cs}")
    return sum(_pass_at_k_one(ni, ci, k) for ni, ci in zip(ns, cs)) / len(cs)
