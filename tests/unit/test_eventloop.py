"""The polling selector: polls only while asked, never past asyncio's timeout, backs off."""

from __future__ import annotations

import asyncio
import selectors
import socket

import pytest

from configserver import eventloop
from configserver.eventloop import PollingSelector


class FakeClock:
    """Advances by ``step`` at every reading; ``jump_at`` adds ``jump`` at that reading."""

    def __init__(self, step: float = 10e-6, jump_at: int = -1, jump: float = 0.0) -> None:
        self.now, self.step, self.readings = 100.0, step, 0
        self.jump_at, self.jump = jump_at, jump

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.step + (self.jump if self.readings == self.jump_at else 0.0)
        return self.now


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _selector(clock: FakeClock, relaxed: list[int]) -> PollingSelector:
    return PollingSelector(clock=clock, relax=lambda: relaxed.append(1))


def test_without_an_expectation_it_sleeps_like_epoll(pair):
    relaxed: list[int] = []
    selector = _selector(FakeClock(), relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    assert selector.select(0.001) == []
    pair[1].send(b"x")
    assert [key.fileobj for key, _ in selector.select(1.0)] == [pair[0]]
    assert selector.polls == 0 and relaxed == []
    selector.close()


def test_expected_event_is_found_by_polling(pair):
    clock, relaxed = FakeClock(), []
    selector = _selector(clock, relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    selector.expect(clock.now + 1.0)
    pair[1].send(b"x")
    ready = selector.select(None)
    assert [key.fileobj for key, _ in ready] == [pair[0]]
    assert selector.polls == 1 and selector.caught == 1 and relaxed == []
    selector.close()


def test_polling_stops_at_asyncio_timeout_and_yields_between_rounds(pair):
    clock, relaxed = FakeClock(step=10e-6), []
    selector = _selector(clock, relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    selector.expect(clock.now + 60.0)          # far beyond the timeout below
    assert selector.select(0.001) == []        # 1 ms of fake time: about 100 rounds
    assert 90 <= selector.polls <= 110 and len(relaxed) == selector.polls
    assert selector.caught == 0 and selector.backoffs == 0
    assert selector.summary() == (f"event loop polled {selector.polls} times, found events "
                                  "0 times, backed off 0 times")
    polls = selector.polls
    assert selector.select(0) == [] and selector.polls == polls   # zero timeout: no polling
    selector.close()


def test_polling_stops_when_the_expectation_runs_out(pair):
    clock, relaxed = FakeClock(step=10e-6), []
    selector = _selector(clock, relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    selector.expect(clock.now + 200e-6)
    selector.expect(clock.now + 100e-6)        # an earlier expectation does not shorten it
    pair[1].send(b"x")
    selector.select(None)
    pair[0].recv(1)
    assert selector.caught == 1
    selector.expect(clock.now + 200e-6)
    assert selector.select(0.010 + 200e-6) == []
    assert 15 <= selector.polls <= 25          # about 200 us of 10 us rounds, not 10 ms
    selector.close()


def test_descheduled_poller_backs_off(pair):
    # The third clock reading comes 5 ms after the second: another task had the CPU.
    clock, relaxed = FakeClock(step=10e-6, jump_at=3, jump=0.005), []
    selector = _selector(clock, relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    selector.expect(clock.now + 60.0)
    assert selector.select(0.001) == []
    assert selector.backoffs == 1 and selector.polls == 2
    assert selector.select(0.001) == [] and selector.polls == 2   # off for a while
    clock.now += eventloop.BACKOFF
    selector.select(0.0001)
    assert selector.polls > 2                  # on again after the back-off
    selector.close()


def test_polling_is_held_off_while_a_thread_works(pair):
    clock, relaxed = FakeClock(step=10e-6), []
    selector = _selector(clock, relaxed)
    selector.register(pair[0], selectors.EVENT_READ)
    selector.expect(clock.now + 60.0)
    selector.hold()
    assert selector.select(0.001) == [] and selector.polls == 0
    selector.release()
    assert selector.select(0.001) == [] and selector.polls > 0
    selector.close()


def test_executor_jobs_hold_polling_off_until_they_are_done():
    seen: list[bool] = []

    async def main(selector: PollingSelector) -> None:
        assert not selector.held
        await asyncio.gather(*(asyncio.to_thread(lambda: seen.append(selector.held))
                               for _ in range(3)))
        assert not selector.held

    eventloop.run(main)
    assert seen == [True, True, True]


def test_run_drives_the_loop_with_a_polling_selector(pair):
    async def main(selector: PollingSelector) -> str:
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        loop.add_reader(pair[0].fileno(), lambda: arrived.done() or arrived.set_result(1))
        selector.expect(loop.time() + 5.0)
        loop.call_later(0.01, pair[1].send, b"x")
        await arrived
        loop.remove_reader(pair[0].fileno())
        assert selector.caught >= 1 and selector.polls >= 1
        return "done"

    # Never backing off: a loaded test machine may deschedule us, which is not under test here.
    selector = PollingSelector(preempted_after=float("inf"))
    assert eventloop.run(main, selector=selector) == "done"
