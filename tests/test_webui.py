"""The web UI's SLO now tab, through Locust's own web UI app in this process: its rows in the
``/stats/requests`` answer are each tier's verdict on the requests of the last ``--slo-window-s``
seconds. (tests/distributed/test_distributed.py renders every tab in a real Chromium.)"""

from __future__ import annotations

import sys
import time

from locust import User, argument_parser, constant
from locust.env import Environment
from locust.event import Events

from agentperf_users.measure import aggregate
from agentperf_users.measure.server_metrics import seconds
from agentperf_users.measure.slo import evaluate_step, load_slo, ttft_text
from agentperf_users.report import search_tabs, webui
from tests.support import install_agentperf
from tests.test_metrics import searched
from tests.test_slo import record


class IdleUser(User):
    wait_time = constant(1)


def test_slo_now_judges_the_last_window_of_records(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["locust"])  # Locust's web UI parses the command line for its start form
    install_agentperf()
    options = argument_parser.get_parser().parse_args(["--slo-window-s", "30"])  # Locust's, with agentperf's
    environment = Environment(user_classes=[IdleUser], events=Events(), parsed_options=options)
    environment.create_local_runner()
    web_ui = environment.create_web_ui("127.0.0.1", 0)
    try:
        webui.install(environment, web_ui=web_ui)
        assert {"title": "SLO now", "key": webui.LIVE_TAB} in web_ui.template_args["extended_tabs"]
        now = time.time()
        log = aggregate.get_record_log(environment)
        # Ends 2 s apart, none within 0.25 s of the window's edges: [covered - 30 s, covered), covered = now - 0.5 s.
        added = [record(agent=i % 3, ttft_s=0.5 * i, output_tps=40.0 - i, end=now - 44.25 + i * 2) for i in range(20)]
        for item in added:
            log.add(item)
        answer = web_ui.app.test_client().get("/stats/requests").get_json()
        (tab,) = [tab for tab in answer["extended_stats"] if tab["key"] == webui.LIVE_TAB]
        judged = [r for r in added if r.end_epoch_s >= now - 30.5]
        expected = evaluate_step(judged, load_slo(None))
        assert len(judged) == 13 and [row["tier"] for row in tab["data"]] == [tier.tier.label for tier in expected.tiers]
        assert {row["requests"] for row in tab["data"]} == {13}
        assert [row["verdict"] for row in tab["data"]] == ["pass" if t.passed else "FAIL" for t in expected.tiers]
        assert [row["ttft"] for row in tab["data"]] == [ttft_text(t) for t in expected.tiers]
        assert {row["agents"] for row in tab["data"]} == {0} and {row["window"] for row in tab["data"]} == {"last 30 s"}
    finally:
        web_ui.greenlet.kill()  # the server never got to start: the test client needs none


def test_the_steps_tab_shows_each_step_s_server_numbers_and_each_failing_tier_s_diagnosis(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["locust"])
    environment, shape = searched(tmp_path)
    install_agentperf()
    options = argument_parser.get_parser().parse_args([])  # the web UI's start form reads all of Locust's
    vars(options).update(vars(environment.parsed_options))
    environment.parsed_options = options
    web_ui = environment.create_web_ui("127.0.0.1", 0)
    try:
        search_tabs.install(environment, web_ui=web_ui)
        (steps_table,) = [table for table in web_ui.template_args["extended_tables"]
                          if table["key"] == search_tabs.STEPS_TAB]
        keys = [column["key"] for column in steps_table["structure"]]
        assert {"server_waiting", "server_queue", "server_ttft", "load_generator_cpu", "why", "evidence"} <= set(keys)
        answer = web_ui.app.test_client().get("/stats/requests").get_json()
        (tab,) = [tab for tab in answer["extended_stats"] if tab["key"] == search_tabs.STEPS_TAB]
        expected = [(step, verdict) for step in reversed(shape.steps) for verdict in step.verdict.tiers]
        assert [(row["step"], row["tier"]) for row in tab["data"]] == [(s.index, v.tier.label) for s, v in expected]
        for row, (step, verdict) in zip(tab["data"], expected):
            server = step.server
            assert row["server_waiting"] == f"{server.requests_waiting_mean:.3g} / {server.requests_waiting_max:.3g}"
            kv = (server.kv_cache_usage_mean * 100, server.kv_cache_usage_max * 100)
            assert row["server_kv_cache"] == f"{kv[0]:.0f} % / {kv[1]:.0f} %"
            assert row["server_prefix_hits"] == "90 %" and row["server_preemptions"] == "0"
            times = (server.queue_time_mean_s, server.ttft_mean_s, server.inter_token_latency_mean_s)
            assert (row["server_queue"], row["server_ttft"], row["server_itl"]) == tuple(map(seconds, times))
            assert row["load_generator_cpu"] == "50 % of a core (worker-1-99)"
            found = [d for d in step.diagnoses if d.tier == verdict.tier.name]
            if verdict.passed:
                assert not found and (row["why"], row["evidence"]) == ("", "")
            else:
                assert (row["why"], row["evidence"]) == ("queueing", found[0].summary)
                assert row["evidence"].endswith(" requests waiting on average, queue time 80 % of TTFT (800 ms of 1 s)")
        assert {row["server_queue"] for row in tab["data"]} == {"800 ms"}
    finally:
        web_ui.greenlet.kill()
