"""mgrpo.collect with a scripted policy: layer-2 prompts, discard rule, advantages, stats."""

import random

import pytest
import torch

import fastmgrpo.mgrpo as mgrpo
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.models import stop_token_ids
from fastmgrpo.prompts import GUIDING_PHRASES, layer1_prompt
from fastmgrpo.testing import build_tiny_tokenizer
from fastmgrpo.types import Completion, Problem


class ScriptedPolicy:
    """Stands in for sampler.sample: answers each prompt with a chosen number."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def __call__(self, model, prompts, **kwargs):
        self.calls.append(prompts)
        out = []
        for _ in prompts:
            ids = self.tokenizer.encode(f"so #### {self.answers.pop(0)}", add_special_tokens=False)
            out.append(Completion(ids + [self.tokenizer.eos_token_id], [-0.5] * (len(ids) + 1), True))
        return out


@pytest.mark.parametrize("l2_group", ["response", "question"])
def test_collect_layer2_discard_and_advantages(monkeypatch, l2_group):
    rng = random.Random()
    tok = build_tiny_tokenizer()
    Q, G, H = 3, 4, 2
    golds = [rng.randint(10, 99) for _ in range(Q)]
    problems = [Problem(f"What is {g}?", str(g), "synthetic", uid=i) for i, g in enumerate(golds)]
    prompts = [layer1_prompt(tok, p) for p in problems]
    # Random right/wrong pattern for every layer-1 answer and every correction.
    c1 = [[rng.random() < 0.5 for _ in range(G)] for _ in range(Q)]
    c2 = [[[rng.random() < 0.4 for _ in range(H)] for _ in range(G)] for _ in range(Q)]
    ans1 = [golds[q] if c1[q][i] else golds[q] + 1 for q in range(Q) for i in range(G)]
    ans2 = [golds[q] if c2[q][i][j] else golds[q] + 2 for q in range(Q) for i in range(G) for j in range(H)]
    policy = ScriptedPolicy(tok, ans1 + ans2)
    monkeypatch.setattr("fastmgrpo.stopping.sample", policy)
    cfg = MGRPOConfig(group_size=G, l2_samples=H, l2_group=l2_group, layers=2)
    out = mgrpo.collect(None, tok, problems, prompts, cfg, rng=random.Random(0), generator=None,
                        stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)

    # Layer-2 prompts: layer-1 prompt + layer-1 completion (stop token stripped) + a pool phrase.
    l1_prompts, l2_prompts = policy.calls
    assert len(l2_prompts) == Q * G * H
    for k in range(Q * G):
        q2 = l2_prompts[k * H]
        l1_ids = tok.encode(f"so #### {ans1[k]}", add_special_tokens=False)
        assert q2[: len(prompts[k // G]) + len(l1_ids)] == prompts[k // G] + l1_ids
        tail = tok.decode(q2[len(prompts[k // G]) + len(l1_ids):])
        assert sum(phrase in tail for phrase in GUIDING_PHRASES) == 1

    # Independent reference, written as plain loops.
    exp_l1 = []
    for q in range(Q):
        r = [float(x) for x in c1[q]]
        exp_l1 += [x - sum(r) / G for x in r]
    exp_l2, groups = [], {}
    for q in range(Q):
        for i in range(G):
            if not c1[q][i] and not any(c2[q][i]):
                continue  # discarded group
            key = (q, i) if l2_group == "response" else q
            groups.setdefault(key, []).extend(float(x) for x in c2[q][i])
    for q in range(Q):
        for i in range(G):
            if not c1[q][i] and not any(c2[q][i]):
                continue
            key = (q, i) if l2_group == "response" else q
            mean = sum(groups[key]) / len(groups[key])
            exp_l2 += [float(x) - mean for x in c2[q][i]]

    l1 = [e for e in out.episodes if e.layer == 1]
    l2 = [e for e in out.episodes if e.layer == 2]
    assert [e.advantage for e in l1] == pytest.approx(exp_l1, abs=1e-6)
    assert [e.advantage for e in l2] == pytest.approx(exp_l2, abs=1e-6)
    kept = sum(1 for q in range(Q) for i in range(G) if c1[q][i] or any(c2[q][i]))
    assert out.stats["l2_groups_kept"] == kept
    assert out.stats["l2_groups_discarded"] == Q * G - kept
    pairs = [(c1[q][i], c2[q][i][j]) for q in range(Q) for i in range(G) for j in range(H)]
    assert out.stats["acc_l1"] == pytest.approx(sum(map(sum, c1)) / (Q * G))
    assert out.stats["acc_after_correction"] == pytest.approx(sum(b for _, b in pairs) / len(pairs))
    assert out.stats["delta_i_to_c"] == pytest.approx(sum((not a) and b for a, b in pairs) / len(pairs))
    assert out.stats["delta_c_to_i"] == pytest.approx(sum(a and not b for a, b in pairs) / len(pairs))
    assert all(torch.isfinite(torch.tensor([e.advantage for e in out.episodes])))


def test_collect_plain_grpo_has_no_layer2(monkeypatch):
    tok = build_tiny_tokenizer()
    gold = random.randint(1, 9)
    problems = [Problem("q?", str(gold), "synthetic")]
    policy = ScriptedPolicy(tok, [gold] * 4)  # all equal rewards -> zero advantage, no NaN
    monkeypatch.setattr("fastmgrpo.stopping.sample", policy)
    cfg = MGRPOConfig(group_size=4, layers=1)
    out = mgrpo.collect(None, tok, problems, [layer1_prompt(tok, problems[0])], cfg,
                        rng=random.Random(0), generator=None, stop_ids=stop_token_ids(tok), pad_id=0)
    assert len(policy.calls) == 1 and len(out.episodes) == 4
    assert all(e.layer == 1 and e.advantage == 0.0 and e.correct for e in out.episodes)


class TextPolicy:
    """Stands in for sampler.sample: answers prompt k with texts[k]; `finished[k]` False marks a
    completion cut at the token limit (no EOS)."""

    def __init__(self, tokenizer, texts, finished):
        self.tokenizer, self.texts, self.finished = tokenizer, list(texts), list(finished)

    def __call__(self, model, prompts, **kwargs):
        out = []
        for _ in prompts:
            ids = self.tokenizer.encode(self.texts.pop(0), add_special_tokens=False)
            done = self.finished.pop(0)
            ids += [self.tokenizer.eos_token_id] if done else []
            out.append(Completion(ids, [-0.5] * len(ids), done))
        return out


@pytest.mark.parametrize("seed", range(3))
def test_collect_layer2_rewards_judge_o_i_and_correction_together(monkeypatch, seed):
    rng = random.Random(seed)
    tok = build_tiny_tokenizer()
    Q, G, H = 2, 3, 2
    golds = [rng.randint(10, 99) for _ in range(Q)]
    problems = [Problem(f"What is {g}?", str(g), "gsm8k", uid=i) for i, g in enumerate(golds)]
    prompts = [layer1_prompt(tok, p) for p in problems]
    ans1 = [rng.choice([g, g + 1]) for g in golds for _ in range(G)]
    # Corrections: a confirmation without a number, a bare number in working, or a new answer.
    kinds = [rng.choice(["confirm", "working", "new"]) for _ in range(Q * G * H)]
    new = [rng.choice([golds[k // (G * H)], golds[k // (G * H)] + 2]) for k in range(Q * G * H)]
    texts2 = [{"confirm": "Yes, that is correct.", "working": f"{new[k]} - 1 = {new[k] - 1}, so it stands.",
               "new": f"Fixing it:\n#### {new[k]}"}[kinds[k]] for k in range(Q * G * H)]
    texts = [f"so\n#### {a}" for a in ans1] + texts2
    finished = [rng.random() < 0.5 for _ in texts]
    monkeypatch.setattr("fastmgrpo.stopping.sample", TextPolicy(tok, texts, finished))
    cfg = MGRPOConfig(group_size=G, l2_samples=H, layers=2)
    out = mgrpo.collect(None, tok, problems, prompts, cfg, rng=random.Random(0), generator=None,
                        stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)

    # Reference: the correction's explicit answer if it gives one, else o_i's.
    c1 = [ans1[i] == golds[i // G] for i in range(Q * G)]
    c2 = [(new[k] if kinds[k] == "new" else ans1[k // H]) == golds[k // (G * H)] for k in range(Q * G * H)]
    pairs = [(c1[k // H], c2[k]) for k in range(Q * G * H)]
    assert out.stats["acc_after_correction"] == pytest.approx(sum(c2) / len(c2))
    assert out.stats["delta_c_to_i"] == pytest.approx(sum(a and not b for a, b in pairs) / len(pairs))
    assert out.stats["delta_i_to_c"] == pytest.approx(sum(b and not a for a, b in pairs) / len(pairs))
    kept = [k for k in range(Q * G * H) if c1[k // H] or any(c2[(k // H) * H:(k // H + 1) * H])]
    assert [e.correct for e in out.episodes if e.layer == 2] == [c2[k] for k in kept]
    assert [e.reward for e in out.episodes if e.layer == 2] == [float(c2[k]) for k in kept]

    # Per-layer length metrics, counted from the scripted completions.
    lens = [len(tok.encode(t, add_special_tokens=False)) + f for t, f in zip(texts, finished)]
    n1 = Q * G
    assert out.stats["truncated_l1"] == pytest.approx(sum(not f for f in finished[:n1]) / n1)
    assert out.stats["truncated_l2"] == pytest.approx(sum(not f for f in finished[n1:]) / (len(texts) - n1))
    assert out.stats["completion_len_l1"] == pytest.approx(sum(lens[:n1]) / n1)
    assert out.stats["completion_len_l2"] == pytest.approx(sum(lens[n1:]) / (len(texts) - n1))


def test_collect_layer1_keeps_the_bare_number_fallback(monkeypatch):
    tok = build_tiny_tokenizer()
    problems = [Problem("q?", "18", "gsm8k")]
    texts = ["6 * 3 = 18", "so 17", "#### 18", "The answer is 18."]
    monkeypatch.setattr("fastmgrpo.stopping.sample", TextPolicy(tok, texts, [True] * 4))
    out = mgrpo.collect(None, tok, problems, [layer1_prompt(tok, problems[0])], MGRPOConfig(group_size=4, layers=1),
                        rng=random.Random(0), generator=None, stop_ids=stop_token_ids(tok), pad_id=0)
    assert [e.correct for e in out.episodes] == [True, False, True, True]
