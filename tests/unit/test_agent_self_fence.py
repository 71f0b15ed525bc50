"""A dom0 fences itself: with no heartbeat accepted for the server's ``self_fence_after`` it
destroys every guest here, and a dom0 back from a lost link destroys the guests it holds no
claim of before anything else in its pass."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
from test_agent_dom0_guests import UUID, FakeXl, entry, guests

from nodeagent import session as session_module
from nodeagent.client import ServerClient
from nodeagent.config import build_config
from nodeagent.roles.migration import Migrations
from nodeagent.roles.xen import Domain
from nodeagent.selffence import FILE, SelfFence
from nodeagent.session import AgentSession

MAC = "52:54:00:aa:cc:09"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def running(name: str, domid: int = 3) -> Domain:
    return Domain(name, domid, 256, 1, "blocked", 1.0, UUID)


def test_the_limit_comes_with_heartbeats_and_outlives_an_agent_restart(tmp_path):
    clock = Clock()
    fence = SelfFence(tmp_path, clock)
    assert fence.limit is None and fence.due() is None
    fence.accepted(60.0)
    clock.now += 59
    assert fence.due() is None
    clock.now += 2
    assert fence.due() == 61.0
    again = SelfFence(tmp_path, clock)  # a new agent, not yet heard by the server
    assert again.limit == 60.0 and again.due() is None  # its clock starts now
    clock.now += 61
    assert again.due() == 61.0
    again.accepted(None)  # the server turned it off
    clock.now += 1000
    assert again.due() is None and SelfFence(tmp_path, clock).limit is None
    for wrong in ("soon", True, -5, 0):
        again.accepted(wrong)
        assert again.limit is None, wrong


async def test_past_the_limit_every_guest_goes_until_heartbeats_come_back(tmp_path):
    clock = Clock()
    fence = SelfFence(tmp_path, clock)
    fence.accepted(30.0)
    xl = FakeXl([running("nb-web", 3), running("nb-db", 4), running("other", 5)])
    made, _, _ = guests(tmp_path, xl)
    watch = asyncio.create_task(fence.run(made.self_fence, period=0.01))
    await asyncio.sleep(0.05)
    assert "nb-web" in xl.running  # within the limit: nothing happens
    clock.now += 31
    await asyncio.sleep(0.05)
    assert set(xl.running) == {"Domain-0", "other"}  # only ours, never dom0 or a stranger
    assert fence.fenced == 2
    events = made.events
    assert {e["domain"] for e in events} == {"nb-web", "nb-db"}
    assert all(e["reason"].startswith("self-fenced: no heartbeat accepted for 31 s")
               for e in events)
    fence.accepted(30.0)
    xl.running["nb-web"] = running("nb-web", 6)  # created again under its claim
    await asyncio.sleep(0.05)
    watch.cancel()
    assert "nb-web" in xl.running and fence.fenced == 2


async def test_a_failing_toolstack_does_not_end_the_watch(tmp_path):
    clock = Clock()
    fence = SelfFence(tmp_path, clock)
    fence.accepted(1.0)
    clock.now += 5
    calls = []

    async def broken(reason):
        calls.append(reason)
        raise OSError("xl: not found")

    watch = asyncio.create_task(fence.run(broken, period=0.01))
    await asyncio.sleep(0.05)
    watch.cancel()
    assert len(calls) >= 2


async def test_guests_not_in_the_work_are_destroyed_before_the_pass(tmp_path):
    xl = FakeXl([running("nb-web", 3), running("nb-old", 4), running("stranger", 5)])
    made, _, _ = guests(tmp_path, xl)
    await made.destroy_unclaimed([entry()])
    assert set(xl.running) == {"Domain-0", "nb-web", "stranger"}
    assert xl.calls == [("destroy", "nb-old")]
    assert made.events[0]["reason"] == "this dom0 holds no claim on it"


async def test_an_agent_started_cut_off_fences_with_the_limit_it_kept(tmp_path, monkeypatch):
    """No lookup ever succeeds (the server is unreachable), yet the limit kept from the last
    boot's heartbeats is acted on: the guests go without the role ever being known."""
    (tmp_path / FILE).write_text(json.dumps({"self_fence_after": 0.01}))
    destroyed = []

    async def destroy(reason):
        destroyed.append(reason)
        return 1

    monkeypatch.setattr(session_module, "destroy_guests", destroy)
    config = build_config({"server": "http://127.0.0.1:9", "boot_id": "b", "macs": [MAC],
                           "state_dir": tmp_path, "backoff_initial": 0.05,
                           "backoff_max": 0.2, "api_port": 0})
    async with aiohttp.ClientSession() as http:
        agent = AgentSession(config, ServerClient(config.server, http, 1.0), _inventory,
                             cloud_roles=lambda role, hooks: None)
        task = asyncio.create_task(agent.run())
        for _ in range(60):
            await asyncio.sleep(0.1)
            if destroyed:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert agent.status.node is None  # never looked up
    assert destroyed and destroyed[0].startswith("no heartbeat accepted for")


async def _inventory():
    return {"schema": 1, "disks": [], "nics": []}


def _target_state(key: str, state: str) -> dict:
    return {"id": key, "side": "target", "state": state, "domain": "nb-web",
            "md": "nb-fedcba9876543210", "port": None, "error": None}


async def test_what_an_aborted_migration_left_here_goes_even_if_the_claim_came(tmp_path):
    """The source was lost mid-send: the target holds the received, paused domain, and the
    failover may give this very dom0 the claim. The paused copy goes; the guest is then
    created afresh (same name and uuid: the plan alone would have kept the paused one)."""
    moves = Migrations(None, exists=None, unpause=None)
    moves.states["m1"] = _target_state("m1", "received")
    moves.states["m2"] = {**_target_state("m2", "running"), "domain": "nb-db"}
    moves.step([], [], prepare=None)  # neither is in the work any more
    assert moves.abandoned == {"nb-web"}  # m2 arrived: its guest is this dom0's now
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "paused", 0.0, UUID),
                 Domain("nb-db", 4, 256, 1, "blocked", 1.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    made.migrations = moves
    await made.destroy_unclaimed([entry(), {"domain": "nb-db"}])  # both claimed here now
    assert xl.calls == [("destroy", "nb-web")] and moves.abandoned == set()
    assert made.events[0]["reason"] == "its migration here was aborted"
    await made.destroy_unclaimed([entry(), {"domain": "nb-db"}])
    assert xl.calls == [("destroy", "nb-web")]  # once
