"""The workload: agent trajectories, typed (``trajectory``), read from AA, Mooncake and compact files
(``readers``), or synthesised with AA-AgentPerf's statistics (``synth``, ``textgen``).

Nothing here talks to a server or knows about Locust: a trajectory set is data the load generator and
the ground truth both replay."""
