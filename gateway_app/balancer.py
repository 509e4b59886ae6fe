"""Choosing the replica for one request, as small steps that can be tested alone: filter, score, pick.

- filter: replicas that are healthy and not ejected (when none is, the one whose ejection ends first,
  so that a fully failing engine is still tried rather than refused outright);
- score: the replica's load (`Replica.load`: requests outstanding from this gateway, or what the engine
  reports running and waiting when its metrics are read), weighted by its recent time to first byte
  (lower is better), so that an idle slow replica does not tie with an idle fast one;
- pick: with an affinity key, rendezvous hashing over the candidates (the same key keeps its replica
  while that replica stays healthy); otherwise the engine's policy: the better of two picked at random
  ("power of two choices"), which avoids the herd that always-least-loaded causes; plain rotation; or
  the replica that most likely holds the prompt's prefix in its cache, unless it is overloaded
  (`CacheAware`). Policies live behind `BalancingPolicy`; each pick says why, for the metrics.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from gateway_app.config import CacheAwareSettings
from gateway_app.prefix import Blocks, PrefixTable
from gateway_app.replicas import Replica, ReplicaPool


def holding(replicas: Sequence[Replica], holders: frozenset[str]) -> Sequence[Replica]:
    """The replicas that list a discovered adapter (by URL); all of them when none in service does (just
    after a wake, say): any may answer then."""
    listing = [r for r in replicas if r.url in holders]
    return listing or replicas


def available(
    replicas: Sequence[Replica], now: float, exclude: Sequence[Replica] = (), holders: frozenset[str] | None = None
) -> list[Replica]:
    """Healthy, not ejected, not in `exclude` (the few already tried) and, for a discovered adapter,
    listing it (`holders`)."""
    if holders is not None:
        replicas = holding(replicas, holders)
    candidates = [r for r in replicas if r.available(now) and r not in exclude]
    if candidates:
        return candidates
    rest = [r for r in replicas if r not in exclude]
    return [min(rest, key=lambda r: (not r.healthy, r.ejected_until))] if rest else []


def score(replica: Replica, now: float) -> float:
    """Expected wait: (requests ahead + this one) x recent time to first byte; plain load when unknown."""
    latency = replica.expected_latency(now)
    load = replica.load(now)
    return (load + 1) * latency if latency else load


_RNG = random.Random()


def pick_least_loaded_of_two(candidates: Sequence[Replica], rng: random.Random = _RNG, now: float = 0.0) -> Replica:
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(candidates, 2)
    return first if score(first, now) <= score(second, now) else second


def pick_by_affinity(candidates: Sequence[Replica], key: str) -> Replica:
    """Rendezvous hashing: the highest hash of (key, url) wins; removing one replica moves only its keys."""
    return max(candidates, key=lambda r: hashlib.blake2b(f"{key}|{r.url}".encode(), digest_size=8).digest())


def pick_in_turn(candidates: Sequence[Replica], pool: ReplicaPool) -> Replica:
    """Plain rotation, what a Service does per connection: the baseline the benchmark compares with."""
    pool.turn += 1
    return candidates[pool.turn % len(candidates)]


def least_loaded(candidates: Sequence[Replica], now: float, rng: random.Random = _RNG) -> Replica:
    """The replica with the least load, ties broken at random (so that idle replicas share new prompts)."""
    return min(candidates, key=lambda replica: (replica.load(now), rng.random()))


def overloaded(load: float, lowest: float, absolute: float, relative: float) -> bool:
    """SGLang's router's test of imbalance, applied to the preferred replica against the least loaded:
    both further than `absolute` requests and more than `relative` times."""
    return load - lowest > absolute and load > relative * lowest


def relieve(
    candidates: Sequence[Replica],
    loads: dict[str, float],
    missing: dict[str, int],
    settings: CacheAwareSettings,
    rng: random.Random = _RNG,
) -> Replica:
    """Where the request of an overloaded replica goes: a replica with nothing in flight if there is one
    (its capacity would be lost; the one holding most of the prompt), else the one where the request
    costs least, counting each prompt block it would compute again as `recompute_weight` requests (the
    overloaded replica itself when moving would cost more: a prompt computed again delays every request
    queued behind it on the other replica, and a conversation moved in a later turn computes its whole
    history again). `missing`: the prompt blocks each replica is not known to hold."""
    idle = [replica for replica in candidates if loads[replica.url] <= 0]
    if idle:
        return min(idle, key=lambda replica: (missing[replica.url], rng.random()))
    weight = settings.recompute_weight
    return min(candidates, key=lambda replica: (loads[replica.url] + weight * missing[replica.url], rng.random()))


class Pick(NamedTuple):
    replica: Replica
    decision: str  # why, for llm_gateway_balancing_decisions_total


class BalancingPolicy(Protocol):
    """The pick step: one replica among the available candidates of a pool, and why. A new policy is a
    new class here and a name in `policy_named` (and in `config.BalancingPolicyName`); nothing else
    changes. `prefix` is the prompt's block hashes (prefix.py), given only to `cache_aware` engines."""

    name: str

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float, prefix: Blocks | None) -> Pick: ...


