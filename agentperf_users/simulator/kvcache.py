"""The KV block pool with vLLM V1 prefix caching: ref-counted blocks, chained-hash lookup, lazy LRU eviction.

Blocks hold ``BLOCK_SIZE`` tokens. A full prompt block, once computed, is registered under the chained
hash of the prompt up to its end (``EncodedPrompt.block_hashes``), so a later request whose prompt starts
the same way reuses it instead of recomputing it. When its last user lets go, a block goes to the tail
of the free list *keeping its hash*: it still counts as free memory, and it is evicted (hash dropped,
content overwritten) only when an allocation takes it from the head, oldest first. A request releases
its blocks tail-first, so a conversation's deepest blocks are evicted before its shared prefix, as in
vLLM's ``KVCacheManager.free``.

Only prompt blocks are hashed. Output blocks take memory but are never cached: an agent's next turn
resends the *recorded* conversation, not the text this simulator generated, so generated blocks could
never be hit. Everything here is per block, never per token, and O(1) per block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice

from agentperf_users.tokens import BLOCK_SIZE


class KVCache:
    """A pool of ``num_blocks`` KV blocks. Invariant: ``num_used_blocks + num_free_blocks == num_blocks``."""

    def __init__(self, num_blocks: int, caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.caching = caching  # prefix caching on: computed prompt blocks are registered for reuse
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._block_of: dict[int, int] = {}  # block hash -> the block caching it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: head evicted first
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.version = 0
        """Bumped whenever blocks are freed or a hash is registered: the only events that can let a request
        that failed :meth:`can_allocate` fit without anything else changing (callers use it to skip re-checks)."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references: never used, or cached and evictable."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a request (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def longest_cached_prefix(self, block_hashes: Sequence[int], num_tokens: int) -> list[int]:
        """The cached blocks holding the longest prefix of a prompt of ``num_tokens`` tokens.

        At most ``(num_tokens - 1) // BLOCK_SIZE`` blocks: the last token is always computed, since its
        logits give the first output token (vLLM caps a hit at ``num_tokens - 1`` the same way).
        Does not change the cache; :meth:`acquire` takes the blocks.
        """
        # Look every candidate up in C and cut at the first miss: cheaper than a Python loop that stops early.
        hits = list(map(self._block_of.get, islice(block_hashes, (num_tokens - 1) // BLOCK_SIZE)))
        if None in hits:
            del hits[hits.index(None):]
        return hits  # type: ignore[return-value]

    def can_allocate(self, num_new_blocks: int, cached_blocks: Iterable[int] = ()) -> bool:
        """Whether ``num_new_blocks`` fresh blocks fit after taking ``cached_blocks`` (evictable ones among
        them stop being free, exactly as in vLLM's admission check)."""
        evictable_hits = list(map(self._refs.__getitem__, cached_blocks)).count(0)
        return num_new_blocks + evictable_hits <= len(self._free)

    def acquire(self, cached_blocks: Iterable[int], query_tokens: int) -> None:
        """Take a reference on prefix-cache hits for a request of ``query_tokens`` prompt tokens (counted)."""
        refs, free = self._refs, self._free
        hits = 0
        for block in cached_blocks:
            if refs[block] == 0:
                del free[block]
            refs[block] += 1
            hits += 1
        self.prefix_queries_tokens += query_tokens
        self.prefix_hits_tokens += hits * BLOCK_SIZE

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks from the head of the free list, evicting whatever they cached.

        The caller checks :attr:`num_free_blocks` first; asking for more is a bug (``KeyError``).
        """
        refs, hash_of, block_of, free = self._refs, self._hash_of, self._block_of, self._free
        blocks = []
        for _ in range(num_blocks):
            block = free.popitem(last=False)[0]
            block_hash = hash_of[block]
            if block_hash is not None:
                del block_of[block_hash]
                hash_of[block] = None
            refs[block] = 1
            blocks.append(block)
        return blocks

    def cache(self, block: int, block_hash: int) -> None:
        """Register a just-computed full prompt block under its hash (first writer wins, as in vLLM); nothing
        with prefix caching off, so no prompt ever finds a cached block."""
        if self.caching and self._hash_of[block] is None and block_hash not in self._block_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash
            self.version += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each of a request's blocks; unreferenced ones join the LRU tail-first."""
        refs, free = self._refs, self._free
        for block in reversed(blocks):
            refs[block] -= 1
            if refs[block] == 0:
                free[block] = None
        self.version += 1

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        return self._hash_of[block] is not None
