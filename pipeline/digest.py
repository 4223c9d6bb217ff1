"""A multiset fingerprint of keys, which the commit uses to prove "one row per input"."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


class KeyDigest:
    """A multiset fingerprint of keys: a count and two 64-bit sums of a hash of each key. Two multisets
    of keys with equal digests are equal but for a ~2**-64 chance, so comparing the rows written with the
    inputs listed proves "one row per input" without holding the keys anywhere."""

    _MASK = 2**64 - 1

    def __init__(self, count: int = 0, low: int = 0, high: int = 0):
        self.count, self.low, self.high = count, low, high

    def add(self, keys: Iterable[str]) -> KeyDigest:
        for key in keys:
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            self.low = (self.low + int.from_bytes(digest[:8], "little")) & self._MASK
            self.high = (self.high + int.from_bytes(digest[8:], "little")) & self._MASK
            self.count += 1
        return self

    def __iadd__(self, other: KeyDigest) -> KeyDigest:
        self.count += other.count
        self.low = (self.low + other.low) & self._MASK
        self.high = (self.high + other.high) & self._MASK
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyDigest) and self.as_tuple() == other.as_tuple()

    def as_tuple(self) -> tuple[int, int, int]:
        return self.count, self.low, self.high

    def to_json(self) -> dict[str, int | str]:
        return {"count": self.count, "low": f"{self.low:016x}", "high": f"{self.high:016x}"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyDigest:
        return cls(int(data["count"]), int(data["low"], 16), int(data["high"], 16))
