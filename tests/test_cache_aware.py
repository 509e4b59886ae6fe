"""Cache-aware balancing and the engines' own load: prompt blocks, the prefix table and the pick as pure
functions; then real gateways in front of simulators and stand-ins on loopback."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from gateway_app.balancer import CacheAware, pick_replica
from gateway_app.config import CacheAwareSettings
from gateway_app.engine_load import parse_engine_load
from gateway_app.prefix import BLOCK_CHARS, HOLDERS_PER_BLOCK, MAX_BLOCKS, PrefixTable, prefix_blocks
from gateway_app.replicas import Replica, ReplicaPool
from tests.background_server import BackgroundServer
from tests.recording_engine import FIXED_ANSWER
from tests.routes import write_routing_map
from tests.support import RunningProcess
from tests.web import get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"


def system_prompt(topic: str) -> str:
    return f"You answer questions about {topic}. " + "Be precise and cite the manual. " * 40  # ~1.3 KB


def turns(topic: str, count: int, asker: str = "") -> list[list[dict]]:
    """The message lists of a growing conversation, one per turn (`asker`: whose, on the same system prompt)."""
    messages = [{"role": "system", "content": system_prompt(topic)}]
    conversation = []
    for turn in range(count):
        question = f"{asker}Question {turn} about {topic}? " + "Some context for it. " * 20
        messages = [*messages, {"role": "user", "content": question}]
        conversation.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"Answer {turn}. " * 20}]
    return conversation


# Prompt blocks


def test_a_conversations_next_turn_starts_with_the_blocks_of_the_previous_one():
    first, second = (prefix_blocks({"messages": m}) for m in turns("tides", 2))
    full = len(first) - 1  # the last block of the first turn is partial
    assert full >= 4 and second[:full] == first[:full] and len(second) > len(first)


def test_different_system_prompts_differ_from_the_first_block():
    a = prefix_blocks({"messages": turns("tides", 1)[0]})
    b = prefix_blocks({"messages": turns("winds", 1)[0]})
    assert a[0] != b[0]


def test_text_parts_count_and_other_parts_do_not():
    plain = {"messages": [{"role": "user", "content": "x" * 600}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}] + [
        {"type": "text", "text": "x" * 300}, {"type": "text", "text": "x" * 300}]}]}  # fmt: skip
    assert prefix_blocks(plain) == prefix_blocks(parts)


def test_a_plain_chat_reads_as_the_general_path_reads_it():
    def as_parts(chat: list[dict]) -> list[dict]:  # the same text as content parts: the general path only
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in chat]

    chat = [{"role": "system", "content": "s" * 700}, {"role": "user", "content": "u" * 300}]
    assert prefix_blocks({"messages": chat}) == prefix_blocks({"messages": as_parts(chat)})
    long = [{"role": "user", "content": "z" * BLOCK_CHARS * MAX_BLOCKS}, {"role": "user", "content": "q"}]
    assert prefix_blocks({"messages": long}) == prefix_blocks({"messages": as_parts(long)})
    assert len(prefix_blocks({"messages": long})) == MAX_BLOCKS


def test_completion_prompts_and_caps():
    assert len(prefix_blocks({"prompt": "y" * (BLOCK_CHARS * 2 + 1)})) == 3
    assert len(prefix_blocks({"prompt": "y" * BLOCK_CHARS * (MAX_BLOCKS + 50)})) == MAX_BLOCKS
    assert prefix_blocks({"input": [1, 2]}) == () and prefix_blocks({}) == ()


# The prefix table


def test_the_deepest_held_block_decides_among_available_replicas():
    table = PrefixTable(1000)
    short, long = (1, 2), (1, 2, 3, 4)
    table.record(short, "a")
    table.record(long, "b")
    assert table.match((1, 2, 3, 4, 5), {"a", "b"}) == (4, ["b"])
    assert table.match((1, 2, 3, 4, 5), {"a"}) == (2, ["a"])  # b is gone: a holds the first two
    assert table.match((9,), {"a", "b"}) == (0, [])


def test_a_block_keeps_its_latest_holders_and_old_blocks_are_forgotten():
    table = PrefixTable(1000)
    for url in ("a", "b", "c", "d"):
        table.record((1,), url)
    assert table.match((1,), {"a", "b", "c", "d"}) == (1, ["b", "c", "d"][-HOLDERS_PER_BLOCK:])
    small = PrefixTable(1000)
    small.record((-1, -2, -3, -9), "a")
    small.record((-1, -2, -4, -9), "a")
    assert small.shared_depth((-1, -2, -5, -9)) == 2
    for block in range(1500):
        small.record((block,), "a")
    assert len(small) == 1000 and small.match((0,), {"a"}) == (0, []) and small.match((1499,), {"a"})[0] == 1
    assert small.shared_depth((-1, -2, -5, -9)) == 0  # where prompts went on differently is forgotten too


def test_each_replica_holds_the_prompt_as_deep_as_its_unbroken_run_of_blocks():
    table = PrefixTable(1000)
    table.record((1, 2, 3, 4), "a")
    table.record((1, 2, 3, 4, 5, 6), "c")
    table.record((1,), "b")
    table.record((3, 4), "b")  # b holds 3 and 4 but not 2: its run of this prompt ends at 1
    assert table.depths((1, 2, 3, 4, 5), {"a", "b", "c"}) == {"a": 4, "b": 1, "c": 5}
    assert table.depths((1, 2, 3, 4, 5), {"a", "b"}) == {"a": 4, "b": 1}
    assert table.depths((7, 1), {"a", "b", "c"}) == {}


def test_prompts_share_the_system_prompt_they_go_on_from_differently_and_not_one_conversations_history():
    table = PrefixTable(1000)
    ann, bob = turns("tides", 3, "Ann: "), turns("tides", 3, "Bob: ")
    system = len(prefix_blocks({"messages": ann[0][:1]})) - 1  # the system prompt's full blocks
    for messages in ann:  # one conversation alone: nothing shared yet, however many turns
        blocks = prefix_blocks({"messages": messages})
        assert table.shared_depth(blocks) == 0
        table.record(blocks, "a")
    bob_first = prefix_blocks({"messages": bob[0]})
    assert table.shared_depth(bob_first) == system  # it leaves Ann's path after the system prompt
    table.record(bob_first, "b")
    later = prefix_blocks({"messages": ann[2]})
    assert table.shared_depth(later) == system  # Ann's own history past it is followed by Ann alone
    assert table.match(later, {"a", "b"})[0] > system


def test_short_questions_on_one_system_prompt_share_it_and_a_later_turn_still_goes_on_alone():
    table = PrefixTable(1000)
    system = [{"role": "system", "content": system_prompt("tides")}]

    def short(asker: str) -> tuple[int, ...]:  # a question that ends in the block after the system prompt
        return prefix_blocks({"messages": [*system, {"role": "user", "content": f"{asker}: when?"}]})

    ann, bob, cy = short("Ann"), short("Bob"), short("Cy")
    full = len(ann) - 1  # the system prompt's blocks up to the one the question ends in
    table.record(ann, "a")
    assert table.shared_depth(ann) == 0  # the same prompt again: it parted from nothing
    assert table.shared_depth(bob) == full  # ends differently right after the same block: a new conversation
    table.record(bob, "a")
    assert table.shared_depth(cy) == full
    history = [*system, {"role": "user", "content": "Ann: when?"}, {"role": "assistant", "content": "At noon. " * 60}]
    later = prefix_blocks({"messages": [*history, {"role": "user", "content": "Ann: and then?"}]})
    table.record(later, "a")
    assert table.match(later, {"a"})[0] == len(later) and table.shared_depth(later) == full
    # Prompts of two blocks parting after the first (an instruction, then a short input): it is shared.
    two = PrefixTable(1000)
    two.record((1, 2), "a")
    two.record((1, 3), "a")
    assert two.shared_depth((1, 4)) == 1 and two.shared_depth((1, 2)) == 1


def test_an_overloaded_replica_moves_a_new_short_question_on_its_system_prompt():
    pool = replicas(2)
    home, idle = pool.replicas
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings())
    system = [{"role": "system", "content": system_prompt("tides")}]
    for asker in ("Ann", "Bob"):
        held_by(policy, prefix_blocks({"messages": [*system, {"role": "user", "content": f"{asker}: when?"}]}), home)
    home.outstanding = 15
    cy = prefix_blocks({"messages": [*system, {"role": "user", "content": "Cy: when?"}]})
    assert pick_replica(pool, 0, policy, prefix=cy) == (idle, "load_override")


# The cache-aware pick


def replicas(count: int) -> ReplicaPool:
    return ReplicaPool(tuple(Replica(f"http://10.0.0.{i}:8000") for i in range(count)))


def test_a_known_prefix_returns_to_its_replica_until_that_one_is_overloaded():
    pool = replicas(4)
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(balance_abs_threshold=2, balance_rel_threshold=1.5))
    blocks = prefix_blocks({"messages": turns("tides", 1)[0]})
    first = pick_replica(pool, 0, policy, prefix=blocks)
    assert first is not None and first.decision == "prefix_miss"
    home = first.replica
    for outstanding in range(3):  # up to min + 2: still its replica
        home.outstanding = outstanding
        pick = pick_replica(pool, 0, policy, prefix=blocks)
        assert pick is not None and pick == (home, "prefix_hit")
    home.outstanding = 3
    spill = pick_replica(pool, 0, policy, prefix=blocks)
    assert spill is not None and spill.decision == "load_override" and spill.replica is not home
    # Both hold it now; the less loaded of them is preferred.
    again = pick_replica(pool, 0, policy, prefix=blocks)
    assert again == (spill.replica, "prefix_hit")


def held_by(policy: CacheAware, blocks: tuple[int, ...], *homes: Replica) -> None:
    for home in homes:
        policy.table.record(blocks, home.url)


def test_an_overloaded_replica_keeps_a_request_that_would_be_computed_again_from_scratch_elsewhere():
    pool = replicas(3)
    home, light, lighter = pool.replicas
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(recompute_weight=0.2))
    conversation = tuple(range(40))  # a long history only its replica holds: 40 blocks to compute again
    held_by(policy, conversation, home)
    home.outstanding, light.outstanding, lighter.outstanding = 9, 2, 2
    # Overloaded (9 > 2 + 4 and > 1.5 x 2), but 9 < 2 + 0.2 x 40: moving costs more than it saves.
    assert pick_replica(pool, 0, policy, prefix=conversation) == (home, "load_kept")
    home.outstanding = 11  # now 11 > 2 + 8: the lighter replicas are worth it, the least loaded first
    lighter.outstanding = 1
    assert pick_replica(pool, 0, policy, prefix=conversation) == (lighter, "load_override")


def test_an_overloaded_replicas_request_moves_to_a_lighter_one_holding_most_of_its_prompt():
    pool = replicas(3)
    home, partial, empty = pool.replicas
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(recompute_weight=0.2))
    system, turn = tuple(range(30)), tuple(range(40))  # the system prompt, then a conversation on it
    held_by(policy, system, partial)
    held_by(policy, turn, home)
    home.outstanding, partial.outstanding, empty.outstanding = 8, 2, 1
    # partial lacks 10 blocks (2 + 2 = 4), empty all 40 (1 + 8 = 9), staying costs 8: partial, though busier.
    assert pick_replica(pool, 0, policy, prefix=turn) == (partial, "load_override")


def test_an_idle_replica_takes_an_overloaded_replicas_request_whatever_it_must_compute():
    pool = replicas(3)
    home, busy, idle = pool.replicas
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(recompute_weight=1.0))
    hot = tuple(range(40))
    held_by(policy, hot, busy, home)
    home.outstanding, busy.outstanding, idle.outstanding = 5, 5, 0
    # A hot prefix spreads to a replica with nothing to do, however costly by the weight (5 < 0 + 40).
    assert pick_replica(pool, 0, policy, prefix=hot) == (idle, "load_override")
    assert policy.table.depths(hot, {r.url: r for r in pool.replicas})[idle.url] == len(hot)


def test_an_overloaded_replica_keeps_its_conversations_later_turns_and_moves_new_ones():
    pool = replicas(3)
    home, light, idle = pool.replicas
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(history_abs_threshold=8))
    ann, bob, cy = (turns("tides", 2, asker) for asker in ("Ann: ", "Bob: ", "Cy: "))
    for messages in (*ann, bob[0]):  # two conversations on one system prompt, sent to one replica
        held_by(policy, prefix_blocks({"messages": messages}), home)
    home.outstanding, light.outstanding, idle.outstanding = 8, 2, 0  # overloaded: 8 > 0 + 4 and > 1.5 x 0
    # Bob's second turn would compute his history again anywhere else: it stays, even with a replica idle.
    assert pick_replica(pool, 0, policy, prefix=prefix_blocks({"messages": bob[1]})) == (home, "history_kept")
    # A new conversation on the system prompt goes to the idle replica, which then holds the prompt too.
    assert pick_replica(pool, 0, policy, prefix=prefix_blocks({"messages": cy[0]})) == (idle, "load_override")
    # Past history_abs_threshold (9 > 0 + 8) a later turn moves as well.
    home.outstanding = 9
    assert pick_replica(pool, 0, policy, prefix=prefix_blocks({"messages": bob[1]})) == (idle, "load_override")


def test_a_small_shared_part_of_a_prompt_is_not_followed():
    pool = replicas(4)
    policy = CacheAware(PrefixTable(1000), CacheAwareSettings(min_match=0.5))
    common = "Shared preamble. " * 16  # one block
    policy.pick(pool.replicas, pool, 0, prefix_blocks({"prompt": common + "a" * 2000}))
    pick = policy.pick(pool.replicas, pool, 0, prefix_blocks({"prompt": common + "b" * 2000}))
    assert pick.decision == "prefix_miss"
    assert policy.pick(pool.replicas, pool, 0, None).decision == "no_prefix"


# Reading the engines' metrics

VLLM_TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
"""
SGLANG_TEXT = b"""# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 5
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 1
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.9
"""


