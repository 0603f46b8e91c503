"""Every test runs in the process state Locust creates: gevent's monkey-patching, applied first.

Importing locust runs ``gevent.monkey.patch_all()``. Several test modules import locust, so without
this the patching would happen partway through collection, after ``ssl`` was already imported by
others (gevent warns that this can break them), and a test would run patched or not depending on
which other modules were collected with it. Importing locust here, before any test module, makes a
test behave the same alone and in the whole suite. Whatever must not become a greenlet (the
simulator's event loop) runs in a child process: see :func:`tests.simulator.simulator`.
"""

import locust  # noqa: F401  # imported for its monkey-patching; must stay this file's first import

HEAVY_MARKERS = ("engine", "containers", "netns")


def pytest_collection_modifyitems(config, items):
    """The heavy real parts (a vLLM engine holding a core and 4 GB, a Docker daemon and its containers, a
    search across network namespaces) run after everything else, each group together, so that no
    timing-sensitive test runs beside them on a 2-core machine (their fixtures end with their folder's
    tests)."""

    def group(item) -> int:
        for rank, marker in enumerate(HEAVY_MARKERS, 1):
            if item.get_closest_marker(marker) is not None:
                return rank
        return 0

    items.sort(key=group)  # stable: the order within each group stays pytest's own
