"""Problem sets: the embedded GSM8K train split, JSONL files (GSM8K or MATH style) and a
generator of small multi-step arithmetic word problems."""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import warnings
from importlib import resources
from pathlib import Path

from fastmgrpo.rewards import last_boxed, numeric_answer
from fastmgrpo.types import Problem

logger = logging.getLogger(__name__)

_EXPECTED_ANSWER = {"gsm8k": "'#### <number>'", "math": "a final '\\boxed{...}'"}


class DatasetError(ValueError):
    """A problem file that cannot be used; the message names the file and, where known, the line."""


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "<<48/2=24>>"


def _parse_row(row: object) -> tuple[str, str | None, str, str] | None:
    """(question, gold answer or None if unparseable, source, solution), or None if neither
    schema fits."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
        tail = row["answer"].rsplit("####", 1)
        gold = numeric_answer(tail[1]) if len(tail) == 2 else None
        solution = _CALCULATOR_RE.sub("", row["answer"]).strip()
        return row["question"], gold, "gsm8k", solution
    if isinstance(row.get("problem"), str) and isinstance(row.get("solution"), str):
        # MATH-500-style rows carry the gold answer in "answer" as well; the \boxed{} wins.
        gold = last_boxed(row["solution"]) or str(row.get("answer") or "").strip()
        return row["problem"], gold or None, "math", row["solution"].strip()
    return None


_SCHEMAS = (("question", "answer", "a string ending in '#### n'"),
            ("problem", "solution", "a string with a final \\boxed{...}"))


def _row_problem(row: object) -> str:
    """What is wrong with a row `_parse_row` cannot use, for the error message."""
    if isinstance(row, list):
        return "a JSON array, not an object: JSON Lines expected (one object per line)"
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object: JSON Lines expected (one object per line)"
    for text, gold, expected in _SCHEMAS:
        if text in row or gold in row:
            for key, want in ((text, "a string"), (gold, expected)):
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else f"{row[key]!r} ({type(row[key]).__name__})"
                    return f"'{key}' is {got}, expected {want}"
    return "row has neither 'question'/'answer' (GSM8K) nor 'problem'/'solution' (MATH) string fields"


def _read_jsonl(path: Path, strict: bool) -> list[Problem]:
    problems: list[Problem] = []
    skipped: list[int] = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    array = line.lstrip().startswith("[")
                    hint = " (a JSON array? JSON Lines expected: one object per line)" if array else ""
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg}){hint}") from e
                parsed = _parse_row(row)
                if parsed is None:
                    raise DatasetError(f"{path}:{lineno}: {_row_problem(row)}")
                question, gold, source, solution = parsed
                if gold is None:
                    if strict:
                        expected = _EXPECTED_ANSWER[source]
                        raise DatasetError(f"{path}:{lineno}: no parseable answer ({expected})")
                    skipped.append(lineno)
                    continue
                problems.append(Problem(question.strip(), gold, source, uid=lineno - 1, solution=solution))
    except (OSError, EOFError, UnicodeDecodeError) as e:  # missing, unreadable, corrupt gzip
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if not problems and not skipped:
        raise DatasetError(f"{path}: empty file (no rows)")
    if not problems:
        raise DatasetError(f"{path}: none of its {len(skipped)} rows has a parseable answer "
                           f"({' or '.join(_EXPECTED_ANSWER.values())})")
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} rows with no parseable final answer "
            f"(first at line {skipped[0]})",
            stacklevel=3,
        )
    return problems


# GSM8K's train and test splits ship. A fixed random slice of the train split is also kept out
# of training, so that `python -m fastmgrpo.eval` scores problems the trainer never saw without
# touching the test split. The seed is fixed on purpose: the held-out set must not move with --seed.
EMBEDDED = ("gsm8k", "gsm8k:heldout", "gsm8k:all", "gsm8k:test")
GSM8K_HELDOUT = 500
_HELDOUT_SEED = 2506_04746


def load_problems(
    spec: str, *, limit: int | None = None, strict: bool = False, seed: int = 0
) -> list[Problem]:
    """Load a problem set.

    spec: "gsm8k" (the embedded GSM8K train split less GSM8K_HELDOUT problems kept for
        evaluation), "gsm8k:heldout" (those problems), "gsm8k:all", "gsm8k:test" (GSM8K's
        1,319 test problems), "synthetic" / "synthetic:N" (N generated
        problems, default 1000, generated from `seed`), or a path to a `.jsonl` / `.jsonl.gz`
        file whose rows are GSM8K style (`question`, `answer` ending in `#### n`) or MATH style
        (`problem`, `solution` with a final `\\boxed{}`), detected per row.
    limit: keep the first `limit` problems (file order).
    strict: raise on rows without a parseable answer instead of skipping them with a warning.

    Raises DatasetError (a ValueError) naming the file and line for unusable input.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2]
        if count and not count.isdigit():
            raise DatasetError(f"bad synthetic spec {spec!r}: expected 'synthetic:N'")
        n = int(count) if count else 1000
        if n == 0:
            raise DatasetError(f"{spec}: no problems (expected 'synthetic:N' with N >= 1)")
        return synthetic_problems(n if limit is None else min(n, limit), seed)
    if spec in EMBEDDED:
        name = "test.jsonl.gz" if spec == "gsm8k:test" else "train.jsonl.gz"
        with resources.as_file(resources.files("fastmgrpo.assets") / name) as path:
            problems = _read_jsonl(path, strict)
        if spec in ("gsm8k", "gsm8k:heldout"):
            train, heldout = split_holdout(problems, GSM8K_HELDOUT, seed=_HELDOUT_SEED)
            problems = train if spec == "gsm8k" else heldout
    else:
        problems = _read_jsonl(Path(spec), strict)
    logger.info("loaded %d problems from %s", len(problems), spec)
    return problems if limit is None else problems[:limit]


