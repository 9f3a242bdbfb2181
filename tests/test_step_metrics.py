"""Step metrics say how ranks combine them: Sum adds, Mean averages, Max takes the slowest rank's,
Same keeps; an untyped float is refused, so a new metric cannot be averaged by mistake."""

import random

import pytest
import torch

from fastmgrpo import distributed
from fastmgrpo.distributed import Dist
from fastmgrpo.metrics import Max, Mean, Same, Sum


def test_an_untyped_float_is_refused_even_on_one_rank():
    with pytest.raises(TypeError, match="'new_rate'"):
        Dist(torch.device("cpu")).reduce_metrics({"loss": Same(1.0), "new_rate": 0.5})


def test_each_type_combines_by_its_rule(monkeypatch, _seed):
    """Two ranks, the other holding 3x this rank's values (a stand-in for the all-reduce)."""
    rng = random.Random(_seed)
    mine = {k: rng.uniform(0.1, 10.0) for k in ("a", "b", "c", "d", "e", "f")}

    def reduce(self, values, op):
        other = [3 * v for v in values]
        return [x + y if op == torch.distributed.ReduceOp.SUM else max(x, y) for x, y in zip(values, other)]

    monkeypatch.setattr(distributed.Dist, "_reduce", reduce)
    typed = {"a": Sum(mine["a"]), "b": Mean(mine["b"]), "c": Max(mine["c"]), "d": Same(mine["d"]),
             "e": Sum(mine["e"]), "f": Mean(mine["f"]), "step": 7, "skipped": False}
    out = Dist(torch.device("cpu"), rank=0, world=2).reduce_metrics(typed)
    want = {"a": 4 * mine["a"], "b": 2 * mine["b"], "c": 3 * mine["c"], "d": mine["d"],
            "e": 4 * mine["e"], "f": 2 * mine["f"], "step": 7, "skipped": False}
    assert out == pytest.approx(want, rel=1e-12)
    assert all(type(v) is float for k, v in out.items() if k in mine)  # plain floats in metrics.jsonl