def test_engine_load_is_read_from_vllm_and_sglang_text():
    vllm = parse_engine_load(VLLM_TEXT)
    assert vllm is not None and (vllm.running, vllm.waiting, vllm.kv_cache_usage) == (5, 4, 0.5)
    sglang = parse_engine_load(SGLANG_TEXT)
    assert sglang is not None and (sglang.running, sglang.waiting, sglang.kv_cache_usage) == (5, 1, 0.9)
    assert parse_engine_load(FIXED_ANSWER) is None
    assert parse_engine_load(b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n") is None


# Real gateways


def replica_counts(sims: list[RunningProcess]) -> list[float]:
    """Requests each simulator has finished, from its own metrics."""
    return [
        metric_value(get(sim.url + "/metrics").body.decode(), "vllm:e2e_request_latency_seconds_count") for sim in sims
    ]


def cache_aware_gateway(processes, tmp_path, urls: list[str], **settings: object) -> RunningProcess:
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": urls, "balancing": "cache_aware"}],
        settings=settings or None,
    )
    return processes.gateway(config)


def test_each_conversation_stays_on_one_replica(processes, tmp_path):
    sims = [processes.simulator("vllm", "m") for _ in range(4)]
    gateway = cache_aware_gateway(processes, tmp_path, [s.url for s in sims])
    homes = set()
    for topic in ("tides", "winds", "rocks", "stars", "roots", "bees"):
        before = replica_counts(sims)
        for messages in turns(topic, 4):
            assert post(gateway.url + CHAT, {"model": "m", "messages": messages, "max_tokens": 4}).status == 200
        served = [after - b for after, b in zip(replica_counts(sims), before, strict=True)]
        assert sorted(served) == [0, 0, 0, 4], (topic, served)
        homes.add(served.index(4))
    assert len(homes) > 1  # the conversations themselves spread
    metrics = get(gateway.url + "/metrics").body.decode()
    decisions = lambda kind: metric_value(  # noqa: E731
        metrics, "llm_gateway_balancing_decisions_total", engine="e", policy="cache_aware", decision=kind
    )
    assert decisions("prefix_hit") == 18 and decisions("prefix_miss") == 6
    assert metric_value(metrics, "llm_gateway_engine_balancing", engine="e", policy="cache_aware") == 1


