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
from agentperf_users.measure.slo import evaluate_step, load_slo, ttft_text
from agentperf_users.report import webui
from tests.support import install_agentperf
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
