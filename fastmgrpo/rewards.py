"""Rule-based outcome rewards: pull the final answer out of a completion and check it.

Numbers (GSM8K, synthetic, plain numeric MATH answers) are compared exactly as fractions, so
huge integers and decimals never go through float. Anything with LaTeX left in it goes through
`math_verify`. Model text is never evaluated as code.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from fractions import Fraction

from math_verify import parse, verify

from fastmgrpo.types import Problem

NUMERIC_SOURCES = ("gsm8k", "synthetic")

# A number as written in answers: optional sign, digits with optional thousands commas,
# optional decimals, optional "/denominator". The look-behind skips digits glued to a word
# ("x2") and the hyphen of a range ("3-4" gives 4, not -4).
_NUMBER = r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_HASH_RE = re.compile("####")
_ANSWER_IS_RE = re.compile(r"answer is|answer:", re.IGNORECASE)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# LaTeX spacing and escapes that carry no value: \$ \% \, \! \; \: and "\ ".
_LATEX_NOISE_RE = re.compile(r"\\[$%,!;: ]")
_HASH_ANSWER_RE = re.compile(r"####\s*\\?\$?\s*[-+]?\.?\d")  # "#### 12", "#### $12", "#### \$12"


def _last_boxed_span(text: str) -> tuple[int, str] | None:
    """(start, content) of the last closed `\\boxed{...}` in `text` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return start, text[start + len("\\boxed{") : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try the previous one
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces kept), or None."""
    span = _last_boxed_span(text)
    return span[1] if span else None


def _line_after(text: str, end: int) -> str:
    return text[end:].split("\n", 1)[0].strip(" \t:")


def extract_answer(text: str, bare_numbers: bool = True) -> str | None:
    """The final answer stated in a completion, as text, or None if it states none.

    A final answer is an explicit marker: a non-empty `\\boxed{}` or the rest of the line after
    `####` (the last of these in the text wins, so a `#### n` after a `\\boxed{}` decides, and
    vice versa); failing both, the rest of the line after the last "answer is" / "Answer:".
    With no marker at all, and `bare_numbers`, the last number in the text stands in (base
    models often end with one).
    """
    def last(pattern: re.Pattern) -> list[tuple[int, str]]:
        marks = [(m.start(), _line_after(text, m.end())) for m in pattern.finditer(text)]
        return [m for m in marks if m[1]][-1:]

    boxed = _last_boxed_span(text)
    found = ([boxed] if boxed and boxed[1] else []) + last(_HASH_RE) or last(_ANSWER_IS_RE)
    if found:
        return max(found)[1]
    numbers = _NUMBER_RE.findall(text) if bare_numbers else []
    return numbers[-1] if numbers else None


def final_answer(parts: Sequence[str]) -> str | None:
    """The final answer of an attempt written in parts: a layer-1 answer o_i, then its correction.

    The last explicit marker (see `extract_answer`) in any part decides; a bare number in a
    later part is working, not an answer ("18 - 2 = 16, so it stands" keeps o_i's 18), so a
    correction that states no final answer keeps o_i's, bare-number fallback included.
    """
    for text in reversed(parts[1:]):
        answer = extract_answer(text, bare_numbers=False)
        if answer is not None:
            return answer
    return extract_answer(parts[0]) if parts else None


def _clean(answer: str) -> str:
    """Drop LaTeX escapes/wrappers, dollar signs, percent signs and a trailing period."""
    answer = _TEXT_CMD_RE.sub(r"\1", answer)
    answer = _LATEX_NOISE_RE.sub("", answer)
    return answer.replace("$", "").replace("%", "").strip().rstrip(".").strip()


def _to_fraction(number: str) -> Fraction | None:
    try:
        return Fraction(number.replace(",", "").lstrip("+"))
    except (ValueError, ZeroDivisionError):
        return None


def _exact_number(answer: str) -> Fraction | None:
    """The value of an answer that is nothing but a number (after `_clean`), else None."""
    cleaned = _clean(answer).replace(" ", "")
    return _to_fraction(cleaned) if _FULL_NUMBER_RE.fullmatch(cleaned) else None


def _leading_number(answer: str) -> Fraction | None:
    """The first number in a LaTeX-free answer, ignoring words or units around it."""
    cleaned = _clean(answer)
    if "\\" in cleaned:
        return None
    match = _NUMBER_RE.search(cleaned)
    return _to_fraction(match.group()) if match else None


def _math_verify(pred: str, gold: str) -> bool:
    # math_verify times out through signal.alarm, which only the main thread may use; in any
    # other thread run it without its timeout: callers there must bound the time themselves.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        return bool(gold_parsed and pred_parsed) and verify(
            gold_parsed, pred_parsed, timeout_seconds=timeout
        )
    except Exception:  # a malformed answer is a wrong answer, whatever math_verify raises
        return False


def answers_match(pred: str | None, gold: str, source: str) -> bool:
    """Whether the extracted answer `pred` equals the gold answer.

    GSM8K/synthetic: the first number in `pred` (commas, `$`, `%`, a leading `+`, a trailing
    period and words/units after it ignored) equals the gold number exactly; `3/4` == `0.75`.
    Otherwise, or when LaTeX is involved: two plain numbers compare exactly, anything else goes
    through `math_verify`. Errors and timeouts count as no match.
    """
    if pred is None or not pred.strip():
        return False
    gold_value = _exact_number(gold)
    if gold_value is not None:
        pred_value = _leading_number(pred) if source in NUMERIC_SOURCES else _exact_number(pred)
        if pred_value is not None:
            return pred_value == gold_value
    return _math_verify(pred, gold)


def format_ok(text: str, source: str) -> bool:
    """Whether `text` gives its answer in the requested form: `#### n` (GSM8K, synthetic) or
    a non-empty `\\boxed{}` (other sources)."""
    if source in NUMERIC_SOURCES:
        return _HASH_ANSWER_RE.search(text) is not None
    return bool(last_boxed(text))


def score(text: str, problem: Problem, format_weight: float = 0.0, earlier: Sequence[str] = ()) -> tuple[float, bool]:
    """(reward, correct): reward = 1.0 if correct else 0.0, plus `format_weight` if `format_ok`.

    earlier: the parts of the same attempt before `text` (a correction's layer-1 answer); the
    verdict is on `final_answer` of them all, and the format bonus on the whole attempt.
    """
    parts = [*earlier, text]
    correct = answers_match(final_answer(parts), problem.answer, problem.source)
    return float(correct) + format_weight * format_ok("\n".join(parts), problem.source), correct
