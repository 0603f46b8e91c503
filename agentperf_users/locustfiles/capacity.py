"""Agents plus the capacity search: the load shape steps the agent count up, then bisects per SLO tier.

    locust -f locustfiles/capacity.py --host http://127.0.0.1:8000 [--slo tiers.yaml] [--max-agents 64]
"""

from locust import events

from agentperf_users.loadgen.agent import AgentUser  # noqa: F401  (the user class Locust runs)
from agentperf_users.locustfiles.plugin import install
from agentperf_users.search.shape import CapacitySearchShape  # noqa: F401  (the shape Locust runs)

install(events, search=True)
