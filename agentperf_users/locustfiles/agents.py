"""Agents only: a fixed number of agents (``-u``), as in any Locust test.

    locust -f locustfiles/agents.py --host http://127.0.0.1:8000 [-u 32 -r 8] [--trajectories demo]
"""

from locust import events

from agentperf_users.loadgen.agent import AgentUser  # noqa: F401  (the user class Locust runs)
from agentperf_users.locustfiles.plugin import install

install(events)
