"""docker-compose.yml's entrypoints in the project's image, one container each (seconds, not a stack): the
master's takes a run folder the daemon created as root and runs the command as AGENTPERF_USER with no
capability left, and refuses in one line a folder another user owns; the workers' passes a failure
through at once and, after a clean end, waits only while the master's name resolves."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.containers.docker import image_or_skip, runs

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(900)]

RUNS = "/runs/agentperf-runs"
# The master's service in docker-compose.yml: root with only what taking the folder needs.
MASTER = ["--user", "root", "--cap-drop", "ALL", "--cap-add", "CHOWN", "--cap-add", "SETUID", "--cap-add", "SETGID",
          "--security-opt", "no-new-privileges:true", "--entrypoint", "/opt/agentperf/docker/own-runs-folder"]
WORKER = ["--entrypoint", "/opt/agentperf/docker/worker-until-master-ends"]


@pytest.fixture(scope="module")
def image() -> str:
    return image_or_skip()


def _run(image: str, options: list[str], command: list[str], timeout_s: float = 60):
    return runs(["docker", "run", "--rm", *options, image, *command], timeout_s=timeout_s)


@pytest.mark.parametrize(("user", "home"), [("1000:1000", "/home/agentperf"), ("1234:1235", "/tmp")])
def test_the_master_takes_a_daemon_made_folder_and_drops_to_the_user(image, tmp_path, user, home):
    """The image's own user, and one the image has no account for (AGENTPERF_USER=$(id -u):$(id -g))."""
    folder = tmp_path / "made-by-the-daemon"
    folder.mkdir()
    os.chown(folder, 0, 0)  # what the daemon leaves for a missing bind-mount source
    ran = _run(image, [*MASTER, "-v", f"{folder}:{RUNS}", "-e", f"AGENTPERF_USER={user}"],
               ["sh", "-c", f"id -u; id -g; id -G; grep CapEff /proc/self/status; echo $HOME; touch {RUNS}/written"])
    assert ran.returncode == 0, ran.stderr
    uid, gid, groups, caps, home_seen = ran.stdout.split("\n")[:5]
    assert f"{uid}:{gid}" == user and groups == gid  # no supplementary group left
    assert caps.split() == ["CapEff:", "0000000000000000"] and home_seen == home
    assert f"{folder.stat().st_uid}:{folder.stat().st_gid}" == user
    assert (folder / "written").stat().st_uid == int(uid)


def test_the_master_refuses_a_folder_another_user_owns_in_one_line(image, tmp_path):
    folder = tmp_path / "someone-elses"
    folder.mkdir(mode=0o755)
    os.chown(folder, 1234, 1234)
    ran = _run(image, [*MASTER, "-v", f"{folder}:{RUNS}", "-e", "AGENTPERF_USER=1000:1000"], ["true"])
    assert ran.returncode == 2
    (line,) = ran.stderr.strip().splitlines()
    assert "owned by uid 1234" in line and "AGENTPERF_USER=$(id -u):$(id -g)" in line
    assert folder.stat().st_uid == 1234  # left as it was


def test_a_failing_worker_exits_at_once_with_its_code(image):
    ran = _run(image, WORKER, ["sh", "-c", "exit 5"])
    assert ran.returncode == 5 and "waiting" not in ran.stdout


def test_a_worker_told_to_quit_waits_while_the_master_is_there(image):
    network = f"agentperf-test-{uuid.uuid4().hex[:8]}"
    master = f"{network}-master"
    assert runs(["docker", "network", "create", network]).returncode == 0
    try:
        started = runs(["docker", "run", "-d", "--rm", "--network", network, "--name", master, "--network-alias",
                        "master", "--entrypoint", "sleep", image, "600"])
        assert started.returncode == 0, started.stderr
        # The master is there for the whole bounded linger: the worker leaves when the bound ends.
        waited = _run(image, [*WORKER, "--network", network, "-e", "AGENTPERF_WORKER_LINGER_S=3"],
                      ["true"])
        assert waited.returncode == 0 and "the master is still there after 3 s; leaving" in waited.stdout
        assert runs(["docker", "rm", "-f", master]).returncode == 0
        # Once the master is gone, it leaves at once even with a long bound.
        gone = _run(image, [*WORKER, "--network", network, "-e", "AGENTPERF_WORKER_LINGER_S=600"], ["true"],
                    timeout_s=60)
        assert gone.returncode == 0 and "the master is gone (waited 0 s)" in gone.stdout
    finally:
        runs(["docker", "rm", "-f", master])
        runs(["docker", "network", "rm", network])
