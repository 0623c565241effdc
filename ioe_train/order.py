"""The global sample order: a keyed bijection over sample indices, split across data-parallel ranks.

N samples (windows of the token stream), W ranks, p a position in the global order (0, 1, 2, ...).
Epoch e = p // N_w covers the first N_w = (N // W) * W positions of a fresh permutation of [0, N);
the tail N - N_w is dropped so that every rank holds the same count. Rank r reads positions
r, r + W, r + 2W, ... so ranks never overlap and never leave a gap.

The permutation is a keyed Feistel network over [0, 2^(2h)) with cycle walking down to [0, N): O(1)
memory per sample (the Pile at seq_len 2048 is ~150M samples; a materialised int64 permutation
would be 1.2 GB per rank). Its key is a hash of (seed, data fingerprint, seq_len, epoch): the
worker count never changes which sample sits at position p, and neither does the world size
within the first epoch. Later epochs start after N_w positions, which depends on W (by < W).
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6  # Feistel rounds; 4 already give a pseudo-random permutation (Luby-Rackoff)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche hash of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_uniform(key: int, idx: np.ndarray) -> np.ndarray:
    """A uniform float in [0, 1) per index, a pure function of (key, index)."""
    h = _mix64(idx.astype(np.uint64) ^ np.uint64(key))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class FeistelPermutation:
    """A keyed permutation of [0, n), evaluated pointwise on arrays of indices."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2  # domain 2^(2h) >= n, < 4n: cycle walking ends in ~<4 rounds
        self._mask = np.uint64((1 << self._half) - 1)
        rng = np.random.Generator(np.random.PCG64(key))
        self._round_keys = rng.integers(0, 1 << 63, size=_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self._half)
        left, right = x >> h, x & self._mask
        for k in self._round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"index out of [0, {self.n})")
        out = self._feistel(idx.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle walking: a bijection of [0, 2^2h) restricted to [0, n)
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class SampleOrder:
    """Maps global positions to sample indices; `rank_positions` gives one rank's share."""

    def __init__(self, num_samples: int, world_size: int, key: int):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot feed {world_size} ranks")
        self.num_samples = num_samples
        self.world_size = world_size
        self.epoch_size = (num_samples // world_size) * world_size  # N_w: the tail is dropped
        self._key = key
        self._perms: dict[int, FeistelPermutation] = {}

    def _perm(self, epoch: int) -> FeistelPermutation:
        if epoch not in self._perms:
            self._perms = {epoch: FeistelPermutation(self.num_samples, derive_key(self._key, epoch))}
        return self._perms[epoch]

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """Sample index at each global position (positions may cross epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.epoch_size)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))(within[sel])
        return out

    def rank_positions(self, start: int, count: int, rank: int) -> np.ndarray:
        """Global positions of rank `rank`'s next `count` samples once `start` were consumed.

        `start` counts samples of all ranks, so a run may resume on another world size (exactly
        within the first epoch; later epochs shift by the tail dropped, fewer than W samples).
        """
        return start + np.arange(count, dtype=np.int64) * self.world_size + rank
