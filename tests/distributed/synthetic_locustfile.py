"""Synthetic agents for the distributed aggregation test: no HTTP, each "request" sleeps and adds a
record with known values to the process's RecordLog. TTFT is 0.1 s times the agent count of the
load step the request saw (via the master's step broadcast), so the capacity per tier is known.
"""

import itertools
import time

import gevent
import locust.runners
from locust import User, constant, events, task

from agentperf_users.locustfiles.plugin import install
from agentperf_users.measure import aggregate
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.search.shape import CapacitySearchShape  # noqa: F401  (the shape Locust runs)

install(events, agents=False, search=True)  # the record union, metrics, tabs and the search; no AgentUser
locust.runners.WORKER_REPORT_INTERVAL = 1.0  # reports every second instead of 3: a shorter test

TTFT_PER_AGENT_S = 0.1
REQUEST_S = 0.25
FAIL_EVERY = 10

_local_agent_numbers = itertools.count()  # test fixture: unique agent numbers within this process


class SyntheticAgent(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.log = aggregate.get_record_log(self.environment)
        self.agent = self.environment.runner.worker_index * 1000 + next(_local_agent_numbers)
        self.turn = 0

    @task
    def request(self) -> None:
        step = aggregate.current_step(self.environment)
        start = time.time()
        gevent.sleep(REQUEST_S)
        end = time.time()
        failed = self.turn % FAIL_EVERY == FAIL_EVERY - 1
        ttft = TTFT_PER_AGENT_S * step.agents
        self.log.add(
            RequestRecord(
                run_id=aggregate.run_id(self.environment),
                worker_id=aggregate.process_id(self.environment),
                agent=self.agent,
                trajectory="synthetic",
                turn=self.turn,
                load_step=step.index,
                scheduled_start_epoch_s=start,
                start_epoch_s=start,
                end_epoch_s=end,
                ttfb_s=None if failed else ttft,
                ttft_s=None if failed else ttft,
                e2e_s=end - start,
                itl_p50_s=None,
                itl_p95_s=None,
                itl_max_s=None,
                output_tokens=0 if failed else 20,
                output_tokens_estimated=False,
                prompt_tokens=100,
                cached_tokens=0,
                output_tps=None if failed else 100.0,
                status=Status.HTTP_5XX if failed else Status.OK,
                message="synthetic failure" if failed else "",
            )
        )
        self.turn += 1

