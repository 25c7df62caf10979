"""All pairs of 64-bit hashes within a Hamming distance, by multi-index hashing.

Split each hash into ``m`` chunks. If two hashes differ in at most ``t`` bits, then by
pigeonhole some chunk differs in at most ``t // m`` bits. So for every chunk we look up,
in a table of chunk values, each hash's chunk with up to ``t // m`` bits flipped; the
hashes found there are candidates, and a popcount of the full 64-bit XOR keeps those
truly within ``t``. Every step is a numpy operation over all hashes at once, and the
work grows with the number of candidates instead of with the number of all pairs.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import comb

import numpy as np

HASH_BITS = 64
# Chunk tables are dense arrays of 2**bits bucket offsets: at least 3 chunks keeps a
# table at 2**22 entries (32 MiB) at most.
MIN_CHUNKS, MAX_CHUNKS = 3, 16
CANDIDATES_PER_BATCH = 4_000_000
# Bucket entries compared one round each before the rest go in batches.
ROUNDS = 4


@dataclass(frozen=True)
class Pairs:
    """Index pairs ``first[k] < second[k]`` into the hash array, at Hamming ``distance[k]``."""

    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def chunk_plan(chunks: int, max_distance: int) -> list[tuple[int, int]]:
    """(bits, search radius) per chunk. With ``max_distance = chunks * r + a`` (a < chunks),
    a pair within the distance has a chunk among the first ``a + 1`` within ``r`` or a later
    chunk within ``r - 1``: otherwise its distance would be at least ``(a+1)(r+1) + (chunks-a-1) r``,
    which exceeds ``max_distance``. So the later chunks are searched one bit narrower."""
    base, extra = divmod(HASH_BITS, chunks)
    widths = [base + 1] * extra + [base] * (chunks - extra)
    radius, wide = divmod(max_distance, chunks)
    return [(bits, radius if c <= wide else radius - 1) for c, bits in enumerate(widths) if c <= wide or radius > 0]


def search_cost(count: int, chunks: int, max_distance: int) -> float:
    """Expected work per hash on uniformly spread hashes: building the chunk tables,
    probing them, and verifying the candidates found (about two probes each)."""
    total = 0.0
    for bits, radius in chunk_plan(chunks, max_distance):
        probes = sum(comb(bits, k) for k in range(radius + 1))
        total += 2**bits / max(count, 1) + probes * (1 + 2 * count / 2**bits)
    return total


def choose_chunks(count: int, max_distance: int) -> int:
    return min(range(MIN_CHUNKS, MAX_CHUNKS + 1), key=lambda chunks: search_cost(count, chunks, max_distance))


def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), k))
    return np.array(masks, dtype=np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> Pairs:
    """Every pair of positions in ``hashes`` (uint64) whose hashes differ in at most
    ``max_distance`` bits, by whichever search is expected to be cheaper."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    chunks = choose_chunks(len(hashes), max_distance)
    if search_cost(len(hashes), chunks, max_distance) >= len(hashes):  # few hashes or a wide radius
        return brute_force_pairs(hashes, max_distance)
    return multi_index_pairs(hashes, max_distance, chunks)


def multi_index_pairs(hashes: np.ndarray, max_distance: int, chunks: int) -> Pairs:
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    count = len(hashes)
    found: list[np.ndarray] = []
    shift = 0
    for bits, radius in chunk_plan(chunks, max_distance):
        keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)
        shift += bits
        for first, second in _chunk_pairs(keys, hashes, bits, radius, max_distance):
            found.append(np.minimum(first, second) * count + np.maximum(first, second))
    # A pair close in several chunks is found once per chunk.
    keys = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    return _pairs_from_keys(keys, hashes)


