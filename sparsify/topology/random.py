"""Counter-based random numbers: the same on every device and every rank, with nothing to move or save.

A Level 2 event draws its seeds from a CPU generator seeded by ``(config.seed, step)``
(:func:`decision_generator`), one 62-bit seed per group of same-shaped layers. Every random number of
a decision is then a hash of ``(seed, stream, position)`` computed with integer arithmetic on the
device that needs it (:func:`random_bits`), so ranks agree without communicating, the host never waits,
and a checkpoint needs no generator state.

Streams in use: 0 for a decision's quota, exploration and free-column draws (``decide.py``), 1 for the
values of grown blocks (``apply.py``).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
BITS_LIMIT = 2**32  # every value of random_bits is below this
_MASK61 = (1 << 61) - 1


def decision_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of the Level 2 event at ``step``: same on every rank, a pure function of both."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step * 7_919 + 0x5EED) & _MASK61)
    return generator


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """``count`` 62-bit seeds from a CPU generator (no device involved)."""
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed from a CPU generator."""
    return draw_seeds(generator, 1)[0]


def _key(seed: int, stream: int) -> int:
    """A 32-bit key for (seed, stream): splitmix64's finalizer, in Python integers."""
    z = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _M32


def random_bits(seed: int, stream: int, count: int, device) -> torch.Tensor:
    """``[count]`` random 32-bit values, int64 in [0, 2**32): a hash of (seed, stream, position), the
    same on every device. Distinct positions get distinct values (every step is a bijection of 32 bits)."""
    if count > 2**32:
        raise ValueError(f"random_bits: {count} values are more than one stream holds (2**32)")
    # a Weyl sequence (odd multiplier), then the 0x45d9f3b integer hash, in place; products stay below 2**59
    x = torch.arange(count, device=device, dtype=torch.int64).mul_(0x61C88647).add_(_key(seed, stream)).bitwise_and_(_M32)
    shifted = torch.empty_like(x)
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted)).mul_(0x45D9F3B).bitwise_and_(_M32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Random bits to float32 in [0, 1) with 24 random bits (exact, so equal on every device).
    Consumes ``bits`` (shifted in place)."""
    return bits.bitwise_right_shift_(8).float().mul_(2.0**-24)
