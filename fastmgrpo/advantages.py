"""Group-relative advantages and the MGRPO layer-2 rules (discarding, reward shaping)."""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # added to the std before dividing (TRL's value)


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale: str = "none"
) -> torch.Tensor:
    """Advantage A = R - mean(R over the sequence's group), as in the MGRPO paper.

    Args:
        rewards: (N,) float rewards.
        groups:  (N,) int64 group ids (any values; equal ids form one group).
        scale: "none" (the paper), "std" (divide by the group's std + 1e-4, TRL's default) or
            "batch" (divide by the std of all N rewards + 1e-4).
    Returns:
        (N,) advantages in the rewards' float dtype (float32 for integer/bool rewards); exactly 0
        for groups whose rewards are all equal, single-member groups included.
    """
    if scale not in ("none", "std", "batch"):
        raise ValueError(f"unknown advantage scale {scale!r}: expected 'none', 'std' or 'batch'")
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must both be (N,)"
        )
    r = rewards if rewards.is_floating_point() else rewards.float()  # (N,)
    if r.numel() == 0:
        return r.clone()
    _, idx = torch.unique(groups, return_inverse=True)  # (N,) ids remapped to 0..K-1
    k = int(idx.max()) + 1  # sync point on GPU
    count = torch.bincount(idx, minlength=k).to(r.dtype)  # (K,)
    mean = r.new_zeros(k).index_add_(0, idx, r) / count  # (K,)
    adv = r - mean[idx]  # (N,)
    # Rounding can leave tiny non-zero advantages in a constant group; force them to 0.
    lo = r.new_full((k,), float("inf")).scatter_reduce_(0, idx, r, "amin")  # (K,)
    hi = r.new_full((k,), float("-inf")).scatter_reduce_(0, idx, r, "amax")  # (K,)
    adv = torch.where((lo == hi)[idx], torch.zeros_like(adv), adv)
    if scale == "std":
        sq_dev = r.new_zeros(k).index_add_(0, idx, adv * adv)  # (K,)
        std = (sq_dev / (count - 1).clamp(min=1)).sqrt()  # (K,) unbiased, as torch.std
        adv = adv / (std[idx] + STD_EPS)
    elif scale == "batch" and r.numel() > 1:
        adv = adv / (r.std() + STD_EPS)
    return adv


def layer2_keep_mask(l1_correct: torch.Tensor, l2_correct: torch.Tensor) -> torch.Tensor:
    """(G,) bool: keep a layer-2 group unless its layer-1 answer was wrong and all H
    corrections are wrong (the MGRPO discard rule).

    Args:
        l1_correct: (G,) bool, correctness of each layer-1 response.
        l2_correct: (G, H) bool, correctness of its H corrections.
    """
    if l2_correct.dim() != 2 or l1_correct.shape != l2_correct.shape[:1]:
        raise ValueError(
            f"expected (G,) and (G, H), got {tuple(l1_correct.shape)} and {tuple(l2_correct.shape)}"
        )
    return l1_correct.bool() | l2_correct.bool().any(dim=1)


def shaped_layer2_rewards(r2: torch.Tensor, r1: torch.Tensor, alpha: float) -> torch.Tensor:
    """(G, H) layer-2 rewards plus the SCoRe-style bonus alpha * (r2 - r1); alpha 0 = the paper.

    Args:
        r2: (G, H) rewards of the corrections.
        r1: (G,) reward of the layer-1 response that each row corrects.
    """
    return r2 + alpha * (r2 - r1[:, None])