def _chunk_pairs(keys: np.ndarray, hashes: np.ndarray, bits: int, radius: int, max_distance: int):
    """Yield (first, second) positions of every pair within ``max_distance`` whose chunk
    ``keys`` differ in at most ``radius`` bits, each pair once."""
    # Queries run in sorted key order, so the table look-ups walk memory nearly in
    # sequence; bucket sizes use the narrowest integer type, so the table stays in cache.
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_hashes = keys[order], hashes[order]
    sizes = np.bincount(keys, minlength=2**bits)
    starts = (np.cumsum(sizes) - sizes).astype(np.min_scalar_type(len(keys)))
    sizes = sizes.astype(np.min_scalar_type(sizes.max()))
    for query, target in _same_bucket(sorted_keys, sorted_hashes, max_distance):
        yield order[query], order[target]

    # Keys ``k`` and ``k ^ mask`` differ in the mask's highest bit, so exactly one of them
    # has it clear: probing only from that one finds each pair once and halves the work.
    def probe_from(top: int) -> list[tuple[np.ndarray, np.ndarray]]:
        clear = np.flatnonzero((sorted_keys & np.int32(1 << top)) == 0)
        query_keys, query_hashes = sorted_keys[clear], sorted_hashes[clear]
        found = []
        for mask in flip_masks(top, radius - 1) | (1 << top):
            probe = query_keys ^ np.int32(mask)
            hit_sizes = np.take(sizes, probe)
            hits = np.flatnonzero(hit_sizes != 0)  # several times faster on booleans
            heads = np.take(starts, np.take(probe, hits))
            hit_sizes = np.take(hit_sizes, hits)
            for query, target in _verified(query_hashes, sorted_hashes, hits, heads, hit_sizes, max_distance):
                found.append((order[clear[query]], order[target]))
        return found

    # numpy releases the interpreter lock in these array operations: one thread per core
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as probes:
        for found in probes.map(probe_from, range(bits if radius > 0 else 0)):
            yield from found


def _same_bucket(sorted_keys: np.ndarray, sorted_hashes: np.ndarray, max_distance: int):
    """Yield (query, target) sorted positions, query < target, of the pairs within
    ``max_distance`` that share a bucket: round ``j`` compares each entry with the one
    ``j`` places later, among the entries whose bucket reaches that far."""
    count = len(sorted_keys)
    queries = np.arange(count)
    step = 1
    while len(queries):
        queries = queries[: np.searchsorted(queries, count - step)]
        queries = queries[sorted_keys[queries + step] == sorted_keys[queries]]
        targets = queries + step
        close = np.flatnonzero(np.bitwise_count(sorted_hashes[queries] ^ sorted_hashes[targets]) <= max_distance)
        yield queries[close], targets[close]
        step += 1


def _verified(query_hashes, sorted_hashes, queries, heads, sizes, max_distance: int):
    """Compare each of ``query_hashes[queries]`` with every entry of the bucket it probed,
    ``sorted_hashes[heads[k] : heads[k] + sizes[k]]``; yield (query, target) positions
    within ``max_distance``. Most buckets hold one or two entries, so the ``j``-th entries
    of all buckets are compared together for the first few ``j``, and the rest of the
    larger buckets in batches of bounded size."""
    query_hashes = np.take(query_hashes, queries)
    for j in range(ROUNDS):
        if j:
            more = np.flatnonzero(sizes > j)
            queries, heads, sizes, query_hashes = queries[more], heads[more], sizes[more], query_hashes[more]
        if len(queries) == 0:
            return
        targets = heads + j
        close = np.flatnonzero(np.bitwise_count(query_hashes ^ np.take(sorted_hashes, targets)) <= max_distance)
        yield queries[close], targets[close]
    larger = np.flatnonzero(sizes > ROUNDS)
    if len(larger) == 0:
        return
    rest = sizes[larger].astype(np.int64) - ROUNDS
    ends = np.cumsum(rest)
    cuts = np.searchsorted(ends, np.arange(CANDIDATES_PER_BATCH, ends[-1], CANDIDATES_PER_BATCH), side="right")
    for part in np.split(larger, np.unique(cuts)):
        if len(part) == 0:
            continue
        part_rest = sizes[part].astype(np.int64) - ROUNDS
        owner = np.repeat(part, part_rest)
        part_ends = np.cumsum(part_rest)
        targets = heads[owner] + ROUNDS + np.arange(part_ends[-1]) - np.repeat(part_ends - part_rest, part_rest)
        close = np.flatnonzero(np.bitwise_count(query_hashes[owner] ^ sorted_hashes[targets]) <= max_distance)
        yield queries[owner[close]], targets[close]


def _pairs_from_keys(keys: np.ndarray, hashes: np.ndarray) -> Pairs:
    count = max(len(hashes), 1)
    first, second = keys // count, keys % count
    return Pairs(first, second, hamming(hashes[first], hashes[second]))


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> Pairs:
    """Every pair by comparing each hash with all later ones: quadratic, so only for few
    hashes or wide radii (and as the reference answer in tests and benchmarks)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    firsts, seconds = [], []
    for i in range(len(hashes) - 1):
        distance = hamming(hashes[i + 1 :], hashes[i])
        close = np.flatnonzero(distance <= max_distance)
        firsts.append(np.full(len(close), i, dtype=np.int64))
        seconds.append(close + i + 1)
    if not firsts:
        return _pairs_from_keys(np.empty(0, np.int64), hashes)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    return Pairs(first, second, hamming(hashes[first], hashes[second]))
