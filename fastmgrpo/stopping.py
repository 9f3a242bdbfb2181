"""Stop strings for base models: end a completion at the first of some strings in its text.

A base model has no end-of-turn token; after its answer it goes on with the next "Question:"
of the format it imitates. The sampler asks `StopStrings.hit` after every token, and cuts
the completion with `StopStrings.keep`, so the stop string never enters a layer-2 prompt, a
verdict or the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .sampler import sample
from .types import Completion


class StopStrings:
    """`strings` matched against completions decoded by `decode` (token ids -> text)."""

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str]):
        if not strings or not all(strings):
            raise ValueError("stop strings must be a non-empty list of non-empty strings")
        self.decode, self.strings = decode, tuple(strings)
        # A token decodes to at least one character (byte-level pieces aside), so the last
        # len(longest) + 2 tokens hold any match that the newest token completes.
        self.window = max(map(len, self.strings)) + 2

    def hit(self, ids: list[int]) -> bool:
        """Whether the text of `ids` ends in a completed stop string (checked after each token)."""
        tail = self.decode(ids[-self.window :])
        return any(s in tail for s in self.strings)

    def keep(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` to keep: those whose text ends before the first stop
        string starts (at least one, so every completion still has a token to train on)."""
        text = self.decode(ids)
        starts = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        if not starts:
            return len(ids)
        k = len(ids)
        while k > 1 and len(self.decode(ids[:k])) > min(starts):
            k -= 1
        return k


def generate(model, tokenizer, prompts: list[list[int]], *, stop_strings: Sequence[str] = (),
             **sampling) -> list[Completion]:
    """`sampler.sample` with `stop_strings` applied and each completion's text decoded."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stop = StopStrings(decode, stop_strings) if stop_strings else None
    completions = sample(model, prompts, stopper=stop, **sampling)
    for c in completions:
        c.text = decode(c.token_ids)
    return completions
