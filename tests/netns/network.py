"""Hosts without a cluster: network namespaces on this machine, one per "host", joined to a bridge by
veth pairs, with addresses in a private /24. A process started in a host's namespace sees only that
host's loopback and its one link, so whatever it exchanges with another host (a Locust worker's reports,
its requests to the target) crosses the bridge, as between machines.

Needs root (``ip netns add``): where that is not permitted the tests are skipped, unless
``AGENTPERF_REQUIRE_NETNS=1`` (CI runs as root), where it is a failure. Everything made is removed on
close, even after a failure partway: the processes left in the namespaces (each one started there by the
test), then the namespaces, which takes their links and the bridge with them. Nothing is made in the
machine's own namespace, so the subnet cannot clash with the machine's networks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import NoReturn, Sequence

import pytest

SUBNET = "10.231.0"  # /24; private to these namespaces
BRIDGE = "br0"
LINK = "eth0"  # each host's one interface
IP_TIMEOUT_S = 10
KILL_WAIT_S = 10


class NetnsUnavailable(Exception):
    """``ip`` is missing, or making a namespace is not permitted here."""


@dataclass(frozen=True)
class Host:
    role: str
    namespace: str
    address: str
    port: str  # its link's end on the bridge, in the hub's namespace

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def unavailable(reason: str) -> NoReturn:
    """A skip where namespaces cannot be made; a failure where CI demands them."""
    if os.environ.get("AGENTPERF_REQUIRE_NETNS") == "1":
        pytest.fail(f"{reason} (AGENTPERF_REQUIRE_NETNS=1: run as root with iproute2 installed)", pytrace=False)
    pytest.skip(reason)


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def links() -> set[str]:
    """The interfaces of the machine's own namespace, by name."""
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    return {line.split(": ")[1].split("@")[0] for line in listed.stdout.splitlines() if ": " in line}


class PrivateNetwork:
    """``with PrivateNetwork(["master", "target", "worker1"]) as net: net.hosts["worker1"].command(...)``.

    The first role's namespace holds the bridge (its address is the bridge's); every other host has a
    veth pair whose one end is a port of that bridge. Addresses: SUBNET.1, .2, ... in the roles' order."""

    def __init__(self, roles: Sequence[str]):
        if len(roles) > 250:
            raise ValueError("a /24 holds at most 250 hosts here")
        self.prefix = f"agentperf-{uuid.uuid4().hex[:8]}"
        self.hosts = {role: Host(role, f"{self.prefix}-{role}", f"{SUBNET}.{index}", f"veth{index}")
                      for index, role in enumerate(roles, 1)}
        self._made: list[str] = []

    def __enter__(self) -> "PrivateNetwork":
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open_or_skip(self) -> "PrivateNetwork":
        """The network made (close it in a ``finally``), or the test skipped (failed under
        AGENTPERF_REQUIRE_NETNS=1) where it cannot be made, with nothing left of it."""
        try:
            return self.__enter__()
        except NetnsUnavailable as exc:
            reason = str(exc)
        unavailable(f"network namespaces cannot be made here: {reason}")

    @property
    def hub(self) -> Host:
        return next(iter(self.hosts.values()))

    def _build(self) -> None:
        hub = self.hub
        for host in self.hosts.values():
            _ip("netns", "add", host.namespace)
            self._made.append(host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("-n", hub.namespace, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", hub.namespace, "addr", "add", f"{hub.address}/24", "dev", BRIDGE)
        _ip("-n", hub.namespace, "link", "set", BRIDGE, "up")
        for host in list(self.hosts.values())[1:]:
            _ip("-n", hub.namespace, "link", "add", host.port, "type", "veth", "peer", "name", LINK, "netns",
                host.namespace)
            _ip("-n", hub.namespace, "link", "set", host.port, "master", BRIDGE)
            _ip("-n", hub.namespace, "link", "set", host.port, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", LINK)
            _ip("-n", host.namespace, "link", "set", LINK, "up")

    def received_bytes(self) -> dict[str, int]:
        """Bytes the bridge received from each host but the hub (what that host sent over its link)."""
        hub, counts = self.hub, {}
        for host in list(self.hosts.values())[1:]:
            (shown,) = json.loads(_ip("-n", hub.namespace, "-j", "-s", "link", "show", host.port).stdout)
            counts[host.role] = shown["stats64"]["rx"]["bytes"]
        return counts

    def close(self) -> None:
        """Every process still in a namespace made here, killed (each was started there by the test), then
        the namespaces: a namespace outlives its name while a process holds it."""
        for namespace in reversed(self._made):
            self._kill_processes_in(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=IP_TIMEOUT_S, check=False)
        self._made.clear()

    @staticmethod
    def _kill_processes_in(namespace: str) -> None:
        def pids() -> list[int]:
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                                    timeout=IP_TIMEOUT_S, check=False)
            return [int(pid) for pid in listed.stdout.split()]

        deadline = time.monotonic() + KILL_WAIT_S
        while (left := pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)  # a bounded poll until the kernel has reaped them
