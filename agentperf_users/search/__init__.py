"""The capacity search: ``policy`` decides which agent count comes next from the verdicts (no Locust, no
clock); ``shape`` runs it live as a Locust ``LoadTestShape`` (ramp, warm-up, judged window); ``truth``
runs the same policy against the simulator's engine on a virtual clock, the ground truth a live search
is checked against."""
