"""Counter-based uniform draws for the compiled, graph-captured decode step.

`torch.rand(generator=g)` breaks a `torch.compile` graph (dynamo does not trace generators), so
the sampling that follows the decode forward would run as ~27 eager kernels over the (slots, V)
logits. Here a draw is a pure function of a key, a counter and the element's index: a few integer
ops per element that inductor fuses into the kernel reading the logits, the same numbers on every
device, eager or compiled, and no generator for a CUDA graph to register (the key and counter are
device tensors the captured step reads and advances).

The mixing function is a 32-bit integer hash with two multiply-xorshift rounds (constants from
Chris Wellons' hash prospector, both below 2^31), applied twice with keyed whitening between. Every
value stays in [0, 2^32) inside int64, so no product overflows: the arithmetic is exact in C++
and Triton alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2^32 / golden ratio, mod 2^32: spreads consecutive counters apart


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of int64 values in [0, 2^32) (any shape) to values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform(key: torch.Tensor, count: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 draws of `shape` in [2^-24, 1 - 2^-24] (never 0 or 1, so -log u is finite and
    positive), from key (2,) and count () int64 tensors in [0, 2^32) on the draws' device.

    Element i of draw (key, count) is mix32(mix32(i ^ k0) ^ k1) with k0, k1 hashed from key and
    count; its top 23 bits, centred in their interval, give the float exactly.
    """
    k0 = mix32(key[0] ^ ((count * _GOLDEN) & _M32))
    k1 = mix32(key[1] ^ k0)
    numel = 1
    for s in shape:
        numel *= s
    i = torch.arange(numel, device=key.device).view(shape)
    bits = mix32(mix32(i ^ k0) ^ k1) >> 9  # (shape) in [0, 2^23)
    return (bits.float() + 0.5) * 2.0**-23


def torch_uniform(generator: torch.Generator | None, device: torch.device | str) -> Callable:
    """The eager draw: shape -> float32 `torch.rand` draws in [0, 1) on `device` from `generator`
    (the global generator when None); cheaper eagerly than the hash, but dynamo cannot trace it."""
    return lambda shape: torch.rand(shape, generator=generator, device=device)


class CounterRNG:
    """A key and a draw counter on `device`: each call is a fresh `uniform` draw and advances the
    counter in place, so a captured graph that calls it draws anew at every replay."""

    def __init__(self, device: torch.device):
        self.key = torch.zeros(2, dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)

    def seed(self, generator: torch.Generator | None) -> None:
        """Take a new key from `generator` (the global generator when None); restart the count."""
        words = torch.randint(2**32, (2,), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        self.key.copy_(words)
        self.count.zero_()

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        u = uniform(self.key, self.count, shape)
        self.count.add_(1)
        return u
