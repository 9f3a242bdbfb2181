"""Prompt token ids for both MGRPO layers.

Prompts are built on token ids, never by re-tokenising generated text, so a layer-2 prompt
holds exactly the layer-1 prompt and sampled completion tokens. A tokenizer with a chat
template gets chat prompts; one without gets a plain "Question: ... Answer:" format, preceded
by its BOS token when it has one (added once, by us, not by the tokenizer's post-processor).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

from fastmgrpo.data import DatasetError
from fastmgrpo.types import Problem

# The guiding phrases of the MGRPO paper (arXiv 2506.04746), verbatim.
GUIDING_PHRASES = (
    "Where might I have gone wrong this time? Let me double-check carefully.",
    "Wait, let me double-check that.",
    "Wait a minute, let me make sure I didn't make a mistake.",
    "Hmm, let me think if there's another way to approach this problem.",
    "Wait, maybe I can think about it like this:",
    "Another thought: maybe I can",
    "But wait, let me just make sure I didn't miss anything in the original problem.",
)
RANDOM_PHRASE = "random"  # a phrase spec: one phrase per attempt, drawn from the pool

INSTRUCTION = "Solve the problem step by step, then give the final answer as {final}."
REVIEW_INSTRUCTION = "Review your previous answer. {phrase} Then give the final answer as {final}."
# The requested final-answer form, per problem source (anything else: a \boxed{} answer).
FINAL_FORMS = {"gsm8k": "#### <number>", "synthetic": "#### <number>"}
BOXED_FORM = "\\boxed{<answer>}"
_SENTINEL = "@@fastmgrpo-layer1-answer@@"  # stands for the layer-1 answer in a chat template


def _final_form(problem: Problem) -> str:
    return FINAL_FORMS.get(problem.source, BOXED_FORM)


def _question_message(problem: Problem) -> str:
    return f"{problem.question}\n{INSTRUCTION.format(final=_final_form(problem))}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding by default, 4.x a plain list of ids.
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


# A base model continues its answer with the next "Question:" of the plain format it imitates;
# these end the answer there (chat models end their turn with a stop token instead).
PLAIN_STOP_STRINGS = ("\nQuestion:", "\n\n\n")


def stop_strings(tokenizer, stop: Sequence[str] | None) -> tuple[str, ...]:
    """The stop strings in force: `stop` if given (empty or ["none"] = none), else
    PLAIN_STOP_STRINGS for a tokenizer without a chat template and none for a chat model."""
    if stop is not None:
        return () if list(stop) == ["none"] else tuple(s for s in stop if s)
    return () if tokenizer.chat_template else PLAIN_STOP_STRINGS


def _solution(problem: Problem) -> str:
    """An exemplar's worked answer, ending in the requested final-answer form."""
    final = "#### " if problem.source in FINAL_FORMS else "\\boxed{"
    answer = problem.answer + ("" if final == "#### " else "}")
    body = problem.solution
    if problem.source in FINAL_FORMS:
        body = body.rsplit("####", 1)[0].strip()
    return f"{body}\n{final}{answer}".strip()


def select_shots(pool: Sequence[Problem], k: int, seed: int, exclude: Collection[str] = ()) -> list[Problem]:
    """`k` few-shot exemplars drawn (per `seed`) from `pool`, a training set, skipping questions in
    `exclude` (the problems they will prefix), so no exemplar gives away an answer it is scored on."""
    candidates = [p for p in pool if p.question not in set(exclude)]
    if k > len(candidates):
        raise ValueError(f"{k} few-shot exemplars asked for, only {len(candidates)} problems to draw from")
    return random.Random(seed).sample(candidates, k)


def layer1_prompt(tokenizer, problem: Problem, shots: Sequence[Problem] = ()) -> list[int]:
    """Token ids of the prompt for a first attempt at `problem` (ends where the answer starts),
    after the worked `shots` (few-shot exemplars) as earlier question/answer pairs."""
    user = _question_message(problem)
    if tokenizer.chat_template:
        turns = [m for s in shots for m in ({"role": "user", "content": _question_message(s)},
                                             {"role": "assistant", "content": _solution(s)})]
        return _chat_ids(tokenizer, [*turns, {"role": "user", "content": user}])
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    lead = "Answer: Let's think step by step."
    examples = "".join(f"Question: {_question_message(s)}\n{lead} {_solution(s)}\n\n" for s in shots)
    return bos + _encode(tokenizer, f"{examples}Question: {user}\n{lead}")


