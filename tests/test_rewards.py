import random
import threading
import time

import pytest

from fastmgrpo.rewards import answers_match, extract_answer, format_ok, last_boxed, score
from fastmgrpo.types import Problem

HUGE = "123456789012345678901234567890"

# (completion text, gold, source, expected correct)
CASES = [
    ("She has 5 + 3 = 8 apples.\n#### 8", "8", "gsm8k", True),
    ("5 + 3 = 9\n#### 9", "8", "gsm8k", False),
    ("#### 1,234", "1234", "gsm8k", True),
    ("The total is $1,000.00.", "1000", "gsm8k", True),
    ("#### $18 dollars.", "18", "gsm8k", True),
    ("#### \\$18", "18", "gsm8k", True),
    ("The answer is 42 apples.", "42", "synthetic", True),
    ("The answer is: +7", "7", "synthetic", True),
    ("Answer: 25%", "25", "gsm8k", True),
    ("Answer: 3/4", "0.75", "gsm8k", True),
    ("#### 0.75", "3/4", "gsm8k", True),
    ("#### -4", "4", "gsm8k", False),
    ("It takes 3-4 hours, so 4", "4", "gsm8k", True),
    (f"#### {HUGE}", HUGE, "gsm8k", True),
    (f"#### {HUGE[:-1]}1", HUGE, "gsm8k", False),  # off by one: float would call it equal
    (f"#### {int(HUGE):,}", HUGE, "gsm8k", True),
    ("I don't know.", "8", "gsm8k", False),
    ("", "8", "gsm8k", False),
    ("#### eight", "8", "gsm8k", False),
    ("so \\boxed{0.5}", "0.5", "gsm8k", True),
    ("so \\boxed{\\frac{1}{2}}", "0.5", "gsm8k", True),
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "math", True),
    ("so \\boxed{0.5}", "\\frac{1}{2}", "math", True),
    ("so \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", "math", False),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", "math", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", "math", False),
    ("\\boxed{2\\sqrt{2}}", "2", "math", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "math", True),
    ("first \\boxed{1}, finally \\boxed{x=3}", "3", "math", True),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", "math", False),  # unclosed brace
    ("\\boxed{{{(}", "1", "math", False),  # malformed LaTeX
    ("no answer here", "\\frac{1}{2}", "math", False),
    ("#### \u22123", "-3", "gsm8k", True),  # U+2212 minus: must not read as 3
    ("#### \u22123", "3", "gsm8k", False),
    ("so the total is \u22123", "-3", "gsm8k", True),
    ("#### -3", "\u22123", "gsm8k", True),
    ("#### 1e3", "1000", "gsm8k", True),
    ("#### 2.5E-1", "1/4", "gsm8k", True),
    ("#### 1e3", "100", "gsm8k", False),
    ("#### 1e999999999", "1", "gsm8k", False),  # refused, not computed
]


