"""The sampler's draw (`sampler._pick`) follows the distribution it claims: plain softmax(z / T),
top-k and top-p truncations, each checked by a χ² goodness-of-fit test over 10⁵ draws against
probabilities computed independently in float64, and the returned log-probs are those of the
untruncated softmax(z / T). Both uniform sources: `torch.rand` with a generator (eager decoding)
and the counter-based RNG of the compiled, graph-captured step (`rng.CounterRNG`)."""
import pytest
import torch

from fastmgrpo.rng import CounterRNG, torch_uniform
from fastmgrpo.sampler import _pick

V, DRAWS = 12, 100_000
P_FLOOR = 1e-6  # a right sampler fails this at a fixed seed with probability 1e-6


def _expected(z: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 probabilities of one row z (V,): softmax(z / T) restricted to its top_k largest
    (0 = all), then to the most probable of those until their renormalised mass reaches top_p
    (a token is kept while the mass before it is below top_p), renormalised."""
    p = torch.softmax(z.double() / temperature, -1)
    ranked = p.argsort(descending=True)[: top_k or V]
    mass, keep = 0.0, []
    for i in ranked.tolist():
        if mass >= top_p:
            break
        keep.append(i)
        mass += (p[i] / p[ranked].sum()).item()
    out = torch.zeros(V, dtype=torch.float64)
    out[keep] = p[keep]
    return out / out.sum()


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the χ² statistic over the categories with probability > 0."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a truncated token was drawn"
    expected = probs[support] * counts.sum()
    chi2 = ((counts[support].double() - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2).item()


CASES = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8), (0.7, 5, 0.9)]


def _uniform(source: str, seed: int):
    """`_pick`'s uniform draw: torch.rand with a generator, or a CounterRNG keyed from one."""
    g = torch.Generator().manual_seed(seed)
    if source == "torch":
        return torch_uniform(g, "cpu")
    rng = CounterRNG(torch.device("cpu"))
    rng.seed(g)
    return rng


@pytest.mark.parametrize("source", ["torch", "counter"])
@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_draws_follow_the_truncated_softmax(temperature, top_k, top_p, source):
    seed = 1000 + CASES.index((temperature, top_k, top_p))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    logits = z.float().expand(DRAWS, V).contiguous()
    ids, logp = _pick(logits, temperature, top_p, top_k, _uniform(source, seed))
    counts = torch.bincount(ids, minlength=V)
    probs = _expected(z.float(), temperature, top_k, top_p)
    p = _p_value(counts, probs)
    assert p > P_FLOOR, (seed, p, counts.tolist(), probs.tolist())
    # the test has power: the untruncated softmax at another temperature is rejected outright
    assert _p_value(counts, _expected(z, 1.0 if temperature != 1.0 else 0.7, 0, 1.0)) < 1e-12
    want = torch.log_softmax(z.float().double() / temperature, -1)[ids]  # before truncation
    assert (logp.double() - want).abs().max() <= 1e-5
