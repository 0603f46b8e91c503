"""The replay rules shared by the live agents and the ground truth: dealing, namespaces, start turns."""

from __future__ import annotations

import argparse

from agentperf_users.loadgen.replay import (
    Dealer,
    ReplaySettings,
    chat_params,
    namespace_marker,
    request_tools,
    session_trajectory,
    start_turn,
)
from agentperf_users.options import Group, add_options


def test_sessions_are_dealt_in_order_without_restarts():
    dealer = Dealer()
    assert [dealer.deal(new_agent=True) for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]
    assert dealer.deal(new_agent=False) == (None, 3)  # an agent that finished its trajectory
    assert dealer.deal(new_agent=True) == (3, 4)
    assert dealer.step == 0


def test_a_restarted_step_deals_the_same_agents_whatever_came_before():
    """Step k at N agents: agent i plays session i, so N agents are the same N in every step, and a
    session that ends mid-step takes a session beyond the step's first N, never one of theirs."""
    dealer = Dealer()
    dealer.restart(0, 4)
    first = [dealer.deal(new_agent=True) for _ in range(2)]
    assert dealer.deal(new_agent=False) == (None, 4)  # session 2 and 3 stay reserved for agents 2 and 3
    first += [dealer.deal(new_agent=True) for _ in range(2)]
    assert first == [(0, 0), (1, 1), (2, 2), (3, 3)]
    dealer.restart(1, 2)
    assert [dealer.deal(new_agent=True) for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]
    assert dealer.deal(new_agent=False) == (None, 3)
    assert dealer.step == 1
    dealer.restart(1, 2)  # the same step again (every claim of the step asks): nothing changes
    assert dealer.deal(new_agent=True) == (3, 4)


def test_later_steps_get_their_own_cache_namespace():
    """A restarted step k > 0 must not reuse prefixes an earlier step cached: every session it deals has a
    marker naming the step; step 0 replays unchanged (on-wrap) like a run without a search."""
    assert namespace_marker("on-wrap", "run", session=3, set_size=10) is None
    assert namespace_marker("on-wrap", "run", session=13, set_size=10) == "run pass 1"
    assert namespace_marker("on-wrap", "run", session=3, set_size=10, step=2) == "run step 2 pass 0"
    assert namespace_marker("per-run", "run", session=3, set_size=10) == "run pass 0"
    assert namespace_marker("per-session", "run", session=3, set_size=10, step=2) == "run step 2 session 3"
    markers = {namespace_marker("on-wrap", "run", 0, 10, step) for step in range(1, 5)}
    assert len(markers) == 4


def test_session_trajectory_wraps_with_a_pass_number():
    assert [session_trajectory(s, 3) for s in range(7)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]


def test_random_start_turns_are_seeded_per_session_and_spread():
    turns = [start_turn("random", seed=0, session=s, turns=50) for s in range(200)]
    assert turns == [start_turn("random", seed=0, session=s, turns=50) for s in range(200)]
    assert turns != [start_turn("random", seed=1, session=s, turns=50) for s in range(200)]
    assert all(0 <= t < 50 for t in turns) and len(set(turns)) > 30
    assert start_turn("first", seed=0, session=5, turns=50) == 0
    assert start_turn("random", seed=0, session=5, turns=1) == 0


def test_tools_are_on_by_default_and_off_with_no_tools():
    """``--tools/--no-tools`` reaches ``ReplaySettings.tools`` (which the agents and the truth share), and
    a turn's request then carries the trajectory's own tool definitions or none."""
    parser = argparse.ArgumentParser()
    add_options(parser, [Group.REPLAY])
    tools = ({"type": "function", "function": {"name": "read_file"}},)
    on, off = (ReplaySettings.from_options(parser.parse_args(argv)) for argv in ([], ["--no-tools"]))
    assert on.tools and not off.tools
    assert request_tools(tools, on) is tools  # the object itself: the body encoder caches it by identity
    assert request_tools(tools, off) == ()


def test_chat_params_are_the_run_requests_shape():
    """One definition of a turn's request parameters (the agents' and the qualification probe's)."""
    params = chat_params("m", 7, ReplaySettings())
    assert params == {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                      "max_completion_tokens": 7, "max_tokens": 7, "ignore_eos": True}
    assert "ignore_eos" not in chat_params("m", 7, ReplaySettings(ignore_eos=False))
