"""agentperf's tabs in Locust's web UI, and the one every run has: "SLO now", each tier's verdict on the
requests that ended in the last ``--slo-window-s`` seconds, for a person ramping agents by hand.

The tabs use Locust's own extension points, so the page stays Locust's: tabs and table columns in the
index page's template arguments (set at ``init``), and rows under ``extended_stats`` in the
``/stats/requests`` JSON that the page polls every 2 s (added after Locust's view made it). Rows come
from the master's exact union of every worker's records (``aggregate``), never from Locust's bucketed
statistics. The capacity search adds its own tabs the same way (``search_tabs``).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

from flask import Response, request
from locust.env import Environment

from agentperf_users.errors import AgentperfError
from agentperf_users.measure import aggregate
from agentperf_users.measure.slo import TierVerdict, speed_text, ttft_text

LIVE_TAB = "agentperf-slo-now"
VERDICT_COLUMNS = [
    {"key": "verdict", "title": "Verdict"},
    {"key": "ttft", "title": "TTFT"},
    {"key": "output_speed", "title": "Output speed"},
    {"key": "requests", "title": "Requests"},
    {"key": "errors", "title": "Errors"},
]
_TABS_ATTRIBUTE = "agentperf_tabs"


def add_tab(web_ui, key: str, title: str, columns: list[dict[str, str]], rows: Callable[[], list[dict]]) -> None:
    """A table tab: its columns in the page's template arguments, ``rows()`` in every ``/stats/requests``
    answer. The tabs of every module share one hook."""
    tabs = getattr(web_ui, _TABS_ATTRIBUTE, None)
    if tabs is None:
        tabs = {}
        setattr(web_ui, _TABS_ATTRIBUTE, tabs)
        web_ui.app.after_request(functools.partial(_add_rows, tabs))
    tabs[key] = rows
    web_ui.template_args.setdefault("extended_tabs", []).append({"title": title, "key": key})
    web_ui.template_args.setdefault("extended_tables", []).append({"key": key, "structure": columns})


def _add_rows(tabs: dict[str, Callable[[], list[dict]]], response: Response) -> Response:
    if request.path != "/stats/requests" or not response.is_json:
        return response
    data = response.get_json()
    data["extended_stats"] = [{"key": key, "data": rows()} for key, rows in tabs.items()]
    response.set_data(json.dumps(data))
    return response


def verdict_cells(verdict: TierVerdict) -> dict[str, Any]:
    """A tier verdict's cells under ``VERDICT_COLUMNS``."""
    return {"verdict": "pass" if verdict.passed else "FAIL", "ttft": ttft_text(verdict),
            "output_speed": speed_text(verdict), "requests": verdict.requests, "errors": verdict.errors}


def live_rows(environment: Environment) -> list[dict[str, Any]]:
    """The SLO now tab: ``aggregate.slo_now``, a row per tier."""
    try:
        verdict, window_s = aggregate.slo_now(environment)
    except AgentperfError as exc:
        return [{"tier": str(exc)}]
    agents = environment.runner.user_count
    return [{"tier": tier.tier.label, **verdict_cells(tier), "agents": agents, "window": f"last {window_s:g} s"}
            for tier in verdict.tiers]


def install(environment: Environment, web_ui=None, **_) -> None:
    """The SLO now tab, on Locust's ``init``; nothing without a web UI (headless, or on a worker)."""
    if web_ui is not None:
        add_tab(web_ui, LIVE_TAB, "SLO now",
                [{"key": "tier", "title": "SLO tier"}, *VERDICT_COLUMNS, {"key": "agents", "title": "Agents running"},
                 {"key": "window", "title": "Window"}],
                functools.partial(live_rows, environment))
