"""``python -m agentperf_users.simulator``: the simulator's command line without the harness."""

import sys

from agentperf_users.simulator.cli import main

sys.exit(main())
