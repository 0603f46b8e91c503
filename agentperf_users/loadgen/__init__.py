"""The load generator: ``agent.AgentUser`` is one Locust user per agent, replaying a trajectory's turns
under the replay rules (``replay``: session dealing, tool waits, cache namespaces) that the ground truth
also follows, with request bodies from ``body``. ``probe`` qualifies a server with one request of the
run's own shape before the first step. Each request goes through ``client`` and becomes a record."""
