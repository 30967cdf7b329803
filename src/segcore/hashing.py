"""Stable hashing of user ids into buckets (for ``bucket(lo, hi)`` holdouts and splits)."""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["bucket_of", "buckets_of_ints", "slot_of", "slots_of_ints"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
N_BUCKETS = 10_000


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _key(user: int | str) -> int:
    if isinstance(user, str):
        return int.from_bytes(hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest(),
                              "little")
    return int(user)


def bucket_of(user: int | str, seed: int = 0) -> int:
    """The bucket (0..9999) of a user id under an engine's ``seed``; stable across runs.

    >>> bucket_of(42) == bucket_of(42)
    True
    >>> 0 <= bucket_of("alice", seed=7) <= 9999
    True
    """
    return _splitmix64(_key(user) ^ ((seed * _GOLDEN) & _MASK)) % N_BUCKETS


def buckets_of_ints(users: np.ndarray, seed: int = 0) -> np.ndarray:
    """Vectorised :func:`bucket_of` for an array of int ids (same results)."""
    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) ^ np.uint64((seed * _GOLDEN) & _MASK)
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(N_BUCKETS)).astype(np.int32)


#: Salt of the slot hash (independent of the ``bucket()`` hash and of any engine seed).
_SLOT_SALT = 0x5E6C0E5A17ED5107


def slot_of(user: int | str, n_slots: int) -> int:
    """The slot (``0 .. n_slots - 1``) of a user id in a :class:`segcore.ShardedEngine`.

    >>> slot_of(42, 4096) == int(slots_of_ints(np.array([42]), 4096)[0])
    True
    """
    return _splitmix64(_key(user) ^ _SLOT_SALT) % n_slots


def slots_of_ints(users: np.ndarray, n_slots: int) -> np.ndarray:
    """Vectorised :func:`slot_of` for an array of int ids."""
    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) ^ np.uint64(_SLOT_SALT)
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_slots)).astype(np.int64)
