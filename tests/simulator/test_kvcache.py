"""KV block pool: ref counts, prefix lookup, lazy LRU eviction, and the allocated + free == total invariant."""

from __future__ import annotations

import random

import pytest

from agentperf_users.simulator.kvcache import KVCache
from agentperf_users.tokens import BLOCK_SIZE


def computed_request(cache: KVCache, hashes: list[int]) -> list[int]:
    """Allocate and register blocks for a prompt whose full blocks have ``hashes`` (as a finished prefill)."""
    blocks = cache.allocate(len(hashes))
    for block, block_hash in zip(blocks, hashes):
        cache.cache(block, block_hash)
    return blocks


def assert_invariant(cache: KVCache) -> None:
    refs = [cache.ref_count(block) for block in range(cache.num_blocks)]
    assert cache.num_used_blocks + cache.num_free_blocks == cache.num_blocks
    assert cache.num_used_blocks == sum(1 for ref in refs if ref > 0)
    assert min(refs) >= 0


def test_freed_blocks_stay_cached_until_an_allocation_evicts_them_tail_first():
    cache = KVCache(4)
    prefix = computed_request(cache, [11, 12])
    cache.free(prefix)
    assert cache.num_free_blocks == 4
    assert cache.longest_cached_prefix([11, 12], 3 * BLOCK_SIZE) == prefix  # still hits after free
    fresh = cache.allocate(2)
    assert set(fresh).isdisjoint(prefix)  # never-used blocks go first
    assert cache.longest_cached_prefix([11, 12], 3 * BLOCK_SIZE) == prefix
    assert cache.allocate(1) == [prefix[1]]  # the request's last block is evicted before its first
    assert cache.longest_cached_prefix([11, 12], 3 * BLOCK_SIZE) == [prefix[0]]
    assert cache.allocate(1) == [prefix[0]]
    assert cache.longest_cached_prefix([11, 12], 3 * BLOCK_SIZE) == []
    assert cache.num_cached_blocks == 0
    assert_invariant(cache)


def test_least_recently_freed_is_evicted_first():
    cache = KVCache(2)
    old, new = computed_request(cache, [1]), computed_request(cache, [2])
    cache.free(old)
    cache.free(new)
    assert cache.allocate(1) == old
    assert cache.longest_cached_prefix([2], 2 * BLOCK_SIZE) == new
    # Re-using a cached block takes it off the free list, so the other one is evicted next.
    cache.acquire(new, 2 * BLOCK_SIZE)
    assert cache.num_free_blocks == 0
    assert not cache.can_allocate(1)


def test_shared_blocks_are_ref_counted_and_freed_by_the_last_user():
    cache = KVCache(8)
    first = computed_request(cache, [5, 6, 7])
    hits = cache.longest_cached_prefix([5, 6, 7, 8], 5 * BLOCK_SIZE)
    assert hits == first
    cache.acquire(hits, 5 * BLOCK_SIZE)
    assert [cache.ref_count(block) for block in first] == [2, 2, 2]
    cache.free(first)
    assert cache.num_free_blocks == 5 and cache.num_used_blocks == 3
    cache.free(hits)
    assert cache.num_free_blocks == 8
    assert cache.prefix_queries_tokens == 5 * BLOCK_SIZE
    assert cache.prefix_hits_tokens == 3 * BLOCK_SIZE
    assert_invariant(cache)


def test_a_hit_never_covers_the_last_prompt_token():
    cache = KVCache(8)
    computed_request(cache, [1, 2, 3])
    assert len(cache.longest_cached_prefix([1, 2, 3], 3 * BLOCK_SIZE)) == 2  # exact multiple: last block recomputed
    assert len(cache.longest_cached_prefix([1, 2, 3], 3 * BLOCK_SIZE + 1)) == 3
    assert cache.longest_cached_prefix([1, 9, 3], 4 * BLOCK_SIZE) == cache.longest_cached_prefix([1], 4 * BLOCK_SIZE)


def test_admission_check_counts_evictable_hits_against_free_blocks():
    cache = KVCache(4)
    prefix = computed_request(cache, [1, 2])
    cache.free(prefix)
    other = cache.allocate(1)
    # 3 free blocks, two of them are the cached prefix: taking it leaves one block for new tokens.
    assert cache.can_allocate(1, prefix)
    assert not cache.can_allocate(2, prefix)
    assert cache.can_allocate(3)
    cache.free(other)


def test_first_registration_of_a_hash_wins():
    cache = KVCache(4)
    first = computed_request(cache, [42])
    duplicate = computed_request(cache, [42])
    assert cache.longest_cached_prefix([42], 2 * BLOCK_SIZE) == first
    assert not cache.is_cached(duplicate[0])
    cache.free(first)
    cache.free(duplicate)
    assert cache.num_cached_blocks == 1


def test_invariant_holds_through_a_random_workload():
    rng = random.Random(1234)
    cache = KVCache(64)
    live: list[list[int]] = []
    for _ in range(3000):
        if live and (rng.random() < 0.45 or cache.num_free_blocks < 8):
            cache.free(live.pop(rng.randrange(len(live))))
        else:
            conversation = rng.randrange(6)
            hashes = [conversation * 1000 + i for i in range(rng.randrange(1, 6))]
            hits = cache.longest_cached_prefix(hashes, (len(hashes) + 1) * BLOCK_SIZE)
            new = rng.randrange(0, 4)
            if not cache.can_allocate(len(hashes) - len(hits) + new, hits):
                continue
            cache.acquire(hits, (len(hashes) + 1) * BLOCK_SIZE)
            blocks = hits + cache.allocate(len(hashes) - len(hits) + new)
            for block, block_hash in zip(blocks[len(hits):], hashes[len(hits):]):
                cache.cache(block, block_hash)
            live.append(blocks)
        assert_invariant(cache)
    assert cache.prefix_hits_tokens > 0
    for blocks in live:
        cache.free(blocks)
    assert cache.num_free_blocks == cache.num_blocks


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError):
        KVCache(0)