@pytest.mark.parametrize("text, gold, source, expected", CASES)
def test_score_table(text, gold, source, expected):
    reward, correct = score(text, Problem("q", gold, source))
    assert correct is expected
    assert reward == float(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c", "\\frac{a}{b^{2}}"),
        ("#### 5 apples\nextra line", "5 apples"),
        ("#### 3\nthen #### 4", "4"),
        ("The answer is 12. Answer: 13.", "13."),
        ("x2 is 10, then 3-4", "4"),
        ("1,234,567 and 8.25", "8.25"),
        ("####   ", None),
        ("no numbers", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_nested_and_unclosed():
    assert last_boxed("\\boxed{a{b{c}}d} \\boxed{e") == "a{b{c}}d"
    assert last_boxed("nothing") is None


def test_random_integers_exact():
    rng = random.Random()
    for _ in range(200):
        gold = rng.randint(-(10**40), 10**40)
        delta = rng.choice([0, 1, -1, rng.randint(2, 10**6)])
        pred = f"{gold + delta:,}" if rng.random() < 0.5 else str(gold + delta)
        assert answers_match(pred, str(gold), "gsm8k") is (delta == 0)


def test_format_reward():
    problem = Problem("q", "8", "gsm8k")
    assert score("so #### 8", problem, format_weight=0.25) == (1.25, True)
    assert score("so #### 9", problem, format_weight=0.25) == (0.25, False)
    assert score("The answer is 8", problem, format_weight=0.25) == (1.0, True)  # no ####
    assert score("\\boxed{8}", problem, format_weight=0.25) == (1.0, True)  # #### was asked for
    assert format_ok("\\boxed{8}", "math") and not format_ok("\\boxed{}", "math")
    assert not format_ok("#### 8", "math") and not format_ok("#### eight", "gsm8k")


def test_math_verify_in_worker_thread():
    # math_verify's signal-based timeout only works in the main thread.
    results = []
    cases = [("\\frac{1}{2}", "0.5", True), ("\\sqrt{3}", "\\sqrt{2}", False)]
    worker = threading.Thread(
        target=lambda: results.extend(answers_match(p, g, "math") for p, g, _ in cases)
    )
    worker.start()
    worker.join()
    assert results == [expected for _, _, expected in cases]


PATHOLOGICAL = ["2^{2^{2^{2^{2^{2}}}}}", "9^9^9^9", "10^{10^{10}}", "9^{999999999}", "9**9**9",
                "{" * 5000 + "1" + "}" * 5000, "\\boxed{" * 3000 + "1" + "}" * 3000,
                "((9!)!)!", "123456!", "1" * 20000]


@pytest.mark.parametrize("in_thread", [False, True])
def test_pathological_answers_are_refused_quickly(in_thread):
    # sympy would evaluate these exactly while holding the GIL: a thread could not stop it.
    def check():
        return [score(f"#### {a}", Problem("q", "\\sqrt{2}", "math"))[1] for a in PATHOLOGICAL]

    start, results = time.perf_counter(), []
    if in_thread:
        worker = threading.Thread(target=lambda: results.extend(check()), daemon=True)
        worker.start()
        worker.join(timeout=10)
    else:
        results = check()
    assert results == [False] * len(PATHOLOGICAL)
    assert time.perf_counter() - start < 5
    assert answers_match("x^2 + y^2", "x^2 + y^2", "math")  # ordinary exponents still go through


# --- issue 10.1: a layer-2 attempt is judged on o_i + correction as one answer ---------------

# (layer-1 answer o_i, correction, gold, source, expected verdict of the whole attempt)
WHOLE_ANSWER_CASES = [
    ("6 * 3 = 18\n#### 18", "Yes, that is correct.", "18", "gsm8k", True),  # confirmation, no number
    ("6 * 3 = 18\n#### 18", "18 - 2 = 16, so the earlier answer stands.", "18", "gsm8k", True),
    ("6 * 3 = 18\n#### 18", "Checking: 6 * 3 = 18.\n#### 18", "18", "gsm8k", True),  # restates
    ("6 * 3 = 18\n#### 18", "Oops, 6 * 3 - 2 = 16.\n#### 16", "18", "gsm8k", False),  # changes
    ("#### 16", "No: 6 * 3 = 18.\n#### 18", "18", "gsm8k", True),  # fixes
    ("#### 18", "#### 16\nNo, back to #### 18", "18", "gsm8k", True),  # changes, then changes back
    ("#### 16", "#### 18\nHmm, then #### 16", "18", "gsm8k", False),
    ("#### 16", "Looks right to me.", "18", "gsm8k", False),  # confirming a wrong answer
    ("so 18", "Fine.", "18", "gsm8k", True),  # o_i's bare-number answer is kept
    ("so 16", "18 is what I get.", "18", "gsm8k", False),  # a bare number in a correction is working
    ("\\boxed{\\frac{1}{2}}", "Yes, that is correct.", "\\frac{1}{2}", "math", True),
    ("\\boxed{\\frac{1}{2}}", "Let me redo it: \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", "math", False),
    ("\\boxed{\\frac{1}{3}}", "Actually \\boxed{0.5}", "\\frac{1}{2}", "math", True),
    ("\\boxed{2}", "\\boxed{3}, no wait, \\boxed{2}", "2", "math", True),
    ("\\boxed{5}", "so 1/2 + 1/3 = 5/6 and it stays.", "5", "math", True),
    ("So \\boxed{17}. Then again:\n#### 18", "Confirmed.", "18", "gsm8k", True),  # #### after \boxed
    ("#### 17", "so \\boxed{18}", "18", "gsm8k", True),
]


@pytest.mark.parametrize("first, correction, gold, source, expected", WHOLE_ANSWER_CASES)
def test_layer2_verdict_reads_the_whole_answer(first, correction, gold, source, expected):
    problem = Problem("q", gold, source)
    assert score(correction, problem, earlier=[first])[1] is expected
    # The same attempt written as one text ends in the same final answer, save for bare numbers
    # in the correction, which only a one-part text falls back to.
    if not any(c.isdigit() for c in correction) or "####" in correction or "boxed" in correction:
        assert score(first + "\n\nWait.\n" + correction, problem)[1] is expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{17} then #### 18", "18"),  # GSM8K style: a later #### decides over \boxed
    ("#### 18 then \\boxed{17}", "17"),
    ("The answer is 12, i.e. \\boxed{13}", "13"),  # boxed/#### outrank "answer is"
    ("\\boxed{13}. The answer is 12", "13"),
    ("#### 5\nThe answer is 6", "5"),
])
def test_strong_markers_by_position(text, expected):
    assert extract_answer(text) == expected
