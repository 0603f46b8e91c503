"""agentperf: how many concurrent coding agents can an LLM serving system hold within its SLOs.

The subpackages are the pipeline, in the order a request's data flows through them:

    workload/  trajectories: the typed model, the readers (AA, Mooncake, compact), synthesis
    loadgen/   one Locust user per agent: dealing sessions, replay rules, request bodies, the probe
    client/    the streaming chat client: timed socket reads, SSE parsing -> one ChatResult per request
    measure/   request records (made here, from a ChatResult), their union over workers, SLO verdicts,
               the server's own metrics and power, and the diagnosis of a failing step
    search/    which agent count next: the policy, the Locust shape that runs it live, the ground truth
    report/    what people read: report files, Prometheus metrics, the web UI's tabs
    cli/       the ``agentperf`` command

``simulator/`` is a sibling: an OpenAI-compatible server and its engine. It imports nothing from the
stages above; both sides share only the leaf modules here that import nothing of agentperf's:
``tokens`` (how both count tokens), ``bounded`` (bounded readers for every input), ``errors`` and
``files``. ``locustfiles/`` are the entry points ``locust -f`` and ``agentperf capacity`` load.
"""

__version__ = "0.1.0"
