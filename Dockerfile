# One image for every role of a distributed run: the embedded simulator (`agentperf simulate`), the
# master (`agentperf capacity --remote-workers N`) and the workers (`locust -f locustfiles/capacity.py
# --worker`). docker-compose.yml and the Helm chart (helm/agentperf) both run it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/agentperf
COPY pyproject.toml README.md ./
COPY agentperf_users ./agentperf_users
RUN pip install . && rm -rf build
COPY locustfiles ./locustfiles

# Not root; uid 1000, so a run folder bind-mounted from a typical desktop account stays the user's.
RUN useradd --create-home --uid 1000 agentperf
USER agentperf
WORKDIR /home/agentperf
# 8000 the simulator, 5557 the Locust master (workers connect), 8089 the Locust web UI.
EXPOSE 8000 5557 8089
CMD ["agentperf", "--help"]
