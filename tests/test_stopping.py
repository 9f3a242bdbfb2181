"""Stop strings: the sampler ends a completion at the first stop string and cuts it off."""

import random

import pytest
import torch

import fastmgrpo.mgrpo as mgrpo
from fastmgrpo import sampler
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.models import stop_token_ids
from fastmgrpo.prompts import PLAIN_STOP_STRINGS, layer1_prompt, stop_strings
from fastmgrpo.stopping import StopStrings, generate
from fastmgrpo.testing import build_tiny_model
from fastmgrpo.types import Problem


@pytest.mark.parametrize("seed", range(3))
def test_generation_ends_before_the_first_stop_string(seed):
    model, tok = build_tiny_model(arch="gemma3", seed=seed)
    prompts = [tok.encode(s) for s in ["12+3=", "Natalia sold 48 clips. ####", "x", "7*8 is"]]
    kw = dict(max_new_tokens=20, temperature=0.0, pad_id=tok.pad_token_id, batch_size=4,
              stop_ids={tok.eos_token_id})
    free = generate(model, tok, prompts, **kw)
    # Two stop strings taken from the free-running texts: one from prompt 0, one from prompt 2.
    stops = [free[0].text[4:6], free[2].text[7:9]]
    out = generate(model, tok, prompts, stop_strings=stops, **kw)
    hits = 0
    for f, c in zip(free, out):
        found = [i for i in (f.text.find(s) for s in stops) if i >= 0]
        if not found:  # unchanged
            assert (c.token_ids, c.text, c.finished) == (f.token_ids, f.text, f.finished)
            continue
        hits += 1
        cut = min(found)
        assert c.finished and c.token_ids == f.token_ids[: len(c.token_ids)]
        assert c.logprobs == pytest.approx(f.logprobs[: len(c.token_ids)], abs=1e-5)
        if cut > 0:
            assert c.text == f.text[:cut]
        else:  # the stop string opens the answer: one token is kept to train on
            assert len(c.token_ids) == 1
    assert hits >= 2


def test_stop_strings_defaults_and_errors():
    _, tok = build_tiny_model()
    assert stop_strings(tok, None) == ()  # chat template: the end-of-turn token ends answers
    tok.chat_template = None
    assert stop_strings(tok, None) == PLAIN_STOP_STRINGS and "\nQuestion:" in PLAIN_STOP_STRINGS
    assert stop_strings(tok, []) == () == stop_strings(tok, ["none"]) and stop_strings(tok, ["A", ""]) == ("A",)
    with pytest.raises(ValueError):
        StopStrings(tok.decode, [])


def test_collect_applies_the_stop_strings_to_both_layers(monkeypatch):
    model, tok = build_tiny_model(arch="llama", seed=1)
    seen = []

    def spy(model, prompts, **kw):
        seen.append(kw["stopper"].strings)
        return sampler.sample(model, prompts, **kw)

    monkeypatch.setattr("fastmgrpo.stopping.sample", spy)
    problems = [Problem("What is 3?", "3", "synthetic")]
    cfg = MGRPOConfig(group_size=2, l2_samples=2, layers=2, max_completion_length=6)
    out = mgrpo.collect(model, tok, problems, [layer1_prompt(tok, problems[0])], cfg, rng=random.Random(0),
                        generator=torch.Generator().manual_seed(0), stop_ids=stop_token_ids(tok),
                        pad_id=tok.pad_token_id, stop_strings=("\nQuestion:",))
    assert seen == [("\nQuestion:",)] * 2 and out.episodes
