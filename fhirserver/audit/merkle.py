"""The Merkle tree hash of RFC 9162 (Certificate Transparency v2), section 2.1, over hex digests.

    leaf hash  = SHA-256(0x00 || leaf content)
    node hash  = SHA-256(0x01 || left || right)
    MTH(D[n])  = MTH(D[0:k]) and MTH(D[k:n]) joined, k the largest power of two < n

Every subtree the definition splits into is either *perfect* (2^level leaves starting at a
multiple of 2^level) or the right edge of a smaller tree, so any root and any inclusion proof is
computed from perfect-subtree hashes (`PerfectHash`: level, index -> hash) in O(log^2 n) lookups.
`CompactRange` folds a stream of leaves into the roots of every prefix size in O(log n) each,
which is how `audit verify` checks all checkpoints in one pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

PerfectHash = Callable[[int, int], str]  # (level, index) -> hex hash of that perfect subtree
EMPTY_ROOT = hashlib.sha256(b"").hexdigest()


def leaf_hash(content: bytes) -> str:
    return hashlib.sha256(b"\x00" + content).hexdigest()


def node_hash(left: str, right: str) -> str:
    return hashlib.sha256(b"\x01" + bytes.fromhex(left) + bytes.fromhex(right)).hexdigest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_root(start: int, size: int, perfect: PerfectHash) -> str:
    """MTH of the leaves [start, start + size) of a tree in which this range is an RFC 9162 subtree."""
    if size & (size - 1) == 0 and start % size == 0:
        level = size.bit_length() - 1
        return perfect(level, start >> level)
    k = _split(size)
    return node_hash(subtree_root(start, k, perfect), subtree_root(start + k, size - k, perfect))


def root(size: int, perfect: PerfectHash) -> str:
    return EMPTY_ROOT if size == 0 else subtree_root(0, size, perfect)


def inclusion_path(index: int, size: int, perfect: PerfectHash) -> list[str]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1: sibling hashes from the leaf up to the root."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    path: list[str] = []
    start, n = 0, size
    while n > 1:
        k = _split(n)
        if index - start < k:
            path.append(subtree_root(start + k, n - k, perfect))
            n = k
        else:
            path.append(subtree_root(start, k, perfect))
            start, n = start + k, n - k
    path.reverse()
    return path


class CompactRange:
    """The perfect subtrees covering leaves [0, size): append leaves, ask for the root."""

    def __init__(self) -> None:
        self.size = 0
        self.stack: list[tuple[int, str]] = []  # (level, hash), largest first
        self.completed: list[tuple[int, int, str]] = []  # (level, index, hash) of new perfect nodes

    def append(self, leaf: str) -> None:
        level, h, index = 0, leaf, self.size
        while self.stack and self.stack[-1][0] == level:
            _lvl, left = self.stack.pop()
            h = node_hash(left, h)
            level += 1
            index >>= 1
            self.completed.append((level, index, h))
        self.stack.append((level, h))
        self.size += 1

    def root(self) -> str:
        if not self.stack:
            return EMPTY_ROOT
        h = self.stack[-1][1]
        for _level, left in reversed(self.stack[:-1]):
            h = node_hash(left, h)
        return h