def _strip_stop(ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] in stop_ids:
        end -= 1
    return list(ids[:end])


def _turn_suffix(tokenizer, problem: Problem, phrase: str) -> list[int]:
    """Ids that close the layer-1 assistant turn, ask for a review and open a new answer."""
    review = REVIEW_INSTRUCTION.format(phrase=phrase, final=_final_form(problem))
    if not tokenizer.chat_template:
        return _encode(tokenizer, f"\n\nQuestion: {review}\nAnswer:")
    messages = [
        {"role": "user", "content": _question_message(problem)},
        {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": review},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the assistant message verbatim")
    return _encode(tokenizer, text.split(_SENTINEL)[1])


def layer2_prompt(
    tokenizer,
    problem: Problem,
    l1_prompt_ids: Sequence[int],
    l1_completion_ids: Sequence[int],
    phrase: str,
    fmt: str = "continue",
    stop_ids: Collection[int] = frozenset(),
) -> list[int]:
    """Token ids of the correction prompt q' = layer-1 prompt + layer-1 answer + guiding phrase.

    The layer-1 ids are kept verbatim, minus trailing `stop_ids` (EOS / end-of-turn).
    fmt "continue": "\\n\\n" + phrase is appended inside the same assistant turn (the paper).
    fmt "turn": the assistant turn is closed and a new user turn asks for a review with the
    phrase, then a new assistant turn opens (plain-text equivalent without a chat template).
    """
    prefix = list(l1_prompt_ids) + _strip_stop(l1_completion_ids, stop_ids)
    if fmt == "continue":
        return prefix + _encode(tokenizer, "\n\n" + phrase)
    if fmt == "turn":
        return prefix + _turn_suffix(tokenizer, problem, phrase)
    raise ValueError(f"unknown layer-2 prompt format {fmt!r}: expected 'continue' or 'turn'")


def eval_phrase(pool: Sequence[str] = GUIDING_PHRASES) -> str:
    """The guiding phrase of greedy evaluation: the pool's second ("Wait, let me double-check
    that." in the paper's pool), or its only one."""
    return pool[1 % len(pool)]


def sample_phrase(rng: random.Random, pool: Sequence[str] = GUIDING_PHRASES) -> str:
    """One guiding phrase drawn uniformly from `pool`."""
    return rng.choice(pool)


def training_prompts(tokenizer, problems: Sequence[Problem], shots: Sequence[Problem], max_length: int,
                     overflow: str, held_out: Collection[str] = ()) -> tuple[list[Problem], list[list[int]], dict]:
    """Layer-1 prompt ids of the training problems, exemplars left out (a question must not be
    trained on with its answer shown) and so are questions in `held_out` (the eval set). A prompt over `max_length` tokens is dropped (`overflow`
    'skip') or keeps its last max_length tokens ('truncate').

    Returns (kept problems, their prompt ids, {problems, prompts_skipped, prompts_truncated,
    held_out_dropped}); raises DatasetError when no problem is left.
    """
    shown = {s.question for s in shots}
    held_out = set(held_out) - shown
    excluded = shown | held_out
    kept, prompts, truncated, skipped = [], [], 0, 0
    for p in (p for p in problems if p.question not in excluded):
        ids = layer1_prompt(tokenizer, p, shots)
        if len(ids) > max_length:
            if overflow == "skip":
                skipped += 1
                continue
            ids, truncated = ids[-max_length:], truncated + 1
        kept.append(p)
        prompts.append(ids)
    if not kept:
        raise DatasetError(f"no usable problems: {len(problems)} loaded, {len(shown)} used as exemplars, "
                           f"{skipped} prompts longer than max_prompt_length={max_length}")
    dropped = sum(p.question in held_out for p in problems)
    return kept, prompts, {"problems": len(kept), "prompts_skipped": skipped, "prompts_truncated": truncated,
                           "held_out_dropped": dropped}