class LeastExpectedWaitOfTwo:
    """The better of two replicas picked at random ("power of two choices"): it avoids the herd that
    always-least-loaded causes."""

    name = "power_of_two"

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float, prefix: Blocks | None) -> Pick:
        return Pick(pick_least_loaded_of_two(candidates, now=now), "least_loaded")


class RoundRobin:
    name = "round_robin"

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float, prefix: Blocks | None) -> Pick:
        return Pick(pick_in_turn(candidates, pool), "in_turn")


class CacheAware:
    """The replica that was sent the longest part of this prompt's prefix (its cache likely holds it),
    unless that replica is overloaded next to the least loaded one (`bound_load`); then an idle replica,
    or the one where the request costs least counting what it would compute again (`relieve`), which may
    still be the preferred one. When no replica holds enough of the prompt (`min_match`), the least
    loaded. Either way the chosen replica is recorded as holding the prompt's blocks, so a hot prefix that
    overflows its replica spreads to a few (up to `prefix.HOLDERS_PER_BLOCK`), and the least loaded of
    those is preferred from then on.

    One per engine: the table is the engine's (kept across reloads by the replica registry)."""

    name = "cache_aware"

    def __init__(self, table: PrefixTable, settings: CacheAwareSettings) -> None:
        self.table = table
        self.settings = settings

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float, prefix: Blocks | None) -> Pick:
        if not prefix:  # no prompt text to follow (embeddings, say)
            return Pick(pick_least_loaded_of_two(candidates, now=now), "no_prefix")
        by_url = {replica.url: replica for replica in candidates}
        depth, holders = self.table.match(prefix, by_url)
        if not depth or depth < self.settings.min_match * len(prefix):
            pick = Pick(least_loaded(candidates, now), "prefix_miss")
        else:
            loads = {replica.url: replica.load(now) for replica in candidates}
            preferred = by_url[min(holders, key=loads.__getitem__)]
            pick = self.bound_load(candidates, loads, prefix, depth, preferred)
        self.table.record(prefix, pick.replica.url)
        return pick

    def bound_load(
        self, candidates: Sequence[Replica], loads: dict[str, float], prefix: Blocks, depth: int, preferred: Replica
    ) -> Pick:
        """`preferred` (holding `depth` blocks of the prompt) unless it is overloaded. A request whose prompt
        is matched past the part shared with other prompts, and goes on with blocks of its own (a later turn
        of a conversation: its history, then the new messages), is held to the larger
        `history_abs_threshold`: moving it would compute its whole history again, delaying it and those
        queued behind it, for no later request's gain. A new conversation on a shared system prompt, or a
        prompt sent again whole, moves at `balance_abs_threshold`: computed on another replica, it serves
        the requests that follow there."""
        settings = self.settings
        load, lowest, relative = loads[preferred.url], min(loads.values()), settings.balance_rel_threshold
        if not overloaded(load, lowest, settings.balance_abs_threshold, relative):
            return Pick(preferred, "prefix_hit")
        if self.table.shared_depth(prefix) < depth < len(prefix) and not overloaded(
            load, lowest, settings.history_abs_threshold, relative
        ):
            return Pick(preferred, "history_kept")
        depths = self.table.depths(prefix, loads)
        missing = {url: len(prefix) - depths.get(url, 0) for url in loads}
        chosen = relieve(candidates, loads, missing, settings)
        return Pick(chosen, "load_override" if chosen is not preferred else "load_kept")


POWER_OF_TWO = LeastExpectedWaitOfTwo()
ROUND_ROBIN = RoundRobin()


def policy_named(
    name: str, table: PrefixTable | None = None, settings: CacheAwareSettings | None = None
) -> BalancingPolicy:
    """An engine's policy: the shared stateless ones, or a cache-aware one over the engine's table."""
    if name == "cache_aware":
        if table is None:
            raise ValueError("cache_aware balancing needs the engine's prefix table")
        return CacheAware(table, settings or CacheAwareSettings())
    return ROUND_ROBIN if name == "round_robin" else POWER_OF_TWO


def pick_replica(
    pool: ReplicaPool,
    now: float,
    policy: BalancingPolicy = POWER_OF_TWO,
    affinity_key: str | None = None,
    prefix: Blocks | None = None,
    exclude: Sequence[Replica] = (),
    holders: frozenset[str] | None = None,
) -> Pick | None:
    """Filter, then pick: by affinity when the request has a key, else by the engine's policy. `holders`:
    for a discovered adapter, the URLs of the replicas that list it."""
    candidates = available(pool.replicas, now, exclude, holders)
    if not candidates:
        return None
    if affinity_key:
        return Pick(pick_by_affinity(candidates, affinity_key), "affinity")
    return policy.pick(candidates, pool, now, prefix)


def choose(
    pool: ReplicaPool, now: float, affinity_key: str | None = None, exclude: Sequence[Replica] = ()
) -> Replica | None:
    """The replica alone, by the less loaded of two, for what is not a client's request (the catalog)."""
    pick = pick_replica(pool, now, POWER_OF_TWO, affinity_key, None, exclude)
    return pick.replica if pick is not None else None
