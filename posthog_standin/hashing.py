"""A fast deterministic integer hash, shared by the seed and the table renderer."""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def mix(*parts: int) -> int:
    """A fast 64-bit integer hash (splitmix-style); deterministic across runs, unlike ``hash``."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h ^= part & MASK64
        h = (h * 0xBF58476D1CE4E5B9) & MASK64
        h ^= h >> 31
    return h
