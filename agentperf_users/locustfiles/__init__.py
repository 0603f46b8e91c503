"""Locustfiles shipped inside the package, so ``agentperf capacity`` finds them in an installed wheel.
The top-level ``locustfiles/`` folder holds the same two entry points for ``locust -f``."""
