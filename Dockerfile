# One image for every role of a distributed run: the embedded simulator (`agentperf simulate`), the
# master (`agentperf capacity --remote-workers N`) and the workers (`locust -f locustfiles/capacity.py
# --worker`). docker-compose.yml and the Helm chart (helm/agentperf) both run it.
# The base: any Debian-based image whose `python`/`pip` are a Python >= 3.10 that may install packages.
# CI, with no registry in reach, builds one offline (.ci/install-docker) and passes it with
# --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/agentperf
COPY pyproject.toml README.md ./
# The dependencies first, in a layer of their own (an empty package stands in for the source), so that a
# change to agentperf_users rebuilds in seconds instead of downloading and installing them all again.
RUN mkdir agentperf_users && touch agentperf_users/__init__.py && pip install . \
    && pip uninstall -y locust-agentperf && rm -rf agentperf_users build
COPY agentperf_users ./agentperf_users
RUN pip install --no-deps . && rm -rf build
COPY locustfiles ./locustfiles
# docker-compose.yml's entrypoints: the master takes its run folder's mount, the workers outlive its quit.
COPY docker/own-runs-folder docker/worker-until-master-ends ./docker/

# Not root; uid 1000, so a run folder bind-mounted from a typical desktop account stays the user's.
RUN useradd --create-home --uid 1000 agentperf
USER agentperf
WORKDIR /home/agentperf
# 8000 the simulator, 5557 the Locust master (workers connect), 8089 the Locust web UI.
EXPOSE 8000 5557 8089
CMD ["agentperf", "--help"]
