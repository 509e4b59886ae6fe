"""The exchange clock's limits fire whether or not the clock armed a timer of its own for them."""

from __future__ import annotations

import asyncio

import pytest

from gateway_app import exchange_clock
from gateway_app.exchange_clock import DeadlineSweep, ExchangeClock
from gateway_app.failures import Failure


async def _phase(sweep: DeadlineSweep, limit: float, lasts: float) -> str:
    clock = ExchangeClock(sweep)
    try:
        with clock, clock.limit(limit, Failure.TIMEOUT_FIRST_BYTE):
            await asyncio.sleep(lasts)
    except TimeoutError:
        return "timed out"
    return "done"


def test_a_limit_beyond_the_sweeps_horizon_still_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange_clock, "SWEEP_SECONDS", 0.05)

    async def main() -> str:
        return await _phase(DeadlineSweep(), limit=0.2, lasts=30)  # beyond the first look: no timer at first

    assert asyncio.run(main()) == "timed out"


def test_a_limit_within_the_horizon_fires_and_one_not_reached_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange_clock, "SWEEP_SECONDS", 5.0)

    async def main() -> list[str]:
        sweep = DeadlineSweep()
        return await asyncio.gather(_phase(sweep, limit=0.05, lasts=30), _phase(sweep, limit=30, lasts=0.1))

    assert asyncio.run(main()) == ["timed out", "done"]


def test_a_moving_limit_fires_only_once_the_phase_stays_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the relay moves the idle limit at every chunk: the limit is met while chunks keep coming."""
    monkeypatch.setattr(exchange_clock, "SWEEP_SECONDS", 0.03)

    async def main() -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        clock = ExchangeClock(DeadlineSweep())
        chunks = 0
        try:
            with clock, clock.limit(None, Failure.TIMEOUT_IDLE):
                for pause in [0.01] * 10 + [30.0]:  # ten chunks well within the limit, then silence
                    clock.expire_at(loop.time() + 0.5, Failure.TIMEOUT_IDLE)
                    await asyncio.sleep(pause)
                    chunks += 1
        except TimeoutError:
            return chunks, "timed out"
        return chunks, "done"

    assert asyncio.run(main()) == (10, "timed out")


def test_the_sweep_stops_looking_once_no_clock_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange_clock, "SWEEP_SECONDS", 0.01)

    async def main() -> tuple[float, float]:
        sweep = DeadlineSweep()
        await _phase(sweep, limit=60, lasts=0.03)
        while_open = sweep.horizon
        await asyncio.sleep(0.05)  # the next look finds nothing open
        return while_open, sweep.horizon

    while_open, after = asyncio.run(main())
    assert while_open != float("inf")
    assert after == float("inf")
