"""The digital twin: the simulator calibrated from a measured server, then asked capacity questions.

Why: a planner asks "what if the SLO were 60 tok/s, the trajectories twice as long, twice the replicas?",
and a measured capacity search answers one such question per tens of minutes of held hardware. The
simulator's virtual-clock search (``agentperf truth``) answers in seconds, but only for a profile that
prices engine steps as *this* server does. So:

* ``calibrate`` (:mod:`agentperf_users.twin.calibrate`) sends a short designed probe
  (:mod:`agentperf_users.twin.probe_design`): cold prefills of rising length, groups of concurrent decodes
  at fixed contexts, a shared-prefix pair; reads the limits the server tells (``/v1/models``, vLLM's or
  SGLang's ``/metrics``: :mod:`agentperf_users.twin.server_limits`) and measures ``max_num_seqs`` where neither
  an option nor the server gives it (:mod:`agentperf_users.twin.probe_seqs`);
* :mod:`agentperf_users.twin.fit` fits the step-time constants of the simulator's roofline to what the
  probe measured (piecewise least squares: a step is memory- or compute-bound);
* :mod:`agentperf_users.twin.profile_yaml` turns the constants into a profile YAML that every
  ``--profile`` option accepts, with the fit's residuals beside it;
* ``predict`` (:mod:`agentperf_users.twin.predict`) runs the ground-truth search (:mod:`agentperf_users.search.truth`)
  on that profile and prints capacity per SLO tier.
"""
