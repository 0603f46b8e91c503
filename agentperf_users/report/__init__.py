"""What people read: ``build`` writes a run's report.json, steps.csv and report.html once after the run;
``prometheus`` exports the master's live numbers; ``webui`` and ``search_tabs`` add agentperf's tabs to
Locust's web UI."""
