"""The capacity search's tabs in Locust's web UI (``locust -f locustfiles/capacity.py``).

"SLO capacity" shows each tier's capacity as far as the search has got and the verdict of the latest step;
"SLO steps" every judged step, tier by tier, with the numbers it was decided on, the server's own numbers
over its window (``server_metrics.ServerWindow``), the load generator's busiest worker, and why a failing
tier failed (``diagnose``: the cause, and its evidence in words). The rows are the shape's step results on
the master, on the exact union of every worker's records: the same ones the search acts on. They are added
as every agentperf tab is (``webui.add_tab``).
"""

from __future__ import annotations

from typing import Any, Callable

from locust.env import Environment

from agentperf_users.measure.diagnose import LoadGenerator
from agentperf_users.measure.server_metrics import ServerWindow, seconds
from agentperf_users.report.webui import VERDICT_COLUMNS, add_tab, verdict_cells
from agentperf_users.search.headline import capacity_words
from agentperf_users.search.policy import CapacityStatus
from agentperf_users.search.shape import CapacitySearchShape, StepResult

CAPACITY_TAB = "agentperf-capacity"
STEPS_TAB = "agentperf-steps"
NONE = "-"  # a number the server (or the workers) did not give
SERVER_COLUMNS = [
    {"key": "server_running", "title": "Server: running (mean / max)"},
    {"key": "server_waiting", "title": "Waiting (mean / max)"},
    {"key": "server_kv_cache", "title": "KV cache (mean / max)"},
    {"key": "server_prefix_hits", "title": "Prefix-cache hits"},
    {"key": "server_preemptions", "title": "Preemptions"},
    {"key": "server_queue", "title": "Queue"},
    {"key": "server_prefill", "title": "Prefill"},
    {"key": "server_decode", "title": "Decode"},
    {"key": "server_ttft", "title": "Server TTFT"},
    {"key": "server_itl", "title": "ITL"},
    {"key": "load_generator_cpu", "title": "Load generator CPU (busiest worker)"},
]
DIAGNOSIS_COLUMNS = [{"key": "why", "title": "Why"}, {"key": "evidence", "title": "Evidence"}]


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
    """One row per judged step and tier, newest first: the verdict, the step's server numbers (the same on
    each tier's row) and the tier's diagnosis when it failed."""
    return [
        {"step": step.index, "phase": step.phase + (", ended early" if step.early_stop else ""), "agents": step.agents,
         "tier": verdict.tier.label, **verdict_cells(verdict), **server_cells(step.server, step.load_generator),
         **diagnosis_cells(step, verdict.tier.name)}
        for step in reversed(shape.steps) for verdict in step.verdict.tiers
    ]


def server_cells(server: ServerWindow, loadgen: LoadGenerator | None) -> dict[str, str]:
    """A step's cells under ``SERVER_COLUMNS``: ``NONE`` where the number is not available."""
    busiest = loadgen.busiest() if loadgen else None
    return {
        "server_running": _pair(server.requests_running_mean, server.requests_running_max, _count),
        "server_waiting": _pair(server.requests_waiting_mean, server.requests_waiting_max, _count),
        "server_kv_cache": _pair(server.kv_cache_usage_mean, server.kv_cache_usage_max, _percent),
        "server_prefix_hits": _text(server.prefix_cache_hit_ratio, _percent),
        "server_preemptions": _text(server.preemptions, _count),
        "server_queue": _text(server.queue_time_mean_s, seconds),
        "server_prefill": _text(server.prefill_time_mean_s, seconds),
        "server_decode": _text(server.decode_time_mean_s, seconds),
        "server_ttft": _text(server.ttft_mean_s, seconds),
        "server_itl": _text(server.inter_token_latency_mean_s, seconds),
        "load_generator_cpu": f"{_percent(busiest[1])} of a core ({busiest[0]})" if busiest else NONE,
    }


def diagnosis_cells(step: StepResult, tier: str) -> dict[str, str]:
    """A tier's cells under ``DIAGNOSIS_COLUMNS``: its cause (and whether the verdict is about capacity) and
    the evidence in words; empty for a tier that passed."""
    found = next((diagnosis for diagnosis in step.diagnoses if diagnosis.tier == tier), None)
    if found is None:
        return {"why": "", "evidence": ""}
    doubt = "" if found.about_capacity else " (not a capacity verdict)"
    return {"why": found.cause.value + doubt, "evidence": found.summary}


def _text(value: float | None, show: Callable[[float], str]) -> str:
    return NONE if value is None else show(value)


def _pair(mean: float | None, top: float | None, show: Callable[[float], str]) -> str:
    return NONE if mean is None else f"{show(mean)} / {_text(top, show)}"


def _count(value: float) -> str:
    return f"{value:.3g}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f} %"


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
             {"key": "tier", "title": "SLO tier"}, *VERDICT_COLUMNS, *SERVER_COLUMNS, *DIAGNOSIS_COLUMNS],
            rows(step_rows))