# Synthetic problems: (name, pronoun) and item names; every step is one sentence.
_PEOPLE = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"),
           ("Lily", "she"), ("Max", "he"), ("Emma", "she")]  # fmt: skip
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "cards"]
_ADD = ["{p} buys {k} more.", "{p} finds {k} more.", "{p} gets {k} more from a friend."]
_SUB = ["{p} gives away {k}.", "{p} loses {k}.", "{p} sells {k}."]
_MUL = {2: "{p} doubles the number of {items}.", 3: "{p} triples the number of {items}."}


def _synthetic_problem(rng: random.Random, num_ops: int, uid: int) -> Problem:
    name, pronoun = rng.choice(_PEOPLE)
    items = rng.choice(_ITEMS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {items}."]
    for step in range(num_ops):
        who = pronoun.capitalize() if step == 0 else f"Then {pronoun}"
        kinds = ["add", "sub"] + (["mul"] if total <= 15 else [])
        kind = rng.choice(kinds) if total > 1 else "add"
        if kind == "add":
            k = rng.randint(1, 10)
            total += k
            template = rng.choice(_ADD)
        elif kind == "sub":
            k = rng.randint(1, min(10, total - 1))
            total -= k
            template = rng.choice(_SUB)
        else:
            k = rng.choice(list(_MUL))
            total *= k
            template = _MUL[k]
        sentences.append(template.format(p=who, k=k, items=items))
    sentences.append(f"How many {items} does {name} have now?")
    return Problem(" ".join(sentences), str(total), "synthetic", uid=uid)


def synthetic_problems(n: int, seed: int, min_ops: int = 1, max_ops: int = 3) -> list[Problem]:
    """`n` multi-step integer word problems with small positive numbers, deterministic per seed.

    Each applies `min_ops`..`max_ops` steps (add, take away, double/triple) to a starting count;
    the gold answer is the final count as text and `source` is "synthetic".
    """
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    rng = random.Random(seed)
    return [_synthetic_problem(rng, rng.randint(min_ops, max_ops), uid) for uid in range(n)]


def split_holdout(
    problems: list[Problem], n: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """(rest, holdout): `n` problems drawn at random (per `seed`) for evaluation; order kept."""
    if not 0 <= n <= len(problems):
        raise ValueError(f"holdout size {n} not in [0, {len(problems)}]")
    held = set(random.Random(seed).sample(range(len(problems)), n))
    rest = [p for i, p in enumerate(problems) if i not in held]
    return rest, [p for i, p in enumerate(problems) if i in held]


def step_questions(step: int, num_problems: int, per_step: int, seed: int) -> list[int]:
    """Indices of the questions of training step `step`: consecutive slices of a fresh seeded
    permutation per epoch, so resuming needs only the step number."""
    out = []
    for k in range(step * per_step, step * per_step + per_step):
        epoch, pos = divmod(k, num_problems)
        perm = list(range(num_problems))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[pos])
    return out
