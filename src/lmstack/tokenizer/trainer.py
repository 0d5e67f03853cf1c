"""Learning BPE merges, incrementally.

The textbook loop (Sennrich et al. 2016: count the most frequent adjacent pair, merge it, repeat) recounts
every pair of the corpus after each merge: O(merges x corpus). Almost all of that work is wasted, because
a merge of (a, b) changes only the words that contain (a, b), and in those words only the pairs touching
the merged occurrences. So we keep, between merges:

- `counts`: pair -> how often it occurs, each distinct word weighted by its number of occurrences;
- `where`:  pair -> the words it may occur in (entries can go stale; a stale word is simply skipped);
- `heap`:   (-count, pair) entries, possibly outdated ("lazy deletion"). A popped entry whose count is
  no longer current is pushed back with its current count. This is exact because a pair that already
  exists can only lose occurrences when another pair is merged; only pairs containing the new token
  gain, and they are pushed fresh after each merge.

Tie rule: the pair with the highest count wins; among equal counts, the smallest (left id, right id).
The heap orders (-count, left, right) exactly so. Pairs are packed into one int `left * base + right`
(base > every id), which keeps that order and makes dict keys cheaper than tuples.

Occurrences are merged left to right without overlap (`a a a` with merge (a, a) becomes `aa a`), and
pair counts include overlapping occurrences — the same conventions as the plain reference trainer in the
tests and as Hugging Face's trainer, so the merges come out identical to the reference.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable

from tqdm import tqdm


def train_merges(
    words: Iterable[tuple[bytes, int]], n_merges: int, *, progress: bool = False
) -> list[tuple[int, int]]:
    """Learn up to `n_merges` merges from `(word bytes, count)` pairs; merge i creates token 256 + i.

    Stops early when no adjacent pair is left (every word is a single token); the caller reports it.
    """
    base = 256 + max(n_merges, 0)  # > every id we can create, so (left, right) packs into one int
    seqs: list[list[int]] = []
    weights: list[int] = []
    for word, count in words:
        if len(word) > 1:  # a single byte has no pair and can never change
            seqs.append(list(word))
            weights.append(count)

    counts: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)
    for w, (seq, count) in enumerate(zip(seqs, weights)):
        for left, right in zip(seq, seq[1:]):
            key = left * base + right
            counts[key] += count
            where[key].add(w)
    heap = [(-count, key) for key, count in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, unit="merge", desc="BPE merges", disable=not progress, mininterval=0.5)
    for new_id in range(256, 256 + n_merges):
        key = _pop_best(heap, counts)
        if key is None:
            break
        a, b = divmod(key, base)
        merges.append((a, b))
        new_pairs = _apply_merge(a, b, new_id, base, seqs, weights, counts, where, where.pop(key))
        counts.pop(key, None)
        for new_key in new_pairs:
            if counts[new_key] > 0:
                heapq.heappush(heap, (-counts[new_key], new_key))
        bar.update(1)
    bar.close()
    return merges


def _pop_best(heap: list[tuple[int, int]], counts: dict[int, int]) -> int | None:
    """Pop the pair with the highest current count (ties: smallest pair), skipping outdated entries."""
    while heap:
        neg_count, key = heapq.heappop(heap)
        current = counts.get(key, 0)
        if current == -neg_count:
            return key
        if current > 0:  # outdated: the pair lost occurrences since this entry was pushed
            heapq.heappush(heap, (-current, key))
    return None


def _apply_merge(
    a: int,
    b: int,
    new_id: int,
    base: int,
    seqs: list[list[int]],
    weights: list[int],
    counts: defaultdict[int, int],
    where: defaultdict[int, set[int]],
    candidates: set[int],
) -> set[int]:
    """Merge (a, b) -> new_id in every candidate word, updating pair counts locally.

    For an occurrence with left neighbour L and right neighbour R, the pairs (L, a) and (b, R) lose the
    word's count and (L, new) and (new, R) gain it. L is read from the already-merged output, so in
    `a b a b` the second occurrence sees L = new and the counts stay exact. (a, b) itself is dropped by
    the caller: after a left-to-right pass no (a, b) is left in any word.
    Returns the new pairs (all contain new_id) so the caller can push them on the heap.
    """
    new_pairs: set[int] = set()
    for w in candidates:
        seq = seqs[w]
        n = len(seq)
        out: list[int] = []
        copied = search = 0
        while True:
            try:
                i = seq.index(a, search, n - 1)  # an `a` that has a right neighbour
            except ValueError:
                break
            if seq[i + 1] != b:
                search = i + 1
                continue
            count = weights[w]
            out += seq[copied:i]
            if out:
                left = out[-1]
                counts[left * base + a] -= count
                key = left * base + new_id
                counts[key] += count
                new_pairs.add(key)
                where[key].add(w)
            if i + 2 < n:
                right = seq[i + 2]
                counts[b * base + right] -= count
                key = new_id * base + right
                counts[key] += count
                new_pairs.add(key)
                where[key].add(w)
            out.append(new_id)
            copied = search = i + 2
        if out:  # the word really contained (a, b); otherwise the index entry was stale
            out += seq[copied:]
            seqs[w] = out
    return new_pairs
