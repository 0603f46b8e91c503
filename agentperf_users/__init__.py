"""agentperf: how many concurrent coding agents can an LLM serving system hold within its SLOs.

Data flows one way: trajectory -> agent user -> streaming client -> request record -> aggregation ->
SLO verdict -> report. The simulator (``agentperf_users.simulator``) is a sibling that imports nothing
from the harness.
"""

__version__ = "0.1.0"
