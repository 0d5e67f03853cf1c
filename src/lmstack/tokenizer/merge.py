"""Applying learned merges to one piece (the encode side of BPE).

Within a piece, the adjacent pair with the lowest merge rank is merged first; among equal ranks (the same
pair occurring twice) the leftmost goes first. This is Hugging Face's order, and for vocabularies whose
merges were learned by BPE it is also what tiktoken computes from token ranks (so the three agree).

`ranks` maps a pair of ids to `(rank, new_id)`. Two implementations of the same rule: a plain scan for
the short pieces that make up almost all text, and a heap over a linked list for long pieces (a line of
minified code or a run of spaces), where the plain scan would be quadratic. The tests check they agree.
"""

from __future__ import annotations

import heapq

LONG_PIECE = 64  # ids; above this the heap version wins


def merge_piece(ids: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Apply merges to `ids` (modified in place and returned) until no adjacent pair has a merge."""
    if len(ids) > LONG_PIECE:
        return merge_piece_heap(ids, ranks)
    return merge_piece_scan(ids, ranks)


def merge_piece_scan(ids: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """The readable version: find the lowest-rank pair, merge it, repeat. O(len^2)."""
    while len(ids) > 1:
        best = None
        for i in range(len(ids) - 1):
            found = ranks.get((ids[i], ids[i + 1]))
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], i, found[1])
        if best is None:
            break
        _, i, new_id = best
        ids[i : i + 2] = [new_id]
    return ids


def merge_piece_heap(ids: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """The same rule in O(len log len): candidate merges in a heap ordered by (rank, position).

    Symbols live in a doubly linked list over the original positions, so a position keeps its place in
    the order after neighbours are merged into it. A heap entry is outdated when its left symbol was
    merged away or its pair changed; since each pair has one rank, "the current pair at this position
    still has this rank" is an exact validity check.
    """
    n = len(ids)
    symbols = list(ids)
    next_pos = list(range(1, n + 1))  # n means "no right neighbour"
    prev_pos = list(range(-1, n - 1))  # -1 means "no left neighbour"
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        found = ranks.get((symbols[i], symbols[i + 1]))
        if found is not None:
            heap.append((found[0], i, found[1]))
    heapq.heapify(heap)
    while heap:
        rank, i, new_id = heapq.heappop(heap)
        j = next_pos[i]
        if not alive[i] or j == n or ranks.get((symbols[i], symbols[j]), (None,))[0] != rank:
            continue
        symbols[i] = new_id  # i absorbs j
        alive[j] = False
        next_pos[i] = next_pos[j]
        if next_pos[j] < n:
            prev_pos[next_pos[j]] = i
        left = prev_pos[i]
        if left >= 0:
            found = ranks.get((symbols[left], new_id))
            if found is not None:
                heapq.heappush(heap, (found[0], left, found[1]))
        right = next_pos[i]
        if right < n:
            found = ranks.get((new_id, symbols[right]))
            if found is not None:
                heapq.heappush(heap, (found[0], i, found[1]))
    ids[:] = [s for s, keep in zip(symbols, alive) if keep]
    return ids
