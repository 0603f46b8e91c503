"""Agents plus the capacity search (the load shape steps the agent count up, then bisects per SLO tier).

    locust -f locustfiles/capacity.py --host http://127.0.0.1:8000 [--slo tiers.yaml] [--max-agents 64]

The locustfile itself lives in the package (``agentperf_users/locustfiles/capacity.py``) so that
``agentperf capacity`` finds it in an installed wheel; this file is the entry point for ``locust -f``.
"""

from agentperf_users.locustfiles.capacity import AgentUser, CapacitySearchShape  # noqa: F401
