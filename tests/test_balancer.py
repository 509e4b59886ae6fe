"""The replica choice, step by step (filter, score, pick), on plain endpoint objects."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from gateway_app.balancer import ROUND_ROBIN, available, pick_by_affinity, pick_least_loaded_of_two, pick_replica
from gateway_app.config import HealthSettings
from gateway_app.replicas import Replica as Endpoint
from gateway_app.replicas import ReplicaPool as EndpointPool


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(f"http://10.0.0.{i}:8000") for i in range(count)]


def test_filter_leaves_out_unhealthy_and_ejected_replicas():
    a, b, c = endpoints(3)
    b.healthy = False
    c.failed(HealthSettings(ejection_base=30))
    assert available([a, b, c], now=c.ejected_until - 1) == [a]
    assert set(available([a, b, c], now=c.ejected_until + 1)) == {a, c}  # the cool-down ends


def test_filter_falls_back_to_the_replica_back_soonest_when_all_are_out():
    a, b = endpoints(2)
    a.failed(HealthSettings(ejection_base=50))
    b.failed(HealthSettings(ejection_base=5))
    assert available([a, b], now=b.ejected_until - 1) == [b]


def test_ejection_grows_while_failures_continue_and_ends_on_success():
    import time

    (a,) = endpoints(1)
    settings = HealthSettings(ejection_base=1, ejection_max=8)
    cool_downs = []
    for _ in range(5):
        a.failed(settings)
        cool_downs.append(round(a.ejected_until - time.monotonic()))
    assert cool_downs == [1, 2, 4, 8, 8]
    a.succeeded()
    assert a.failures == 0 and a.ejected_until == 0


def test_power_of_two_never_picks_the_busier_of_its_two():
    a, b = endpoints(2)
    a.outstanding, b.outstanding = 5, 0
    assert all(pick_least_loaded_of_two([a, b], random.Random(seed)) is b for seed in range(50))


def test_power_of_two_spreads_equal_load():
    replicas = endpoints(4)
    rng = random.Random(1)
    counts = Counter(pick_least_loaded_of_two(replicas, rng).url for _ in range(4000))
    assert min(counts.values()) > 700


def test_affinity_is_stable_and_moves_only_the_keys_of_a_lost_replica():
    replicas = endpoints(4)
    keys = [f"user-{i}" for i in range(200)]
    before = {key: pick_by_affinity(replicas, key) for key in keys}
    assert all(pick_by_affinity(replicas, key) is before[key] for key in keys)
    lost = replicas[1]
    after = {key: pick_by_affinity([r for r in replicas if r is not lost], key) for key in keys}
    moved = [key for key in keys if after[key] is not before[key]]
    assert moved and all(before[key] is lost for key in moved)


def test_round_robin_rotates():
    pool = EndpointPool(tuple(endpoints(3)))
    picks = [pick_replica(pool, 0, ROUND_ROBIN).replica.url for _ in range(6)]
    assert picks[:3] == picks[3:] and len(set(picks)) == 3


def test_an_idle_slow_replica_loses_to_an_idle_fast_one():
    fast, slow = endpoints(2)
    fast.observe_latency(0.005, now=100)
    slow.observe_latency(0.200, now=100)
    assert all(pick_least_loaded_of_two([fast, slow], random.Random(seed), now=101) is fast for seed in range(20))
    fast.outstanding = 50  # but not when the fast one is swamped
    assert pick_least_loaded_of_two([fast, slow], random.Random(0), now=101) is slow


def test_a_replica_not_heard_from_lately_gets_tried_again():
    fast, slow = endpoints(2)
    fast.observe_latency(0.005, now=100)
    slow.observe_latency(0.200, now=100)
    fast.observe_latency(0.005, now=200)  # the slow one's average is stale by now
    assert pick_least_loaded_of_two([fast, slow], random.Random(0), now=201) is slow


def test_thousands_of_failures_in_a_row_keep_the_longest_cool_down():
    """2 ** 1100 does not fit in a float: the ejection must still be computed (it was an OverflowError,
    a 500 for every request to an engine that had failed that often)."""
    endpoint = Endpoint("http://replica:8000")
    settings = HealthSettings(ejection_base=1, ejection_max=60)
    for _ in range(5000):
        endpoint.failed(settings)
    assert 0 < endpoint.ejected_until - time.monotonic() <= 60


def test_the_engines_own_queue_counts_while_its_reading_is_fresh():
    idle_here, busy_elsewhere = endpoints(2)
    busy_elsewhere.engine_reported(running=6, waiting=3, kv_cache_usage=0.5, until=100)
    assert busy_elsewhere.load(now=50) == 6 + 3 + 3  # running and waiting, waiting once more
    assert pick_least_loaded_of_two([idle_here, busy_elsewhere], random.Random(0), now=50) is idle_here
    assert busy_elsewhere.load(now=100) == 0  # stale: only what this gateway sent it
    busy_elsewhere.outstanding = 20  # more than the engine said: this gateway's own count wins
    assert busy_elsewhere.load(now=50) == 20 + 3


def test_a_full_kv_cache_adds_up_to_its_penalty():
    (replica,) = endpoints(1)
    replica.engine_reported(running=0, waiting=0, kv_cache_usage=0.95, until=100)
    assert replica.load(now=0) == pytest.approx(Endpoint.KV_CACHE_PENALTY / 2)
    replica.engine_reported(running=0, waiting=0, kv_cache_usage=1.0, until=100)
    assert replica.load(now=0) == Endpoint.KV_CACHE_PENALTY
