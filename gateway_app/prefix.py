"""Prompt prefixes, as cache-aware balancing sees them: chained hashes of fixed-size blocks of the prompt.

An engine's prefix cache (vLLM's automatic prefix caching, SGLang's radix cache) reuses the work done on
the start of a prompt it has seen. The gateway cannot know what each replica holds, but it knows where it
sent each prompt: `PrefixTable` remembers, per engine, which replicas were last sent each block of prompt
text. No tokenizer: the prompt text the gateway already parsed (chat `messages`, `prompt`, the Responses
API's `instructions` and `input`) is cut into blocks of `BLOCK_CHARS` characters (about 64 tokens), and
each block's hash covers every block before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

BLOCK_CHARS = 256
MAX_BLOCKS = 64  # the first 16 Ki characters decide; the rest of a long prompt costs nothing
MAX_CHARS = BLOCK_CHARS * MAX_BLOCKS
Blocks = tuple[int, ...]  # a prompt's chained block hashes
HOLDERS_PER_BLOCK = 3  # a hot prefix spreads over a few replicas; the table remembers up to this many


def prompt_text(document: dict[str, Any]) -> str:
    """The request's prompt as one string, in the order the engine reads it: each chat message's role and
    text, or the completion prompt (a string, a list of strings, or token ids). At most about `MAX_CHARS`
    characters are gathered, however large or oddly shaped the body."""
    messages = document.get("messages")
    if type(messages) is list and "instructions" not in document and "prompt" not in document:
        text = _plain_chat_text(messages)
        if text is not None:
            return text
    parts: list[str] = []
    size = 0

    def add(text: str) -> bool:
        """Gather `text`; False once enough is gathered."""
        nonlocal size
        if size >= MAX_CHARS:
            return False
        parts.append(text[: MAX_CHARS - size])
        size += min(len(text), MAX_CHARS - size)
        return size < MAX_CHARS

    instructions = document.get("instructions")
    if isinstance(instructions, str):
        add(instructions)
    messages = document.get("messages")
    if messages is None:
        messages = document.get("input")  # the Responses API: a string or a list of messages
    if isinstance(messages, str):
        add(messages)
    elif isinstance(messages, list):
        for message in messages:
            if size >= MAX_CHARS:
                break
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            add((role if isinstance(role, str) else "") + "\n")
            content = message.get("content")
            if isinstance(content, str):
                add(content)
            elif isinstance(content, list):
                for part in content:
                    if size >= MAX_CHARS:
                        break
                    text = part.get("text") if isinstance(part, dict) else None
                    if isinstance(text, str):
                        add(text)
            add("\n")
    prompt = document.get("prompt")
    if isinstance(prompt, str):
        add(prompt)
    elif isinstance(prompt, list):  # a batch of prompts, or token ids: the first decides the replica
        first = prompt[0] if prompt else None
        if isinstance(first, str):
            add(first)
        elif isinstance(first, int) or isinstance(first, list):
            ids = prompt if isinstance(first, int) else first
            add(" ".join(str(token) for token in ids[: MAX_CHARS // 2]))
    return "".join(parts)


def _plain_chat_text(messages: list[Any]) -> str | None:
    """`prompt_text` of the usual chat (messages with a string role and a string content, `MAX_CHARS` in
    all at most) at a fraction of its cost; None for anything else, which the general path reads."""
    parts: list[str] = []
    size = 0
    for message in messages:
        if type(message) is not dict:
            return None
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or type(content) is not str:
            return None
        parts += (role, "\n", content, "\n")
        size += len(role) + len(content) + 2
        if size >= MAX_CHARS:
            return None  # cut where the general path cuts, without joining a long prompt whole
    return "".join(parts)


def prefix_blocks(document: dict[str, Any]) -> Blocks:
    """The chained hashes of the prompt's blocks (the last one may be shorter), at most `MAX_BLOCKS`.

    Python's own string hash: the fastest there is, and the table lives in this process only."""
    text = prompt_text(document)
    end = min(len(text), MAX_CHARS)
    chained = 0
    blocks = []
    for start in range(0, end, BLOCK_CHARS):
        chained = hash((chained, text[start : start + BLOCK_CHARS]))
        blocks.append(chained)
    return tuple(blocks)


