"""Locustfiles shipped inside the package, so ``agentperf capacity`` finds them in an installed wheel
(the top-level ``locustfiles/`` folder holds the same two entry points for ``locust -f``), and
``plugin.install``, the one call that wires agentperf into Locust."""
