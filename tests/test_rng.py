"""The counter-based RNG of the compiled decode step (`fastmgrpo.rng`): its hash equals an
independent uint32 implementation, its draws are uniform and independent across elements, counts
and keys (χ² tests), stay inside (0, 1), and come out the same eager and compiled."""
import shutil

import numpy as np
import pytest
import torch

from fastmgrpo.rng import CounterRNG, mix32, uniform

P_FLOOR = 1e-6  # a right generator fails one of these at a fixed seed with probability ~1e-6


def _mix32_uint32(x: np.ndarray) -> np.ndarray:
    """The same hash in wrapping uint32 arithmetic (numpy), the way it is usually written."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x21F0AAAD)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x735A2D97)
        x ^= x >> np.uint32(15)
    return x


def _chi2_p(counts: torch.Tensor) -> float:
    """Upper tail p-value of the χ² statistic of `counts` against equal expected counts."""
    counts = counts.double().flatten()
    expected = counts.sum() / counts.numel()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2).item()


def test_mix32_equals_uint32_reference_and_is_a_bijection():
    seed = 11
    x = np.random.default_rng(seed).integers(0, 2**32, 1 << 20, dtype=np.int64)
    x[:4] = [0, 1, 2**31, 2**32 - 1]  # the edges of the range
    got = mix32(torch.from_numpy(x)).numpy()
    assert got.min() >= 0 and got.max() < 2**32, seed
    assert np.array_equal(got, _mix32_uint32(x).astype(np.int64)), seed
    distinct = np.unique(x)
    assert np.unique(mix32(torch.from_numpy(distinct)).numpy()).size == distinct.size, seed


def test_uniform_range_and_marginal():
    seed = 12
    key = torch.randint(2**32, (2,), generator=torch.Generator().manual_seed(seed))
    u = uniform(key, torch.tensor(3), (1000, 1000))
    assert u.dtype == torch.float32 and u.shape == (1000, 1000)
    assert u.min() >= 2.0**-24 and u.max() <= 1 - 2.0**-24, seed  # -log u finite and > 0
    p = _chi2_p(torch.histc(u, bins=1024, min=0, max=1))
    assert p > P_FLOOR, (seed, p)


@pytest.mark.parametrize("pair", ["neighbours", "counts", "keys"])
def test_uniform_pairs_independent(pair):
    """Pairs of draws binned on a 32 x 32 grid: neighbouring elements of one draw, one element
    at consecutive counts, one element under keys one bit apart."""
    seed = 13 + ["neighbours", "counts", "keys"].index(pair)
    key = torch.randint(2**32, (2,), generator=torch.Generator().manual_seed(seed))
    n = 1 << 19
    if pair == "neighbours":
        u = uniform(key, torch.tensor(0), (2 * n,))
        a, b = u[0::2], u[1::2]
    elif pair == "counts":
        a, b = uniform(key, torch.tensor(5), (n,)), uniform(key, torch.tensor(6), (n,))
    else:
        a, b = uniform(key, torch.tensor(0), (n,)), uniform(key ^ torch.tensor([1, 0]), torch.tensor(0), (n,))
    cells = (a * 32).long() * 32 + (b * 32).long()
    p = _chi2_p(torch.bincount(cells, minlength=1024))
    assert p > P_FLOOR, (seed, pair, p)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 6 / n**0.5, (seed, pair)


def test_counter_rng_advances_and_reseeds():
    seed = 16
    rng = CounterRNG(torch.device("cpu"))
    rng.seed(torch.Generator().manual_seed(seed))
    first, second = rng((4, 5)), rng((4, 5))
    assert int(rng.count) == 2 and not torch.equal(first, second)
    assert torch.equal(first, uniform(rng.key, torch.tensor(0), (4, 5)))
    rng.seed(torch.Generator().manual_seed(seed))
    assert int(rng.count) == 0 and torch.equal(rng((4, 5)), first)  # the generator alone fixes the draws
    rng.seed(torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(rng((4, 5)), first)


@pytest.mark.slow  # inductor's first compile in a process: about 10 s
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_draw_equals_eager():
    """Inductor's fused code gives the eager draws bit for bit, and the Gumbel-max argmax on them."""
    seed = 17
    key = torch.randint(2**32, (2,), generator=torch.Generator().manual_seed(seed))
    z = torch.randn(8, 3000, generator=torch.Generator().manual_seed(seed))

    def draw(z, key, count):
        u = uniform(key, count, z.shape)
        return u, (z - u.log().neg().log()).argmax(-1)

    compiled = torch.compile(draw, dynamic=False, fullgraph=True)
    for count in (0, 1, 2**31 - 1):
        (u, ids), (u0, ids0) = compiled(z, key, torch.tensor(count)), draw(z, key, torch.tensor(count))
        assert torch.equal(u, u0) and torch.equal(ids, ids0), (seed, count)
