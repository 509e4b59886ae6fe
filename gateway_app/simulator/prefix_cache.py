"""The simulated KV cache: a pool of fixed-size token blocks with prefix caching, as in vLLM.

A prompt is cut into blocks of `block_tokens` tokens; each full block is named by a hash chained to the
previous block's, so two prompts share a cached block only if they share everything before it too. A
block is either held (some running request uses it), idle (cached, no request uses it: reusable, and
evicted least recently used first when room is needed) or free. Only full prompt blocks are cached; a
request's partial last block and its generated tokens live in private blocks, freed when it leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from gateway_app.simulator.protocol import CHARS_PER_TOKEN, approximate_tokens


def block_hashes(text: str, block_tokens: int) -> list[int]:
    """The chained hashes of the full blocks of `text`, at `CHARS_PER_TOKEN` characters a token.

    Python's `hash` is salted per process, which is fine: the cache lives as long as the process.
    """
    size = block_tokens * CHARS_PER_TOKEN
    hashes: list[int] = []
    parent = 0
    for start in range(0, approximate_tokens(text) // block_tokens * size, size):
        parent = hash((parent, text[start : start + size]))
        hashes.append(parent)
    return hashes


class PrefixCache:
    """`capacity` blocks shared by every request of one engine process."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the KV cache needs at least one block")
        self.capacity = capacity
        self._held: dict[int, int] = {}  # block hash -> number of running requests using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached and unused, least recently used first
        self._private = 0  # uncached blocks held by running requests

    @property
    def usage(self) -> float:
        """Blocks running requests hold, over capacity, as vLLM's `kv_cache_usage_perc` and SGLang's
        `token_usage` count them: idle cached blocks are reusable memory, so they do not count."""
        return min((len(self._held) + self._private) / self.capacity, 1.0)

    @property
    def cached_blocks(self) -> int:
        return len(self._held) + len(self._idle)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are cached (held or idle)."""
        count = 0
        for block in hashes:
            if block not in self._held and block not in self._idle:
                break
            count += 1
        return count

    def can_hold(self, hashes: Sequence[int], private: int) -> bool:
        """Whether a request needing these blocks fits without touching blocks others hold."""
        new = sum(1 for block in hashes if block not in self._held)
        return new + private <= self.capacity - len(self._held) - self._private

    def acquire(self, hashes: Sequence[int], private: int) -> None:
        """Hold the request's prompt blocks (reusing cached ones, caching new ones) and `private` more."""
        for block in hashes:
            users = self._held.get(block)
            if users is not None:
                self._held[block] = users + 1
                continue
            if self._idle.pop(block, False) is False:  # not cached: compute it into a block
                self._make_room(1)
            self._held[block] = 1
        self.grow(private)

    def grow(self, private: int) -> None:
        """Hold `private` more uncached blocks (a generation crossing into a new block)."""
        self._make_room(private)
        self._private += private

    def release(self, hashes: Sequence[int], private: int) -> None:
        """Give back what `acquire` and `grow` took. The chain is released tail first, so that its head
        is the most recently used and the last evicted, as vLLM frees blocks in reverse order."""
        self._private -= private
        for block in reversed(hashes):
            users = self._held[block] - 1
            if users:
                self._held[block] = users
            else:
                del self._held[block]
                self._idle[block] = None

    def _make_room(self, blocks: int) -> None:
        # Evict idle blocks, least recently used first. When all are held the pool overflows instead
        # (a real engine would preempt a request); usage then reads 1.
        excess = len(self._held) + len(self._idle) + self._private + blocks - self.capacity
        while excess > 0 and self._idle:
            self._idle.popitem(last=False)
            excess -= 1
