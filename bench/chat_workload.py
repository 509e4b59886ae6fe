"""A chat workload: conversations whose history grows, over shared system prompts, arriving open-loop.

`plan_workload` turns a shape and a seed into the same conversations every time: when each starts (a
Poisson process), which system prompt it has, its user messages and its think times. `run_workload` plays
a plan against one base URL: each conversation is a task that starts at its arrival time and sends its
turns one after the other (streaming chat completions with usage), each turn carrying the system prompt,
the history so far (the engine's own previous answers) and a new user message.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, replace

import aiohttp

CHARS_PER_TOKEN = 4  # synthetic text is sized in characters; engines count about 4 per token
_WORDS = (
    "the of and to in is for on that with as by at from this be or are an it not have which one all can "
    "model cache token prefix replica request answer system user policy route engine batch queue latency "
    "memory block tree hash window stream prompt history turn context reply agent tool plan step check"
).split()


@dataclass(frozen=True)
class WorkloadShape:
    """What a workload looks like; sizes in tokens (about CHARS_PER_TOKEN characters each)."""

    name: str
    system_prompts: int  # distinct shared prompts; 0: every conversation has its own
    system_prompt_tokens: tuple[int, int]  # uniform range
    turns: tuple[int, int]  # uniform range, inclusive
    first_message_tokens: tuple[int, int]
    message_tokens: tuple[int, int]  # later user messages
    think_time_s: float  # mean of an exponential pause between an answer and the next turn
    max_tokens: int  # of each answer


@dataclass(frozen=True)
class Conversation:
    number: int
    arrival_s: float  # after the start of the run
    system_prompt: int  # index into WorkloadPlan.system_prompts
    user_messages: tuple[str, ...]  # one per turn
    think_times_s: tuple[float, ...]  # before turns 2..n


@dataclass(frozen=True)
class WorkloadPlan:
    shape: WorkloadShape
    conversations_per_s: float
    duration_s: float  # conversations arrive during this window
    system_prompts: tuple[str, ...]
    conversations: tuple[Conversation, ...]

    @property
    def requests(self) -> int:
        return sum(len(c.user_messages) for c in self.conversations)


@dataclass(frozen=True)
class TurnSample:
    conversation: int
    turn: int  # 1-based
    system_prompt: int
    sent_s: float  # after the start of the run
    ok: bool
    latency_s: float
    ttft_s: float | None  # to the first chunk that carries answer text
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the engine sends it
    completion_tokens: int | None = None
    error: str | None = None


def synthetic_text(rng: random.Random, tokens: int, head: str = "") -> str:
    """About `tokens` tokens of words; `head` first, so that texts which must differ do so from the start."""
    chars = tokens * CHARS_PER_TOKEN
    words = [head] if head else []
    length = len(head)
    while length < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def plan_workload(shape: WorkloadShape, conversations_per_s: float, duration_s: float, seed: int) -> WorkloadPlan:
    rng = random.Random(f"{seed}/{shape.name}")
    shared = [
        synthetic_text(rng, rng.randint(*shape.system_prompt_tokens), f"System prompt {i}: you are assistant {i}.")
        for i in range(shape.system_prompts)
    ]
    conversations = []
    arrival = rng.expovariate(conversations_per_s)
    while arrival < duration_s:
        number = len(conversations)
        if shape.system_prompts:
            prompt = rng.randrange(shape.system_prompts)
        else:
            prompt = len(shared)
            head = f"System prompt {prompt}: you are assistant {rng.getrandbits(64):x}."
            shared.append(synthetic_text(rng, rng.randint(*shape.system_prompt_tokens), head))
        turns = rng.randint(*shape.turns)
        messages = [synthetic_text(rng, rng.randint(*shape.first_message_tokens), f"Conversation {number}:")]
        messages += [synthetic_text(rng, rng.randint(*shape.message_tokens), f"Turn {t}:") for t in range(2, turns + 1)]
        thinks = tuple(rng.expovariate(1 / shape.think_time_s) for _ in range(turns - 1))
        conversations.append(Conversation(number, arrival, prompt, tuple(messages), thinks))
        arrival += rng.expovariate(conversations_per_s)
    return WorkloadPlan(shape, conversations_per_s, duration_s, tuple(shared), tuple(conversations))


async def send_turn(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, TurnSample]:
    """One streaming chat completion: the answer's text, and a sample whose place in the plan is left blank."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    usage: dict | None = None
    done = False
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                return "", _sample(False, started, ttft, usage, f"HTTP {response.status}: {text}")
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                event = json.loads(payload)
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        parts.append(content)
                usage = event.get("usage") or usage
    except (TimeoutError, aiohttp.ClientError, ValueError) as error:
        return "", _sample(False, started, ttft, usage, f"{type(error).__name__}: {error}")
    if not done:
        return "", _sample(False, started, ttft, usage, "stream ended without data: [DONE]")
    return "".join(parts), _sample(True, started, ttft, usage, None)


def _sample(ok: bool, started: float, ttft: float | None, usage: dict | None, error: str | None) -> TurnSample:
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return TurnSample(
        conversation=-1,
        turn=0,
        system_prompt=-1,
        sent_s=0.0,
        ok=ok,
        latency_s=time.perf_counter() - started,
        ttft_s=ttft,
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=details.get("cached_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        error=error,
    )


async def run_conversation(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    plan: WorkloadPlan,
    conversation: Conversation,
    started: float,
) -> list[TurnSample]:
    await asyncio.sleep(max(0.0, started + conversation.arrival_s - time.perf_counter()))
    messages = [{"role": "system", "content": plan.system_prompts[conversation.system_prompt]}]
    samples = []
    for turn, user_message in enumerate(conversation.user_messages, 1):
        if turn > 1:
            await asyncio.sleep(conversation.think_times_s[turn - 2])
        messages.append({"role": "user", "content": user_message})
        sent = time.perf_counter() - started
        answer, sample = await send_turn(session, url, model, messages, plan.shape.max_tokens)
        samples.append(
            replace(
                sample,
                conversation=conversation.number,
                turn=turn,
                system_prompt=conversation.system_prompt,
                sent_s=sent,
            )
        )
        if not sample.ok:
            break  # a conversation whose answer failed ends there, as a user would give up
        messages.append({"role": "assistant", "content": answer})
    return samples


async def run_workload(
    session: aiohttp.ClientSession, base_url: str, model: str, plan: WorkloadPlan
) -> tuple[list[TurnSample], float]:
    """Every conversation of `plan` against `base_url`; the samples, and the seconds from start to last answer."""
    url = f"{base_url}/v1/chat/completions"
    started = time.perf_counter()
    runs = [run_conversation(session, url, model, plan, c, started) for c in plan.conversations]
    per_conversation = await asyncio.gather(*runs)
    return [s for samples in per_conversation for s in samples], time.perf_counter() - started
