"""The SLO tabs of Locust's web UI, for a capacity search (``locust -f locustfiles/capacity.py``).

"SLO capacity" shows each tier's capacity as far as the search has got and the verdict of the latest step;
"SLO steps" every judged step, tier by tier, with the numbers it was decided on. They use Locust's own
extension points, so the page stays Locust's: tabs and table columns in the index page's template
arguments (set at ``init``), and rows under ``extended_stats`` in the ``/stats/requests`` JSON that the
page polls every 2 s (added after Locust's view made it). The rows are the shape's verdicts on the
master, on the exact union of every worker's records: the same ones the search acts on.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, request
from locust import events
from locust.env import Environment

from agentperf_users.search import CapacityStatus
from agentperf_users.shape import CapacitySearchShape, describe_capacity, speed_text, ttft_text

CAPACITY_TAB = "agentperf-capacity"
STEPS_TAB = "agentperf-steps"
VERDICT_COLUMNS = [
    {"key": "verdict", "title": "Verdict"},
    {"key": "ttft", "title": "TTFT"},
    {"key": "output_speed", "title": "Output speed"},
    {"key": "requests", "title": "Requests"},
    {"key": "errors", "title": "Errors"},
]


def capacity_rows(shape: CapacitySearchShape) -> list[dict[str, Any]]:
    """One row per tier: its capacity so far, and the latest step's verdict on it."""
    if shape.spec is None:
        return []
    latest = shape.steps[-1] if shape.steps else None
    capacity = shape.capacity()
    rows = []
    for tier in shape.spec.tiers:
        row: dict[str, Any] = {"tier": tier.label, "capacity": _capacity_text(shape, capacity.get(tier.name))}
        if latest is not None:
            row.update(latest_agents=latest.agents, **_verdict_cells(latest.verdict.tier(tier.name)))
        rows.append(row)
    return rows


def step_rows(shape: CapacitySearchShape) -> list[dict[str, Any]]:
    """One row per judged step and tier, newest first."""
    return [
        {"step": step.index, "phase": step.phase + (", ended early" if step.early_stop else ""), "agents": step.agents,
         "tier": verdict.tier.label, **_verdict_cells(verdict)}
        for step in reversed(shape.steps) for verdict in step.verdict.tiers
    ]


def _verdict_cells(verdict) -> dict[str, Any]:
    return {"verdict": "pass" if verdict.passed else "FAIL", "ttft": ttft_text(verdict),
            "output_speed": speed_text(verdict), "requests": verdict.requests, "errors": verdict.errors}


def _capacity_text(shape: CapacitySearchShape, capacity) -> str:
    if capacity is None:
        return "-"
    if capacity.status is CapacityStatus.INCOMPLETE and not shape.search.done:
        passes = "-" if capacity.agents is None else capacity.agents
        fails = "-" if capacity.first_failing_agents is None else capacity.first_failing_agents
        return f"searching (passes at {passes}, fails at {fails})"
    return describe_capacity(capacity)


def install(environment: Environment, web_ui=None, **_) -> None:
    """Add the tabs on Locust's ``init``; nothing without a web UI (headless, or on a worker)."""
    if web_ui is None:
        return
    web_ui.template_args["extended_tabs"] = [{"title": "SLO capacity", "key": CAPACITY_TAB},
                                             {"title": "SLO steps", "key": STEPS_TAB}]
    web_ui.template_args["extended_tables"] = [
        {"key": CAPACITY_TAB, "structure": [{"key": "tier", "title": "SLO tier"}, {"key": "capacity", "title": "Capacity"},
                                            {"key": "latest_agents", "title": "Latest step: agents"}, *VERDICT_COLUMNS]},
        {"key": STEPS_TAB, "structure": [{"key": "step", "title": "Step"}, {"key": "phase", "title": "Phase"},
                                         {"key": "agents", "title": "Agents"}, {"key": "tier", "title": "SLO tier"},
                                         *VERDICT_COLUMNS]},
    ]

    @web_ui.app.after_request
    def add_slo_rows(response: Response) -> Response:
        shape = environment.shape_class
        if request.path != "/stats/requests" or not response.is_json or not isinstance(shape, CapacitySearchShape):
            return response
        data = response.get_json()
        data["extended_stats"] = [{"key": CAPACITY_TAB, "data": capacity_rows(shape)},
                                  {"key": STEPS_TAB, "data": step_rows(shape)}]
        response.set_data(json.dumps(data))
        return response


events.init.add_listener(install)
