"""Choosing the replica for one request, as small steps that can be tested alone: filter, score, pick.

- filter: replicas that are healthy and not ejected (when none is, the one whose ejection ends first,
  so that a fully failing engine is still tried rather than refused outright);
- score: requests outstanding from this gateway, weighted by the replica's recent time to first byte
  (lower is better), so that an idle slow replica does not tie with an idle fast one;
- pick: with an affinity key, rendezvous hashing over the candidates (the same key keeps its replica
  while that replica stays healthy); otherwise the better of two picked at random ("power of two
  choices"), which avoids the herd that always-least-loaded causes; or plain rotation. Policies live
  behind `BalancingPolicy`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Protocol

from gateway_app.replicas import Replica, ReplicaPool


def available(replicas: Sequence[Replica], now: float, exclude: Sequence[Replica] = ()) -> list[Replica]:
    candidates = [r for r in replicas if r.available(now) and r not in exclude]
    if candidates:
        return candidates
    rest = [r for r in replicas if r not in exclude]
    return [min(rest, key=lambda r: (not r.healthy, r.ejected_until))] if rest else []


def score(replica: Replica, now: float) -> float:
    """Expected wait: (requests ahead + this one) x recent time to first byte; plain load when unknown."""
    latency = replica.expected_latency(now)
    return (replica.outstanding + 1) * latency if latency else float(replica.outstanding)


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


class BalancingPolicy(Protocol):
    """The pick step: one replica among the available candidates of a pool. A new policy is a new class
    here and a name in `POLICIES` (and in `Settings.balancing`); nothing else changes."""

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float) -> Replica: ...


class LeastExpectedWaitOfTwo:
    """The better of two replicas picked at random ("power of two choices"): it avoids the herd that
    always-least-loaded causes."""

    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float) -> Replica:
        return pick_least_loaded_of_two(candidates, now=now)


class RoundRobin:
    def pick(self, candidates: Sequence[Replica], pool: ReplicaPool, now: float) -> Replica:
        return pick_in_turn(candidates, pool)


POLICIES: dict[str, BalancingPolicy] = {"power_of_two": LeastExpectedWaitOfTwo(), "round_robin": RoundRobin()}


def choose(
    pool: ReplicaPool,
    now: float,
    affinity_key: str | None = None,
    exclude: Sequence[Replica] = (),
    policy: str = "power_of_two",
) -> Replica | None:
    """Filter, then pick: by affinity when the request has a key, else by the policy."""
    candidates = available(pool.replicas, now, exclude)
    if not candidates:
        return None
    if affinity_key:
        return pick_by_affinity(candidates, affinity_key)
    return POLICIES[policy].pick(candidates, pool, now)
