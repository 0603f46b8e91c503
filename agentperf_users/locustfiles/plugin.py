"""The one place agentperf is wired into Locust: options, listeners, web UI tabs and the statistics patch.

No module of the package registers anything when it is imported (tests, the ground truth and the report
import them freely, and an import never changes what Locust does); a locustfile calls :func:`install` once,
at its top, because Locust reads options from ``init_command_line_parser`` listeners after it imports the
locustfile and before it makes the Environment. The order below is the order the parts need: the record
log (``aggregate``) exists before the Prometheus collector, the tabs and the agents read it. The agents'
``test_start`` listener also runs the qualification probe on the master (or a LocalRunner), after it has
loaded the set: Locust fires ``test_start`` there before it spawns or dispatches a user (in a shape run,
after the shape's first tick, which only plans the step), so no agent sends to a server that cannot
serve the run (``--no-probe`` skips it; ``agentperf capacity`` probes before it starts Locust).
"""

from __future__ import annotations

import locust.stats
from locust.event import Events

from agentperf_users.client.chat import bucket_response_time_3sig
from agentperf_users.loadgen import agent
from agentperf_users.measure import aggregate
from agentperf_users.options import Group, add_options
from agentperf_users.report import prometheus, search_tabs, webui
from agentperf_users.search import shape


def install(events: Events, *, agents: bool = True, search: bool = False) -> None:
    """Register agentperf on ``events`` (``locust.events``): the record union, live SLO verdicts, metrics and
    the SLO now tab always; the agent user's options and lifecycle with ``agents``; the capacity search's
    options, signal handling and tabs with ``search``.

    It also sets Locust's response-time bucketing to 3 significant digits (Locust's own table rounds to 2,
    up to 5 % off for 10-60 s LLM latencies): bucketing happens where a sample is logged, so every process
    that runs the locustfile (master, workers, a local run) must make the same change."""
    locust.stats.bucket_response_time = bucket_response_time_3sig
    groups = [Group.SLO, Group.RUN, Group.METRICS]
    if agents:
        groups += [Group.WORKLOAD, Group.AGENT, Group.REPLAY]
    if search:
        groups += [Group.SEARCH, Group.PREDICT, Group.SEARCH_FILES]
    events.init_command_line_parser.add_listener(lambda parser: add_options(parser, groups, locust=True))
    events.init.add_listener(lambda environment, **_: aggregate.install(environment))
    events.init.add_listener(prometheus.serve)
    events.init.add_listener(webui.install)
    if agents:
        events.init.add_listener(agent.install)
        events.test_start.add_listener(agent.on_test_start)
        events.test_stop.add_listener(agent.on_test_stop)
    if search:
        events.init.add_listener(shape.install_signal_handlers)
        events.init.add_listener(search_tabs.install)
