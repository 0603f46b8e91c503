"""Agents only: a fixed number of agents (``-u``), as in any Locust test.

    locust -f locustfiles/agents.py --host http://127.0.0.1:8000 [-u 32 -r 8] [--trajectories demo]
"""

import locust.stats

import agentperf_users.report.prometheus  # noqa: F401  (--metrics-port)
import agentperf_users.report.webui  # noqa: F401  (the SLO now tab of the web UI)
from agentperf_users.loadgen.agent import AgentUser  # noqa: F401  (the user class Locust runs)
from agentperf_users.client.chat import bucket_response_time_3sig

# Locust's own table rounds response times to 2 significant digits (up to 5 % off for 10-60 s LLM
# latencies). Bucketing happens where a sample is logged, so this is set at import: in the master, every
# worker and a local run alike.
locust.stats.bucket_response_time = bucket_response_time_3sig