def test_a_hot_prefix_spreads_when_its_replica_is_busy(processes, tmp_path):
    sims = [processes.simulator("vllm", "m", ttft_ms=300) for _ in range(4)]
    gateway = cache_aware_gateway(processes, tmp_path, [s.url for s in sims])
    hot = {"model": "m", "messages": turns("tides", 1)[0], "max_tokens": 4}
    before = replica_counts(sims)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: post(gateway.url + CHAT, hot).status, range(48)))
    assert statuses == [200] * 48
    served = [after - b for after, b in zip(replica_counts(sims), before, strict=True)]
    assert sum(served) == 48 and sum(1 for count in served if count) >= 3, served
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_balancing_decisions_total", decision="load_override") > 0


class BusyEngine:
    """An engine stand-in whose /metrics report a queue: what a loaded vLLM shows to other gateways."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.chats = 0
        self.scrapes = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m"} 8\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="m"} 0.95\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.Response:
        self.chats += 1
        return web.Response(body=FIXED_ANSWER, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def start(self) -> BusyEngine:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_post(CHAT, self._chat)
        app.router.add_post("/v1/completions", self._chat)
        self._server = BackgroundServer(app).start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()


def test_the_engines_own_queue_is_read_shown_and_steers(processes, tmp_path):
    busy = processes.add(BusyEngine(waiting=7).start())
    idle = processes.simulator("vllm", "m")
    gateway = cache_aware_gateway(processes, tmp_path, [busy.url, idle.url], engine_metrics={"interval": 0.2})

    def load(url: str, kind: str) -> float:
        metrics = get(gateway.url + "/metrics").body.decode()
        return metric_value(metrics, "llm_gateway_engine_load", engine="e", endpoint=url, kind=kind)

    wait_for(lambda: load(busy.url, "waiting") == 7, message="the busy engine's queue read")
    assert load(busy.url, "running") == 8 and load(busy.url, "kv_cache_usage") == 0.95
    read = lambda url: metric_value(  # noqa: E731
        get(gateway.url + "/metrics").body.decode(), "llm_gateway_engine_metrics_read", engine="e", endpoint=url
    )
    wait_for(lambda: read(idle.url) == 1, message="the simulator's metrics read")
    rng = random.Random(3)
    for _ in range(20):  # distinct prompts: no prefix to follow, so the lighter replica wins every time
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(600))
        assert post(gateway.url + "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 2}).status == 200
    assert busy.chats == 0


def test_an_engine_without_metrics_is_marked_and_left_alone(processes, tmp_path):
    plain = processes.recording_engine()  # answers /metrics with JSON, as an engine without metrics might
    gateway = cache_aware_gateway(processes, tmp_path, [plain.url], engine_metrics={"interval": 0.1})
    read = lambda: metric_value(  # noqa: E731
        get(gateway.url + "/metrics").body.decode(), "llm_gateway_engine_metrics_read", engine="e", endpoint=plain.url
    )
    scrapes = lambda: sum(1 for r in plain.received if r.path == "/metrics")  # noqa: E731
    wait_for(lambda: scrapes() >= 1, message="the first read")
    time.sleep(1.0)  # ten intervals
    assert scrapes() == 1 and read() == 0
    assert post(gateway.url + CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status == 200


@pytest.mark.parametrize("balancing", ["power_of_two", "round_robin"])
def test_other_policies_do_not_read_engine_metrics_by_default(processes, tmp_path, balancing):
    plain = processes.recording_engine()
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [plain.url], "balancing": balancing}],
        settings={"engine_metrics": {"interval": 0.1}},
    )
    gateway = processes.gateway(config)
    assert post(gateway.url + CHAT, {"model": "m"}).status == 200
    time.sleep(0.5)
    assert not any(r.path == "/metrics" for r in plain.received)


def test_any_shape_of_body_gives_bounded_blocks_and_never_fails():
    """Odd but valid bodies: no exception, and no more than MAX_BLOCKS blocks however large the body."""
    odd = [
        {"messages": None},
        {"messages": "plain"},
        {"messages": [None, 5, "x", [1]]},
        {"messages": [{"role": None, "content": [{"type": "image_url"}, {"text": None}, {"text": 5}]}]},
        {"instructions": 5, "input": 7},
        {"messages": [{"role": "user", "content": ""}] * 100_000},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 100_000}]},
    ]
    for document in odd:
        assert len(prefix_blocks(document)) <= MAX_BLOCKS


def test_list_prompts_and_token_ids_have_a_prefix():
    strings = prefix_blocks({"prompt": ["a" * 600, "b" * 600]})
    assert strings == prefix_blocks({"prompt": "a" * 600})  # a batch: its first prompt decides
    ids = prefix_blocks({"prompt": list(range(400))})
    assert ids and ids[:1] == prefix_blocks({"prompt": list(range(400)) + [7]})[:1]
    assert prefix_blocks({"prompt": [list(range(400)), [1, 2]]}) == ids


def test_a_broken_engine_reading_is_no_reading():
    """NaN or negative values would make a replica look idlest of all (NaN never compares)."""
    assert parse_engine_load(b"vllm:num_requests_waiting NaN\nvllm:num_requests_running -5\n") is None
    load = parse_engine_load(b"vllm:num_requests_waiting 3\nvllm:num_requests_running +Inf\n")
    assert load is not None and load.waiting == 3 and load.running == 0
