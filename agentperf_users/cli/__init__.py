"""The ``agentperf`` command: ``main`` dispatches the subcommands; ``capacity`` runs a whole capacity
search (simulator, Locust master and workers, report) headless."""
