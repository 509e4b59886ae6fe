"""Choosing the replica for one request, as small steps that can be tested alone: filter, score, pick.

- filter: endpoints that are healthy and not ejected (when none is, the one whose ejection ends first,
  so that a fully failing engine is still tried rather than refused outright);
- score: requests outstanding from this gateway, weighted by the replica's recent time to first byte
  (lower is better), so that an idle slow replica does not tie with an idle fast one;
- pick: with an affinity key, rendezvous hashing over the candidates (the same key keeps its replica
  while that replica stays healthy); otherwise the better of two picked at random ("power of two
  choices"), which avoids the herd that always-least-loaded causes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from gateway_app.endpoints import Endpoint, EndpointPool


def available(endpoints: Sequence[Endpoint], now: float, exclude: Sequence[Endpoint] = ()) -> list[Endpoint]:
    candidates = [e for e in endpoints if e.available(now) and e not in exclude]
    if candidates:
        return candidates
    rest = [e for e in endpoints if e not in exclude]
    return [min(rest, key=lambda e: (not e.healthy, e.ejected_until))] if rest else []


def score(endpoint: Endpoint, now: float) -> float:
    """Expected wait: (requests ahead + this one) x recent time to first byte; plain load when unknown."""
    latency = endpoint.expected_latency(now)
    return (endpoint.outstanding + 1) * latency if latency else float(endpoint.outstanding)


_RNG = random.Random()


def pick_least_loaded_of_two(candidates: Sequence[Endpoint], rng: random.Random = _RNG, now: float = 0.0) -> Endpoint:
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(candidates, 2)
    return first if score(first, now) <= score(second, now) else second


def pick_by_affinity(candidates: Sequence[Endpoint], key: str) -> Endpoint:
    """Rendezvous hashing: the highest hash of (key, url) wins; removing one replica moves only its keys."""
    return max(candidates, key=lambda e: hashlib.blake2b(f"{key}|{e.url}".encode(), digest_size=8).digest())


def pick_in_turn(candidates: Sequence[Endpoint], pool: EndpointPool) -> Endpoint:
    """Plain rotation, what a Service does per connection: the baseline the benchmark compares with."""
    pool.turn += 1
    return candidates[pool.turn % len(candidates)]


def choose(
    pool: EndpointPool,
    now: float,
    affinity_key: str | None = None,
    exclude: Sequence[Endpoint] = (),
    policy: str = "power_of_two",
) -> Endpoint | None:
    candidates = available(pool.endpoints, now, exclude)
    if not candidates:
        return None
    if affinity_key:
        return pick_by_affinity(candidates, affinity_key)
    if policy == "round_robin":
        return pick_in_turn(candidates, pool)
    return pick_least_loaded_of_two(candidates, now=now)