class PrefixTable:
    """Block hash → the replica URLs that were last sent it (most recent last), with least-recently used
    blocks forgotten past `capacity`. An approximation of what each replica's cache holds: an engine
    evicts on its own schedule, and requests sent by other gateways are not seen. Per block it also keeps
    whether prompts went on differently after it, which tells a prefix shared by several prompts (a system
    prompt) from the history of one conversation (`shared_depth`)."""

    __slots__ = ("capacity", "_holders", "_next", "_ends")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, list[str]] = OrderedDict()
        # Block hash -> the block that followed it in every prompt so far, or None once prompts went on
        # differently after it (the prefix up to it is shared). A prompt's last block is left out: it may
        # be partial, and the next turn of the same conversation fills it.
        self._next: dict[int, int | None] = {}
        # Block hash -> the last (maybe partial) block of a prompt that ended right after it. Two prompts
        # that end there differently parted there too: short questions on one system prompt.
        self._ends: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, blocks: Blocks, urls: set[str] | dict[str, Any]) -> tuple[int, list[str]]:
        """How many blocks from the start some replica among `urls` holds, and which of them hold that
        deepest block."""
        depth, deepest = 0, None
        get = self._holders.get
        for block in blocks:
            known = get(block)
            if known is None:
                break
            for url in known:
                if url in urls:
                    break
            else:  # held, but by none of these replicas
                break
            depth, deepest = depth + 1, known
        return depth, [url for url in deepest if url in urls] if deepest is not None else []

    def depths(self, blocks: Blocks, urls: set[str] | dict[str, Any]) -> dict[str, int]:
        """How many blocks from the start each replica among `urls` holds (one holding none is left out)."""
        depths: dict[str, int] = {}
        get = self._holders.get
        for index, block in enumerate(blocks):
            known = get(block)
            present = [url for url in known if url in urls and depths.get(url, 0) == index] if known else []
            if not present:
                break
            for url in present:
                depths[url] = index + 1
        return depths

    def shared_depth(self, blocks: Blocks) -> int:
        """How many blocks from the start this prompt shares with some other prompt seen: up to the deepest
        known block after which prompts went on differently (this one included). A new conversation on a
        shared system prompt shares about that prompt; a later turn of a conversation shares the same, its
        own history beyond it being followed only by itself."""
        shared = 0
        known = self._next
        last = len(blocks) - 1
        for index, block in enumerate(blocks[:last]):
            if index + 1 == last:  # this prompt ends after it: compare with the prompts that ended there
                ended = self._ends.get(block)
                if known.get(block, 0) is None or (ended is not None and ended != blocks[last]):
                    shared = last
                break
            if block not in known:  # no prompt seen went on after it
                break
            following = known[block]
            if following is None or following != blocks[index + 1]:
                shared = index + 1
        return shared

    def record(self, blocks: Blocks, url: str) -> None:
        """The request's blocks went to `url`: they are likely in its cache now."""
        table = self._holders
        following = self._next
        for block, after in zip(blocks, blocks[1:-1], strict=False):  # not the last block: it may be partial
            if following.setdefault(block, after) != after:
                following[block] = None
        if len(blocks) > 1 and self._ends.setdefault(blocks[-2], blocks[-1]) != blocks[-1]:
            following[blocks[-2]] = None
        for block in blocks:
            known = table.get(block)
            if known is None:
                table[block] = [url]
            else:
                if known[-1] != url:
                    if url in known:
                        known.remove(url)
                    elif len(known) >= HOLDERS_PER_BLOCK:
                        del known[0]
                    known.append(url)
                table.move_to_end(block)
        while len(table) > self.capacity:
            forgotten = table.popitem(last=False)[0]
            following.pop(forgotten, None)
            self._ends.pop(forgotten, None)
