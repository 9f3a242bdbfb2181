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

from fastmgrpo.types import Problem

NUMERIC_SOURCES = ("gsm8k", "synthetic")

# A number as written in answers: optional sign, digits with optional thousands commas,
# optional decimals, optional "/denominator". The look-behind skips digits glued to a word
# ("x2") and the hyphen of a range ("3-4" gives 4, not -4).
_NUMBER = r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
# Minus signs other than '-' (U+2212 minus, small and full-width hyphen-minus): read as '-',
# or "−3" would score as 3.
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_MAX_EXPONENT = 1000  # |e| of "1e999999999" beyond this: not a number (Fraction would build 10**e)
# Bounds on what reaches math_verify: sympy evaluates towers like 9^9^9 exactly, holding the GIL
# (no thread or alarm can stop it), and its LaTeX parser recurses once per nested brace.
_MAX_ANSWER_CHARS, _MAX_NESTING, _MAX_EXPONENT_DIGITS = 1000, 20, 4
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
    text = text.translate(_MINUS)

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
    answer = _TEXT_CMD_RE.sub(r"\1", answer.translate(_MINUS))
    answer = _LATEX_NOISE_RE.sub("", answer)
    return answer.replace("$", "").replace("%", "").strip().rstrip(".").strip()


def _to_fraction(number: str) -> Fraction | None:
    number = number.replace(",", "").lstrip("+")
    exponent = number.lower().partition("e")[2]
    if exponent and abs(int(exponent.split("/")[0])) > _MAX_EXPONENT:
        return None
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):  # also ints past sys.get_int_max_str_digits()
        return None


def numeric_answer(text: str) -> str | None:
    """The number a GSM8K gold line states ('$1,234' -> '1234', '−3' -> '-3', '1/2', '1234
    dollars' -> '1234'), or None when it holds no number or more than one."""
    cleaned = _clean(text)
    match = _FULL_NUMBER_RE.match(cleaned)
    if match is None or _to_fraction(match.group()) is None:
        return None
    rest = cleaned[match.end():]
    if rest and not re.fullmatch(r"\s+\D*", rest):  # units may follow; another number may not
        return None
    return match.group().replace(",", "").lstrip("+")


def _operand_end(text: str, i: int) -> int:
    """End of the operand starting at text[i]: a balanced {...} or (...) group, else a word."""
    if i < len(text) and text[i] in "{(":
        close, depth = {"{": "}", "(": ")"}[text[i]], 0
        for j in range(i, len(text)):
            depth += (text[j] == text[i]) - (text[j] == close)
            if depth == 0:
                return j + 1
        return len(text)
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in "._"):
        j += 1
    return j


def too_costly(answer: str) -> bool:
    """Whether checking `answer` symbolically could take unbounded time or memory: very long,
    deeply nested, an exponent tower (a^b^c, a^{b^c}), a huge exponent or factorial.

    A cost bound, not a judgement: such answers count as wrong. Runs in O(len(answer)).
    """
    if len(answer) > _MAX_ANSWER_CHARS:
        return True
    depth = 0
    for c in answer:
        depth += (c in "{([") - (c in "})]")
        if depth > _MAX_NESTING:
            return True
    text = answer.replace("**", "^")
    for i, c in enumerate(text):
        if c == "^":
            start = len(text) - len(text[i + 1:].lstrip())
            end = _operand_end(text, start)
            operand, after = text[start:end], text[end:].lstrip()[:1]
            digits = max((len(d) for d in re.findall(r"\d+", operand)), default=0)
            if "^" in operand or "!" in operand or after == "^" or digits > _MAX_EXPONENT_DIGITS:
                return True
        elif c == "!" and i and text[i - 1] != "\\":
            before = re.search(r"(\d*)\W*$", text[:i]).group(1)
            if text[i - 1] in ")}!" or len(before) > _MAX_EXPONENT_DIGITS:
                return True
    return False


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


def _math_verify_api():
    """(parse, verify) from math_verify, imported on first use: GSM8K-style numeric answers
    never need it, and machines without it (or its antlr/latex2sympy stack) must still train."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("checking LaTeX/boxed answers needs the `math-verify` package "
                          "(pip install 'math-verify[antlr4_13_2]')") from e
    return parse, verify


def _math_verify(pred: str, gold: str) -> bool:
    parse, verify = _math_verify_api()  # outside the try: a missing package is not a wrong answer
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
    if pred is None or not pred.strip() or too_costly(pred) or too_costly(gold):
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
