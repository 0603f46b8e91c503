"""Measurement: where a request's record is made and a verdict is decided.

``records`` is the frozen per-request contract (``RequestRecord`` is built from a ``ChatResult`` in
``loadgen.agent``); ``aggregate`` carries every worker's records to the master exactly (no averages of
averages); ``slo`` decides a window's verdict per tier from those records; ``server_metrics``, ``power``
and ``scrape`` read the server's own numbers beside them; ``diagnose`` says why a failing step failed."""
