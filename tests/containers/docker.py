"""What the container tests share: whether a Docker daemon is there (a skip without one, a failure where
CI demands the containers run), and the base image to build from."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

CI_BASE_IMAGE = "agentperf-base:bookworm"  # what .ci/install-docker builds (no registry in CI)
DOCKERFILE_BASE_IMAGE = "python:3.11-slim"  # the Dockerfile's default (needs a registry)
IMAGE = "locust-agentperf:0.1.0"  # docker-compose.yml's name for the project's image


def runs(command: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=REPO)


def unavailable(reason: str) -> None:
    """A skip on a machine without Docker; a failure where CI demands the containers run."""
    if os.environ.get("AGENTPERF_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"{reason} (AGENTPERF_REQUIRE_CONTAINERS=1; .ci/install-docker sets one up)")
    pytest.skip(reason)


def docker_or_skip() -> None:
    if shutil.which("docker") is None or runs(["docker", "info"]).returncode != 0:
        unavailable("no Docker daemon answers (`docker info`)")


def base_image() -> str:
    """The offline base where .ci/install-docker built one, else the Dockerfile's own default."""
    built = runs(["docker", "image", "inspect", CI_BASE_IMAGE]).returncode == 0
    return CI_BASE_IMAGE if built else DOCKERFILE_BASE_IMAGE


def image_or_skip() -> str:
    """The project's image, built from the repository (cached layers when compose or CI built it)."""
    docker_or_skip()
    built = runs(["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base_image()}", "-t", IMAGE, "."],
                 timeout_s=900)
    assert built.returncode == 0, built.stderr[-3000:]
    return IMAGE
