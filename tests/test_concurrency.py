"""The per-engine gate: places handed over, given back, never lost."""

from __future__ import annotations

import asyncio

import pytest

from gateway_app.concurrency import ConcurrencyGate, EngineBusy


def test_a_place_handed_over_to_a_waiter_that_is_leaving_is_passed_on():
    async def scenario() -> tuple[int, int]:
        gate = ConcurrencyGate(limit=1, queue=5, queue_timeout=5)
        await gate.acquire("e")
        waiter = asyncio.create_task(gate.acquire("e"))
        await asyncio.sleep(0)  # it is queued
        gate.release()  # hands the place to the waiter ...
        waiter.cancel()  # ... which leaves in the same instant (its client went away)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return gate.active, gate.waiting

    assert asyncio.run(scenario()) == (0, 0)  # nothing held, nothing lost


def test_queue_full_and_queue_timeout_refuse_without_losing_places():
    async def scenario() -> None:
        gate = ConcurrencyGate(limit=1, queue=1, queue_timeout=0.05)
        await gate.acquire("e")
        queued = asyncio.create_task(gate.acquire("e"))
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy):
            await gate.acquire("e")  # queue full
        with pytest.raises(EngineBusy):
            await queued  # waited past the timeout
        gate.release()
        assert (gate.active, gate.waiting) == (0, 0)
        assert await gate.acquire("e") == 0.0  # the place is there again

    asyncio.run(scenario())
