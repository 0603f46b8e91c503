"""The capacity search's tabs in Locust's web UI (``locust -f locustfiles/capacity.py``).

"SLO capacity" shows each tier's capacity as far as the search has got and the verdict of the latest step;
"SLO steps" every judged step, tier by tier, with the numbers it was decided on. The rows are the shape's
verdicts on the master, on the exact union of every worker's records: the same ones the search acts on.
They are added as every agentperf tab is (``webui.add_tab``).
"""

from __future__ import annotations

from typing import Any, Callable

from locust.env import Environment

from agentperf_users.report.webui import VERDICT_COLUMNS, add_tab, verdict_cells
from agentperf_users.search.headline import capacity_words
from agentperf_users.search.policy import CapacityStatus
from agentperf_users.search.shape import CapacitySearchShape

CAPACITY_TAB = "agentperf-capacity"
STEPS_TAB = "agentperf-steps"


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
            row.update(latest_agents=latest.agents, **verdict_cells(latest.verdict.tier(tier.name)))
        rows.append(row)
    return rows


def step_rows(shape: CapacitySearchShape) -> list[dict[str, Any]]:
    """One row per judged step and tier, newest first."""
    return [
        {"step": step.index, "phase": step.phase + (", ended early" if step.early_stop else ""), "agents": step.agents,
         "tier": verdict.tier.label, **verdict_cells(verdict)}
        for step in reversed(shape.steps) for verdict in step.verdict.tiers
    ]


def _capacity_text(shape: CapacitySearchShape, capacity) -> str:
    if capacity is None:
        return "-"
    if capacity.status is CapacityStatus.INCOMPLETE and not shape.search.done:
        passes = "-" if capacity.agents is None else capacity.agents
        fails = "-" if capacity.first_failing_agents is None else capacity.first_failing_agents
        return f"searching (passes at {passes}, fails at {fails})"
    return capacity_words(capacity.to_dict())


def install(environment: Environment, web_ui=None, **_) -> None:
    """Add the tabs on Locust's ``init``; nothing without a web UI (headless, or on a worker)."""
    if web_ui is None:
        return

    def rows(build: Callable[[CapacitySearchShape], list[dict]]) -> Callable[[], list[dict]]:
        """The rows of the search running now (the start form can pick another shape)."""
        def current() -> list[dict]:
            shape = environment.shape_class
            return build(shape) if isinstance(shape, CapacitySearchShape) else []
        return current

    add_tab(web_ui, CAPACITY_TAB, "SLO capacity",
            [{"key": "tier", "title": "SLO tier"}, {"key": "capacity", "title": "Capacity"},
             {"key": "latest_agents", "title": "Latest step: agents"}, *VERDICT_COLUMNS], rows(capacity_rows))
    add_tab(web_ui, STEPS_TAB, "SLO steps",
            [{"key": "step", "title": "Step"}, {"key": "phase", "title": "Phase"}, {"key": "agents", "title": "Agents"},
             {"key": "tier", "title": "SLO tier"}, *VERDICT_COLUMNS], rows(step_rows))
