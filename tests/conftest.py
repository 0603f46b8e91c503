"""Every test runs in the process state Locust creates: gevent's monkey-patching, applied first.

Importing locust runs ``gevent.monkey.patch_all()``. Several test modules import locust, so without
this the patching would happen partway through collection, after ``ssl`` was already imported by
others (gevent warns that this can break them), and a test would run patched or not depending on
which other modules were collected with it. Importing locust here, before any test module, makes a
test behave the same alone and in the whole suite. Whatever must not become a greenlet (the
simulator's event loop) runs in a child process: see :func:`tests.simulator.simulator`.
"""

import locust  # noqa: F401  # imported for its monkey-patching; must stay this file's first import
