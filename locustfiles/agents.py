"""The agentperf locustfile: one Locust user per coding agent, a fixed number of agents (``-u``).

    locust -f locustfiles/agents.py --host http://127.0.0.1:8000 [-u 32 -r 8] [--trajectories demo]

Agent options (``--trajectories``, ``--tool-wait``, ``--records-dir``, ...) are listed, with their
defaults, in ``locust.conf``; they also appear in the web UI's start form and can be set as
``LOCUST_<NAME>`` variables. (Locust prints ``--help`` before it loads a locustfile, so they are not
there.) The same locustfile ships inside the package (``agentperf_users/locustfiles/agents.py``, for an
installed wheel); this one is it, for ``locust -f`` from a checkout.
"""

# Importing it installs agentperf into Locust (agentperf_users.locustfiles.plugin.install): its options,
# listeners and tabs, and 3-significant-digit response-time buckets in every process that runs it.
from agentperf_users.locustfiles.agents import AgentUser  # noqa: F401  (the user class Locust runs)
