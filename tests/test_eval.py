"""Self-correction metrics, pass@k, `evaluate` on a tiny model, and the `fastmgrpo.eval` CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
import sys

import pytest
import torch

from fastmgrpo.data import load_problems
from fastmgrpo.eval import evaluate
from fastmgrpo.eval import main as eval_main
from fastmgrpo.metrics import correction_metrics, pass_at_k
from fastmgrpo.models import stop_token_ids
from fastmgrpo.prompts import GUIDING_PHRASES, layer1_prompt, layer2_prompt
from fastmgrpo.sampler import sample
from fastmgrpo.testing import build_tiny_model


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


# --- evaluate and the CLI on a tiny model --------------------------------------------------


def _digit_model():
    """Tiny random model whose head only scores digits and EOS (all other logits are 0), so
    greedy completions are digit strings, sometimes ended early by EOS."""
    model, tok = build_tiny_model(arch="llama", seed=3)
    keep = tok.convert_tokens_to_ids(list("0123456789")) + [tok.eos_token_id]
    weight = model.lm_head.weight  # (V, H)
    with torch.no_grad():
        mask = torch.zeros(weight.shape[0], 1)
        mask[keep] = 1.0
        weight.mul_(mask * 50.0)
    return model, tok


def _value(text: str) -> int | None:
    """The number of a "#### digits" text (see the spy below), None for "#### " alone."""
    return int(text[5:]) if text[5:] else None


def _text(tok, completion) -> str:
    return tok.decode(completion.token_ids, skip_special_tokens=True)


def test_evaluate_records_and_summary_on_a_tiny_model(monkeypatch):
    model, tok = _digit_model()
    calls = []  # (prompts, completions, temperature) of every sampler call
    marker = tok.encode("#### ", add_special_tokens=False)

    def spy(model, prompts, **sampling):
        # Every completion states its digits as a final answer, "#### " alone when it has none.
        out = sample(model, prompts, **sampling)
        for c in out:
            c.token_ids, c.logprobs = marker + c.token_ids, [0.0] * len(marker) + c.logprobs
        calls.append((prompts, out, sampling["temperature"]))
        return out

    monkeypatch.setattr("fastmgrpo.stopping.sample", spy)
    problems = load_problems("synthetic:4", seed=1)
    kwargs = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, batch_size=3, l2_format="turn",
                  phrase=GUIDING_PHRASES[2], pass_k=2, seed=0, progress=False)
    evaluate(model, tok, problems, **kwargs)
    # "#### digits" only, so a completion's answer is its digits (None when it has none), and
    # a correction without digits keeps its first attempt's answer.
    t1, t2, pk = ([_value(_text(tok, c)) for c in call[1]] for call in calls)
    t2 = [a if b is None else b for a, b in zip(t1, t2)]
    # Gold answers chosen from what the model says (sampling does not see the gold, and the
    # same seed replays it): 0 right at t1, 1 right at t2, 2 never right (12 digits cannot
    # fit in 8 tokens), 3 right in its last pass@k sample.
    impossible = 10**11
    golds = [impossible if v is None else v for v in (t1[0], t2[1], impossible, pk[7])]
    problems = [dataclasses.replace(p, answer=str(g)) for p, g in zip(problems, golds)]
    calls.clear()
    summary, records = evaluate(model, tok, problems, **kwargs)

    # The same completions come back, and verdicts agree with an independent comparison.
    again = [[_value(_text(tok, c)) for c in call[1]] for call in calls]
    assert [again[0], [a if b is None else b for a, b in zip(again[0], again[1])], again[2]] == [t1, t2, pk]
    want_t1 = [v == g for v, g in zip(t1, golds)]
    want_t2 = [v == g for v, g in zip(t2, golds)]
    want_k = [sum(v == g for v in pk[2 * i : 2 * i + 2]) for i, g in enumerate(golds)]
    assert want_t1[0] and want_t2[1] and want_k[3] and not (want_t1[2] or want_t2[2])
    assert len(records) == len(problems)
    assert [r["t1_correct"] for r in records] == want_t1
    assert [r["t2_correct"] for r in records] == want_t2
    assert [r["pass_k_correct"] for r in records] == want_k
    for r, p in zip(records, problems):
        assert r["gold"] == p.answer and r["question"] == p.question
    for r, p, a, b in zip(records, problems, t1, t2):
        assert (r["t1_answer"], r["t2_answer"]) == (None if a is None else str(a), None if b is None else str(b))
        for t in ("t1", "t2"):
            assert r[f"{t}_tokens"] == len(r[f"{t}_text"]) + r[f"{t}_finished"]  # EOS is not text

    # Wiring: t1 answers the layer-1 prompt; t2 answers the layer-2 prompt built from t1 with
    # the phrase and format; pass@k resamples each layer-1 prompt k times at 0.7.
    (p1, c1, T1), (p2, c2, T2), (p3, _, T3) = calls
    q1 = [layer1_prompt(tok, p) for p in problems]
    stops = stop_token_ids(tok)
    assert p1 == q1 and p3 == [q for q in q1 for _ in range(2)] and (T1, T2, T3) == (0.0, 0.0, 0.7)
    assert p2 == [layer2_prompt(tok, p, q, c.token_ids, GUIDING_PHRASES[2], fmt="turn", stop_ids=stops)
                  for p, q, c in zip(problems, q1, c1)]
    assert [r["t1_text"] for r in records] == [_text(tok, c) for c in c1]
    assert [r["t2_text"] for r in records] == [_text(tok, c) for c in c2]

    expected = correction_metrics(want_t1, want_t2)
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    for t in ("t1", "t2"):
        assert summary[f"{t}_truncated"] == pytest.approx(sum(not r[f"{t}_finished"] for r in records) / 4)
        assert summary[f"{t}_mean_tokens"] == pytest.approx(sum(r[f"{t}_tokens"] for r in records) / 4)
    assert summary["pass@1"] == pytest.approx(sum(want_k) / 8)
    assert summary["pass@2"] == pytest.approx(sum(c > 0 for c in want_k) / 4)


@pytest.mark.slow
def test_cli_writes_consistent_summary_and_records(tmp_path):
    model, tok = _digit_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out_json, out_records = tmp_path / "out" / "summary.json", tmp_path / "rec.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "fastmgrpo.eval", "--model", str(tmp_path / "model"),
         "--dataset", "synthetic:4", "--max-new-tokens", "8", "--device", "cpu", "--no-progress",
         "--phrase", "0",
         "--json", str(out_json), "--output", str(out_records)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "acc@t1" in proc.stdout and "Δi→c" in proc.stdout
    records = [json.loads(line) for line in out_records.read_text().splitlines()]
    result = json.loads(out_json.read_text())
    metrics = result["metrics"]
    assert len(records) == 4 == metrics["n"]
    assert [r["gold"] for r in records] == [p.answer for p in load_problems("synthetic:4")]
    assert metrics["acc_t1"] == pytest.approx(sum(r["t1_correct"] for r in records) / 4)
    assert metrics["acc_t2"] == pytest.approx(sum(r["t2_correct"] for r in records) / 4)
    assert metrics["t1_mean_tokens"] == pytest.approx(sum(r["t1_tokens"] for r in records) / 4)
    assert 0 < metrics["t1_mean_tokens"] <= 8
    assert result["settings"]["phrase"] == GUIDING_PHRASES[0]
    assert result["settings"]["temperature"] == 0.0 and result["settings"]["l2_format"] == "continue"
    assert result["settings"]["device"] == "cpu" and result["settings"]["precision"] == "fp32"


def test_cli_user_errors_exit_nonzero_with_a_message(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert eval_main(["--model", str(missing), "--dataset", "synthetic:2"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    assert eval_main(["--model", str(missing), "--dataset", str(bad_data)]) == 2
    assert f"{bad_data}:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--phrase", "7"])
    assert "phrase index 7" in capsys.readouterr().err


# --- issue 10: whole-answer verdicts, k samples, random phrases, the recorded protocol -------


class _Scripted:
    """Stands in for sampler.sample: layer-1 prompts get "#### <a>", layer-2 prompts the next
    scripted correction; records every prompt."""

    def __init__(self, tok, first, corrections):
        self.tok, self.first, self.corrections, self.prompts = tok, list(first), list(corrections), []

    def __call__(self, model, prompts, **kwargs):
        from fastmgrpo.types import Completion

        texts = self.first if not self.prompts else self.corrections
        self.prompts.append(prompts)
        out = []
        for _ in prompts:
            ids = self.tok.encode(texts.pop(0), add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Completion(ids, [0.0] * len(ids), True))
        return out


@pytest.mark.parametrize("seed", range(3))
def test_eval_metrics_judge_t2_on_the_whole_answer(monkeypatch, seed):
    rng = random.Random(seed)
    model, tok = _digit_model()
    problems = load_problems("synthetic:6", seed=seed)
    golds = [int(p.answer) for p in problems]
    first = [rng.choice([g, g + 1]) for g in golds]
    new = [rng.choice([None, g, g + 3]) for g in golds]  # None: a confirmation without a number
    corrections = ["Yes, that is correct." if n is None else f"Redo: {n}\n#### {n}" for n in new]
    monkeypatch.setattr("fastmgrpo.stopping.sample", _Scripted(tok, [f"#### {a}" for a in first], corrections))
    summary, records = evaluate(model, tok, problems, max_new_tokens=8, batch_size=2, progress=False)
    t1 = [a == g for a, g in zip(first, golds)]
    t2 = [(a if n is None else n) == g for a, n, g in zip(first, new, golds)]
    assert [r["t1_correct"] for r in records] == t1 and [r["t2_correct"] for r in records] == t2
    assert [r["t2_answer"] for r in records] == [str(a if n is None else n) for a, n in zip(first, new)]
    assert summary["delta_c_to_i"] == pytest.approx(sum(a and not b for a, b in zip(t1, t2)) / 6)
    assert summary["delta_i_to_c"] == pytest.approx(sum(b and not a for a, b in zip(t1, t2)) / 6)


def test_evaluate_k_samples_and_random_phrases_are_means_over_attempts(monkeypatch):
    model, tok = _digit_model()
    calls = []

    def spy(model, prompts, **sampling):
        out = sample(model, prompts, **sampling)
        calls.append((prompts, out))
        return out

    monkeypatch.setattr("fastmgrpo.stopping.sample", spy)
    problems = load_problems("synthetic:3", seed=2)
    k = 4
    summary, records = evaluate(model, tok, problems, max_new_tokens=6, temperature=1.0, samples=k,
                                phrase="random", seed=7, progress=False)
    (p1, c1), (p2, _) = calls
    assert p1 == [layer1_prompt(tok, p) for p in problems for _ in range(k)]
    assert len(records) == 3 * k and [r["sample"] for r in records] == list(range(k)) * 3
    assert [r["uid"] for r in records] == [p.uid for p in problems for _ in range(k)]
    # Each attempt's phrase comes from the pool, is the one its layer-2 prompt carries, and the
    # draws vary (12 draws from 7 phrases are all equal with probability 7**-11).
    stops = stop_token_ids(tok)
    for r, q, c, q2 in zip(records, p1, c1, p2):
        assert r["phrase"] in GUIDING_PHRASES
        assert q2 == layer2_prompt(tok, None, q, c.token_ids, r["phrase"], fmt="continue", stop_ids=stops)
    assert len({r["phrase"] for r in records}) > 1
    assert summary["n"] == 3 * k and summary["problems"] == 3 and summary["samples"] == k
    assert summary["acc_t1"] == pytest.approx(sum(r["t1_correct"] for r in records) / (3 * k))
    assert summary["acc_t2"] == pytest.approx(sum(r["t2_correct"] for r in records) / (3 * k))
    again, _ = evaluate(model, tok, problems, max_new_tokens=6, temperature=1.0, samples=k,
                        phrase="random", seed=7, progress=False)
    assert {key: again[key] for key in summary if key != "seconds"} == \
        {key: summary[key] for key in summary if key != "seconds"}


def test_cli_records_the_protocol_in_the_summary(tmp_path, capsys):
    # in-process (the `-m` entry point is run by test_cli_writes_consistent_summary_and_records)
    model, tok = _digit_model()
    model.save_pretrained(tmp_path / "model")
    tok.chat_template = None  # a base model: plain prompts, default stop strings, shots
    tok.save_pretrained(tmp_path / "model")
    out_json, out_records = tmp_path / "summary.json", tmp_path / "rec.jsonl"
    status = eval_main(["--model", str(tmp_path / "model"), "--dataset", "synthetic:3", "--max-new-tokens", "4",
                        "--device", "cpu", "--no-progress", "--temperature", "0.7", "--samples", "2",
                        "--phrase", "random", "--seed", "11", "--prompt-shots", "2",
                        "--json", str(out_json), "--output", str(out_records)])
    assert status == 0, capsys.readouterr().err
    settings = json.loads(out_json.read_text())["settings"]
    assert (settings["temperature"], settings["samples"], settings["phrase"], settings["seed"]) == \
        (0.7, 2, "random", 11)
    assert settings["prompt_shots"] == 2 and settings["stop"] == ["\nQuestion:", "\n\n\n"]
    train = {p.uid: p for p in load_problems("gsm8k")}
    heldout = {p.question for p in load_problems("gsm8k:heldout")}
    assert len(settings["shot_uids"]) == 2
    assert all(u in train and train[u].question not in heldout for u in settings["shot_uids"])
    records = [json.loads(line) for line in out_records.read_text().splitlines()]
    assert len(records) == 6 and all("Question:" not in r["t1_text"] for r in records)
    with pytest.raises(SystemExit) as bad:
        eval_main(["--samples", "2"])
    assert bad.value.code == 2 and "--temperature" in capsys.readouterr().err
