"""The layout is the pipeline, and it stays one: no import circles, each stage imports only the stages
before it, the simulator only the shared leaves, and no module switches anything on in Locust by being
imported (a locustfile calls ``locustfiles.plugin.install``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "agentperf_users"
LEAVES = ("errors", "bounded", "options", "tokens", "stats", "files")  # import only leaves before them
STAGES = ("workload", "client", "measure", "loadgen", "search", "report", "twin", "locustfiles", "cli")  # dependency order
ENTRY_POINTS = ("agentperf_users.locustfiles.agents", "agentperf_users.locustfiles.capacity",
                "agentperf_users.simulator.__main__")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Every import of a project module, at any level of a file (a lazy import is still a dependency)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agentperf_users"):
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("agentperf_users")}
        graph[name] = {m for m in imported if m in known and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    """The stage, leaf or sibling a module belongs to (``agentperf_users.measure.slo`` -> ``measure``)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "agentperf_users"


def test_the_import_graph_has_no_circles():
    assert circles(import_graph()) == []


def test_circles_are_found():  # the check above can fail
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_each_stage_imports_only_the_leaves_and_the_stages_before_it():
    wrong = []
    for module, imported in import_graph().items():
        own = part(module)
        if own not in STAGES:
            continue
        allowed = {*LEAVES, "agentperf_users", "simulator", *STAGES[:STAGES.index(own) + 1]}
        wrong += [f"{module} -> {other}" for other in imported if part(other) not in allowed]
    assert wrong == []


def test_the_simulator_and_the_leaves_import_nothing_of_the_harness():
    graph = import_graph()
    simulator = {f"{m} -> {o}" for m, deps in graph.items() if part(m) == "simulator"
                 for o in deps if part(o) not in ("simulator", *LEAVES)}
    leaves = {f"{m} -> {o}" for m, deps in graph.items() if part(m) in LEAVES
              for o in deps if part(o) not in LEAVES[:LEAVES.index(part(m))]}
    assert simulator == set() and leaves == set()


def _module_file(module: str, beside: Path) -> Path | None:
    """The file of a project module (``agentperf_users``, ``tests``, ``benchmarks``, ``locustfiles``), or of a
    bare name a benchmark imports from its own folder (they put it on ``sys.path``); None: not the project's."""
    if module.split(".")[0] not in ("agentperf_users", "tests", "benchmarks", "locustfiles"):
        own = REPO / "benchmarks" / f"{module}.py"
        return own if beside.parent == own.parent and own.is_file() else None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return base  # a module that does not exist: reported below


def _defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (inside ``if``/``try``/``with`` too), and its submodules."""
    names = {child.stem if child.suffix == ".py" else child.name for child in path.parent.iterdir()} \
        if path.name == "__init__.py" else set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                        *(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)]
    return names


def unresolved_imports(files: list[Path]) -> list[str]:
    """``file:line module.name`` for each ``from MODULE import NAME`` of the project, at any depth of a file (a lazy
    import inside a benchmark's function runs only when that part runs), whose module or name does not exist."""
    wrong = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            target = _module_file(node.module, path)
            if target is None:
                continue
            defined = _defined_names(target) if target.is_file() else set()
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
            wrong += [f"{where}:{node.lineno} {node.module}.{a.name}" for a in node.names
                      if a.name != "*" and a.name not in defined]
    return wrong


def test_every_project_name_imported_anywhere_exists():
    """A refactor that moves a function breaks a benchmark's lazy import only when that part is run: found here."""
    folders = ("agentperf_users", "tests", "benchmarks", "locustfiles")
    files = [path for folder in folders for path in (REPO / folder).rglob("*.py")]
    assert unresolved_imports(files) == []


def test_an_import_of_a_moved_name_is_found(tmp_path):  # the check above can fail
    stale = tmp_path / "stale.py"
    stale.write_text("from agentperf_users.workload.readers import load_trajectories\n"
                     "def part():\n    from agentperf_users.workload.trajectory import load_trajectories\n"
                     "    from agentperf_users.nowhere import anything\n")
    assert unresolved_imports([stale]) == ["stale.py:3 agentperf_users.workload.trajectory.load_trajectories",
                                           "stale.py:4 agentperf_users.nowhere.anything"]


def test_every_stage_says_what_it_does():
    for stage in STAGES:
        docstring = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert docstring and len(docstring.split()) >= 20, stage


def _registrations(imports: list[str]) -> dict:
    """Locust's event handlers and its bucketing function in a fresh interpreter, after importing ``imports``."""
    script = f"""
import json, locust, locust.stats
original = locust.stats.bucket_response_time
import importlib
for name in {imports!r}:
    importlib.import_module(name)
handlers = {{k: len(v._handlers) for k, v in vars(locust.events).items() if hasattr(v, "_handlers")}}
print(json.dumps({{"handlers": handlers, "bucketing_patched": locust.stats.bucket_response_time is not original}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    import json

    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_importing_any_module_switches_nothing_on_in_locust():
    libraries = sorted(set(modules()) - set(ENTRY_POINTS))
    after = _registrations(libraries)
    assert after["bucketing_patched"] is False
    assert {event: count for event, count in after["handlers"].items() if count} == {}


def test_a_locustfile_installs_agentperf_once():  # and the check above sees a registration when there is one
    after = _registrations(["agentperf_users.locustfiles.capacity"])
    assert after["bucketing_patched"] is True
    assert after["handlers"]["init_command_line_parser"] == 1  # every option, from agentperf_users.options
    assert after["handlers"]["test_start"] == after["handlers"]["test_stop"] == 1
