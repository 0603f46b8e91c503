"""The SLO tabs in Locust's web UI, in a real headless Chromium: a real master with its web UI (and two
real workers, synthetic agents with known verdicts) runs the search; the tables the page renders must
say what the search decided, step by step and tier by tier."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from html import unescape

import pytest

from tests.distributed.test_distributed import RUN_TIMEOUT_S, SLO_FILE, free_port, locust

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root in a container, without a GPU, and with no background connections to a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rendered_rows(url: str, profile_dir) -> list[list[str]]:
    """The page's table rows as text, after its scripts ran and fetched their data."""
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--virtual-time-budget=8000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, re.S):
        rows.append([unescape(re.sub(r"<[^>]+>", "", cell)).strip()
                     for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)])
    return rows


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's)")
def test_the_slo_tabs_show_what_the_search_decided(tmp_path):
    web_port, master_port = free_port(), str(free_port())
    summary_path = tmp_path / "capacity.json"
    master = locust(
        "--master", "--autostart", "--web-host", "127.0.0.1", "--web-port", str(web_port),
        "--expect-workers", "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", master_port,
        "--records-dir", str(tmp_path / "records"), "--slo", str(SLO_FILE),
        "--start-agents", "2", "--step-agents", "2", "--max-agents", "4", "--agent-spawn-rate", "20",
        "--warmup-s", "1", "--window-s", "2", "--capacity-json", str(summary_path),
        log=tmp_path / "master.log",
    )
    workers = [locust("--worker", "--master-host", "127.0.0.1", "--master-port", master_port,
                      log=tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not summary_path.exists():  # written when the search ends; the web UI stays up
            assert time.monotonic() < deadline and master.poll() is None, (tmp_path / "master.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(0.5)
        base = f"http://127.0.0.1:{web_port}/?tab="
        steps_table = rendered_rows(base + "agentperf-steps", tmp_path / "chromium-steps")
        capacity_table = rendered_rows(base + "agentperf-capacity", tmp_path / "chromium-capacity")
    finally:
        for process in [master, *workers]:
            if process.poll() is None:
                process.terminate()
            process.wait(15)

    summary = json.loads(summary_path.read_text())
    labels = {tier["name"]: tier["label"] for tier in summary["slo"]["tiers"]}
    assert steps_table[0] == ["Step", "Phase", "Agents", "SLO tier", "Verdict", "TTFT", "Output speed", "Requests",
                              "Errors"]
    expected = [[str(step["index"]), step["phase"], str(step["agents"]), labels[verdict["tier"]],
                 "pass" if verdict["passed"] else "FAIL", verdict["requests"], verdict["errors"]]
                for step in reversed(summary["steps"]) for verdict in step["verdict"]["tiers"]]
    shown = [row[:5] + [int(row[7]), int(row[8])] for row in steps_table[1:]]
    assert shown == expected and len(shown) == 6  # three steps, two tiers, newest first

    assert capacity_table[0][:3] == ["SLO tier", "Capacity", "Latest step: agents"]
    capacity = {row[0]: row[1] for row in capacity_table[1:]}
    assert capacity == {labels[name]: f"{c['agents']} agents (fails at {c['first_failing_agents']})"
                        for name, c in summary["capacity"].items()}
    assert capacity[labels["loose"]] == "3 agents (fails at 4)"  # the synthetic agents' known answer
