import hashlib
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BatchEncoding, PreTrainedTokenizerFast

from fastmgrpo.prompts import (
    GUIDING_PHRASES,
    eval_phrase,
    layer1_prompt,
    layer2_prompt,
    sample_phrase,
    select_shots,
)
from fastmgrpo.types import Problem

SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
# Gemma-style template: the assistant role renders as "model", content is trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CORPUS = [
    "Tom has 12 apples. He buys 5 more and gives away 3. How many apples does Tom have?",
    "Question: Solve the problem step by step. Answer: Let's think step by step. #### 42",
    "Review your previous answer. Wait, let me double-check that. \\boxed{x}",
] + list(GUIDING_PHRASES)


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tokenizer(backend, *, chat: bool, bos: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>" if bos else None, eos_token="<eos>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(params=["chat", "plain"])
def tokenizer(request, backend):
    return make_tokenizer(backend, chat=request.param == "chat")


def random_problem(source: str = "gsm8k") -> Problem:
    a, b = random.randint(1, 999), random.randint(1, 999)
    return Problem(f"Tom has {a} apples and buys {b} more. How many?", str(a + b), source)


def random_completion(tokenizer, stop: list[int]) -> list[int]:
    specials = {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    ordinary = [i for i in range(len(tokenizer)) if i not in specials]
    return [random.choice(ordinary) for _ in range(random.randint(1, 30))] + stop


def stop_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}


def test_phrases_verbatim_from_design():
    # sha256 of the seven phrases quoted in DESIGN.md (from the paper), newline-joined: pins
    # every character without reading a file outside the repository
    digest = hashlib.sha256("\n".join(GUIDING_PHRASES).encode()).hexdigest()
    assert len(GUIDING_PHRASES) == 7
    assert digest == "29a20ab716d011f5213056524724e4db8331fa3e17ba6847c8cb41957369e5e5"


def test_eval_phrase_is_the_pools_second_or_its_only_one():
    assert eval_phrase() == "Wait, let me double-check that."
    assert eval_phrase(["a", "b", "c"]) == "b" and eval_phrase(["only"]) == "only"


def test_sample_phrase_is_seeded_and_covers_pool():
    seed = random.randrange(10**6)
    first = [sample_phrase(random.Random(seed)) for _ in range(3)]
    assert len(set(first)) == 1 and first[0] in GUIDING_PHRASES
    rng = random.Random(seed)
    assert {sample_phrase(rng) for _ in range(500)} == set(GUIDING_PHRASES)
    assert sample_phrase(rng, ["only"]) == "only"


def test_layer1_chat(backend):
    tok = make_tokenizer(backend, chat=True)
    problem = random_problem()
    ids = layer1_prompt(tok, problem)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = tok.decode(ids)
    assert problem.question in text and "####" in text and "\\boxed" not in text
    assert text.endswith("<start_of_turn>model\n")
    assert "\\boxed" in tok.decode(layer1_prompt(tok, random_problem("math")))


def test_layer1_plain_bos_handling(backend):
    problem = random_problem()
    with_bos = layer1_prompt(make_tokenizer(backend, chat=False), problem)
    without = layer1_prompt(make_tokenizer(backend, chat=False, bos=False), problem)
    bos = make_tokenizer(backend, chat=False).bos_token_id
    assert with_bos == [bos] + without and bos not in without
    text = make_tokenizer(backend, chat=False).decode(without)
    assert text.startswith(f"Question: {problem.question}") and "####" in text
    assert text.endswith("Answer: Let's think step by step.")


@pytest.mark.parametrize("fmt", ["continue", "turn"])
def test_layer2_keeps_layer1_ids_verbatim(tokenizer, fmt):
    problem = random_problem(random.choice(["gsm8k", "math"]))
    stops = stop_ids(tokenizer)
    prompt = layer1_prompt(tokenizer, problem)
    body = random_completion(tokenizer, [])
    completion = body + random.choice([[tokenizer.eos_token_id], sorted(stops), []])
    phrase = sample_phrase(random.Random())
    ids = layer2_prompt(tokenizer, problem, prompt, completion, phrase, fmt, stops)
    n = len(prompt) + len(body)
    assert ids[:n] == prompt + body
    suffix = tokenizer.decode(ids[n:])
    if fmt == "continue":
        assert suffix.startswith("\n\n")
    elif tokenizer.chat_template:  # exactly one end-of-turn: the template's, not the sampled one
        assert suffix.startswith("<end_of_turn>\n<start_of_turn>user\n")
    else:
        assert suffix.startswith("\n\nQuestion: ")
    assert [p for p in GUIDING_PHRASES if p in suffix] == [phrase]


def test_layer2_continue_appends_phrase_only(tokenizer):
    problem = random_problem()
    prompt = layer1_prompt(tokenizer, problem)
    body = random_completion(tokenizer, [])
    phrase = random.choice(GUIDING_PHRASES)
    completion = body + [tokenizer.eos_token_id]
    stops = stop_ids(tokenizer)
    ids = layer2_prompt(tokenizer, problem, prompt, completion, phrase, "continue", stops)
    assert tokenizer.decode(ids[len(prompt) + len(body) :]) == "\n\n" + phrase


def test_layer2_turn_opens_new_turn(backend):
    tok = make_tokenizer(backend, chat=True)
    problem = random_problem()
    prompt = layer1_prompt(tok, problem)
    body = random_completion(tok, [])
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    phrase = random.choice(GUIDING_PHRASES)
    turn = layer2_prompt(tok, problem, prompt, body + [end], phrase, "turn", stop_ids(tok))
    cont = layer2_prompt(tok, problem, prompt, body + [end], phrase, "continue", stop_ids(tok))
    assert turn != cont
    suffix = tok.decode(turn[len(prompt) + len(body) :])
    expected = (
        f"<end_of_turn>\n<start_of_turn>user\nReview your previous answer. {phrase} "
        "Then give the final answer as #### <number>.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert suffix == expected
    assert turn.count(end) == 3  # question turn, closed layer-1 turn, review turn


def test_layer2_turn_plain(backend):
    tok = make_tokenizer(backend, chat=False)
    problem = random_problem("math")
    prompt = layer1_prompt(tok, problem)
    body = random_completion(tok, [tok.eos_token_id])
    phrase = random.choice(GUIDING_PHRASES)
    turn = layer2_prompt(tok, problem, prompt, body, phrase, "turn", {tok.eos_token_id})
    cont = layer2_prompt(tok, problem, prompt, body, phrase, "continue", {tok.eos_token_id})
    assert turn != cont and turn[: len(body) - 1 + len(prompt)] == prompt + body[:-1]
    suffix = tok.decode(turn[len(prompt) + len(body) - 1 :])
    assert suffix.startswith("\n\nQuestion: Review your previous answer.") and "\\boxed" in suffix
    assert suffix.endswith("Answer:")


def test_chat_template_return_types(backend, monkeypatch):
    # transformers may return ids as a list or inside a BatchEncoding; both give the same prompt.
    tok = make_tokenizer(backend, chat=True)
    problem = random_problem()
    expected = layer1_prompt(tok, problem)
    original = tok.apply_chat_template
    for wrap in (list, lambda ids: BatchEncoding({"input_ids": ids})):

        def patched(messages, wrap=wrap, **kwargs):
            return wrap(original(messages, **{**kwargs, "tokenize": True, "return_dict": False}))

        monkeypatch.setattr(tok, "apply_chat_template", patched)
        assert layer1_prompt(tok, problem) == expected


def test_unknown_format(tokenizer):
    problem = random_problem()
    with pytest.raises(ValueError, match="'inline'"):
        layer2_prompt(tokenizer, problem, [1], [2], GUIDING_PHRASES[0], "inline", set())


# --- issue 10.6: few-shot exemplars for base models -----------------------------------------


def _exemplar(i: int) -> Problem:
    return Problem(f"Ann has {i} pens and buys {i} more. How many?", str(2 * i), "gsm8k", uid=i,
                   solution=f"{i} + {i} = {2 * i}\n#### {2 * i}")


def test_plain_prompt_with_shots_is_worked_examples_then_the_question(backend):
    tok = make_tokenizer(backend, chat=False)
    shots, problem = [_exemplar(3), _exemplar(5)], random_problem()
    text = tok.decode(layer1_prompt(tok, problem, shots))
    bare = tok.decode(layer1_prompt(tok, problem))
    # Written out by hand: each exemplar is a plain question/answer block ending in "#### n".
    blocks = "".join(
        f"Question: {s.question}\nSolve the problem step by step, then give the final answer as "
        f"#### <number>.\nAnswer: Let's think step by step. {s.solution}\n\n" for s in shots)
    assert text == "<bos>" + blocks + bare.removeprefix("<bos>")


def test_chat_prompt_with_shots_has_exemplar_turns(backend):
    tok = make_tokenizer(backend, chat=True)
    shot, problem = _exemplar(4), random_problem()
    text = tok.decode(layer1_prompt(tok, problem, [shot]))
    assert text.count("<start_of_turn>user") == 2 and text.count("<start_of_turn>model") == 2
    assert text.index(shot.question) < text.index("#### 8") < text.index(problem.question)


def test_select_shots_never_draws_an_excluded_question():
    pool = [_exemplar(i) for i in range(10)]
    for seed in range(20):
        exclude = {p.question for p in random.Random(seed).sample(pool, 6)}
        shots = select_shots(pool, 4, seed, exclude=exclude)
        assert len({s.uid for s in shots}) == 4 and not {s.question for s in shots} & exclude
    assert select_shots(pool, 3, 1) == select_shots(pool, 3, 1)
    with pytest.raises(ValueError, match="exemplars"):
        select_shots(pool, 5, 0, exclude={p.question for p in pool[:6]})
