"""One MGRPO rollout, top to bottom: questions -> scored layer-1 and layer-2 episodes.

Layer 1 is standard GRPO: G answers per question, rewarded for correctness, advantage
R - mean(R) over the question's group. Layer 2 turns every layer-1 answer o_i into a correction
prompt q'_i = question + o_i + guiding phrase, samples H corrections with the same policy, rewards
them for ending correct and drops the groups where o_i was wrong and every correction is wrong
(they carry no signal about how to correct). With `layers=1` this is plain GRPO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .advantages import group_advantages, layer2_keep_mask, shaped_layer2_rewards
from .config import MGRPOConfig
from .metrics import Mean, Sum, correction_metrics
from .prompts import layer2_prompt
from .rewards import score
from .stopping import generate
from .types import Completion, Episode, Problem


@dataclass
class Rollout:
    """Episodes that enter the loss (discarded layer-2 groups already removed) and step stats,
    each typed by how ranks combine it (metrics.Sum / Mean)."""

    episodes: list[Episode]
    stats: dict[str, float]


def _sample(model, prompts: list[list[int]], n: int, cfg: MGRPOConfig, ctx: dict) -> list[Completion]:
    """n completions per prompt, prompt-major order, with their decoded text."""
    return generate(
        model,
        ctx["tokenizer"],
        [p for p in prompts for _ in range(n)],
        stop_strings=ctx["stop_strings"],
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_ids=ctx["stop_ids"],
        pad_id=ctx["pad_id"],
        batch_size=cfg.rollout_batch_size,
        generator=ctx["generator"],
        progress=ctx.get("progress"),
        prefix_reuse=ctx["prefix_reuse"],
    )


def _length_stats(completions: list[Completion], layer: int) -> dict[str, float]:
    """Fraction of completions cut at the token limit and mean completion tokens of one layer."""
    n = max(len(completions), 1)
    return {f"truncated_l{layer}": Mean(sum(not c.finished for c in completions) / n),
            f"completion_len_l{layer}": Mean(sum(len(c.token_ids) for c in completions) / n)}


def _scores(completions: list[Completion], problems: list[Problem], cfg: MGRPOConfig, earlier=None):
    """(rewards (N,) float32, correct (N,) bool) for completion k of problems[k]; `earlier[k]`:
    the layer-1 text completion k corrects, judged with it as one answer (`rewards.score`)."""
    parts = [[] for _ in completions] if earlier is None else [[e] for e in earlier]
    pairs = [score(c.text, p, cfg.format_reward, earlier=e) for c, p, e in zip(completions, problems, parts)]
    rewards = torch.tensor([r for r, _ in pairs], dtype=torch.float32)
    correct = torch.tensor([ok for _, ok in pairs], dtype=torch.bool)
    return rewards, correct


def collect(
    model,
    tokenizer,
    problems: list[Problem],
    prompts: list[list[int]],
    cfg: MGRPOConfig,
    *,
    rng: random.Random,
    generator: torch.Generator,
    stop_ids: set[int],
    pad_id: int,
    stop_strings: tuple[str, ...] = (),
    progress=None,
    prefix_reuse: bool = True,
) -> Rollout:
    """Sample, score and build the episodes of one step.

    Args:
        problems: Q questions; prompts: their layer-1 prompt token ids.
        rng: draws the guiding phrases; generator: drives token sampling (both checkpointed).
        stop_strings: end completions there (`prompts.stop_strings`), both layers.
        prefix_reuse: prefill each prompt prefix the step's sequences share once (`sampler.sample`):
            a question's G layer-1 prompts, and its layer-2 prompts (question prompt + answer).
    Returns:
        Rollout with Q*G layer-1 episodes and up to Q*G*H layer-2 episodes.
    """
    G, H = cfg.group_size, cfg.l2_samples
    ctx = {"tokenizer": tokenizer, "stop_ids": stop_ids, "pad_id": pad_id, "generator": generator, "progress": progress,
           "stop_strings": stop_strings, "prefix_reuse": prefix_reuse}

    # Layer 1: G answers per question, one advantage group per question.
    l1 = _sample(model, prompts, G, cfg, ctx)
    l1_problems = [p for p in problems for _ in range(G)]
    l1_prompts = [p for p in prompts for _ in range(G)]
    r1, c1 = _scores(l1, l1_problems, cfg)
    q_of_l1 = torch.arange(len(problems)).repeat_interleave(G)  # (Q*G,)
    a1 = group_advantages(r1, q_of_l1, cfg.advantage_scale)
    episodes = [
        Episode(l1_prompts[k], l1[k].token_ids, l1[k].logprobs, float(r1[k]), bool(c1[k]),
                layer=1, group=int(q_of_l1[k]), advantage=float(a1[k]), weight=cfg.l1_weight,
                text=l1[k].text)
        for k in range(len(l1))
    ]
    stats = {
        "reward_l1": Mean(r1.mean().item()),
        "acc_l1": Mean(c1.float().mean().item()),
        "tokens_generated": Sum(sum(len(c.token_ids) for c in l1)),
        **_length_stats(l1, 1),
    }
    if cfg.layers == 1:
        return Rollout(episodes, stats)

    # Layer 2: every layer-1 answer + a guiding phrase becomes a correction prompt.
    phrases = [rng.choice(cfg.guiding_phrases) for _ in l1]
    q2 = [
        layer2_prompt(tokenizer, l1_problems[k], l1_prompts[k], l1[k].token_ids, phrases[k],
                      fmt=cfg.l2_format, stop_ids=stop_ids)
        for k in range(len(l1))
    ]
    l2 = _sample(model, q2, H, cfg, ctx)
    # The verdict reads o_i and its correction as one answer: a correction that states no
    # final answer keeps o_i's (a confirmation of a right answer is right).
    r2, c2 = _scores(l2, [p for p in l1_problems for _ in range(H)], cfg,
                     earlier=[c.text for c in l1 for _ in range(H)])
    r2, c2 = r2.view(-1, H), c2.view(-1, H)  # (Q*G, H)
    keep = layer2_keep_mask(c1, c2)  # (Q*G,)
    r2_shaped = shaped_layer2_rewards(r2, r1, cfg.shaping_alpha)
    if cfg.l2_group == "response":
        g2 = torch.arange(len(l1)).unsqueeze(1).expand(-1, H)
    else:
        g2 = q_of_l1.unsqueeze(1).expand(-1, H)
    kept = keep.unsqueeze(1).expand(-1, H).reshape(-1)  # (Q*G*H,)
    a2 = torch.zeros(kept.numel())
    if kept.any():
        a2[kept] = group_advantages(r2_shaped.reshape(-1)[kept], g2.reshape(-1)[kept], cfg.advantage_scale)
    for k in kept.nonzero().flatten().tolist():
        i = k // H
        episodes.append(
            Episode(q2[i], l2[k].token_ids, l2[k].logprobs, float(r2_shaped.view(-1)[k]),
                    bool(c2.view(-1)[k]), layer=2, group=len(problems) + int(g2.reshape(-1)[k]),
                    advantage=float(a2[k]), weight=cfg.l2_weight, text=l2[k].text)
        )
    sc = correction_metrics(c1.repeat_interleave(H).tolist(), c2.reshape(-1).tolist())
    stats.update(
        reward_l2=Mean(r2.mean().item()),
        acc_after_correction=Mean(sc["acc_t2"]),
        delta_i_to_c=Mean(sc["delta_i_to_c"]),
        delta_c_to_i=Mean(sc["delta_c_to_i"]),
        l2_groups_kept=Sum(keep.sum().item()),
        l2_groups_discarded=Sum((~keep).sum().item()),
        tokens_generated=Sum(stats["tokens_generated"] + sum(len(c.token_ids) for c in l2)),
        **_length_stats(l2, 2),
    )
    return Rollout(episodes, stats)
