"""Trajectory readers: resolve a spec to files, pick the format, and hand back a ``TrajectorySet``.

A spec is a trajectory file, a folder of them (its ``*.jsonl``, ``*.jsonl.gz``, ``*.yaml`` and
``*.yml`` files, not recursive), a JSON manifest listing trace files, or the name of a set bundled
with the package (``agentperf_users/data/trajectories/<name>/``). Every file of a set must be in the
same format: AA traces (``aa``), Mooncake traces (``mooncake``) or agentperf's compact format
(``agentperf``), sniffed from the first line unless given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from agentperf_users.errors import AgentperfError
from agentperf_users.readers.aa import read_aa
from agentperf_users.readers.common import fail, first_json_line, got, open_text
from agentperf_users.readers.compact import YAML_SUFFIXES, read_compact
from agentperf_users.readers.mooncake import read_mooncake
from agentperf_users.trajectory import TrajectoryPlan, TrajectorySet

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "trajectories"
TRACE_SUFFIXES = (".jsonl", ".jsonl.gz", *YAML_SUFFIXES)
READERS: dict[str, Callable[[Sequence[Path]], Sequence[TrajectoryPlan]]] = {
    "aa": read_aa,
    "mooncake": read_mooncake,
    "agentperf": read_compact,
}
FORMATS = ("auto", *READERS)


def bundled_sets() -> list[str]:
    """Names of the sets shipped with the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir() and _trace_files(p))


def read_set(spec: str, fmt: str = "auto") -> TrajectorySet:
    if fmt not in FORMATS:
        raise AgentperfError(f"unknown trajectory format {fmt!r} (expected {', '.join(FORMATS)})")
    path, name = _resolve(spec)
    files = _expand(path)
    formats = {file: fmt if fmt != "auto" else sniff(file) for file in files}
    if len(set(formats.values())) > 1:
        first, other = files[0], next(f for f in files if formats[f] != formats[files[0]])
        raise AgentperfError(f"{spec}: one set must use one format, but {first} is {formats[first]} "
                             f"and {other} is {formats[other]}")
    plans = READERS[formats[files[0]]](files)
    if not plans:
        raise AgentperfError(f"{spec}: no trajectories in {', '.join(str(f) for f in files)}")
    return TrajectorySet(name, plans, source=str(path))


def sniff(path: Path) -> str:
    """The format of one trace file, from its name (YAML) or its first JSON line."""
    if path.name.endswith(YAML_SUFFIXES):
        return "agentperf"
    first = first_json_line(path)
    if first is None:
        raise AgentperfError(f"{path}: empty file, no trajectories")
    number, obj = first
    if "hash_ids" in obj:
        return "mooncake"
    if "conversation_id" in obj:
        return "aa"
    if "turns" in obj or "agentperf" in obj:
        return "agentperf"
    fail(f"{path}:{number}", "unknown trajectory format: expected an AA trace line (conversation_id), a "
                             "Mooncake line (hash_ids) or an agentperf trajectory (turns) or header (agentperf)")


def _resolve(spec: str) -> tuple[Path, str]:
    path = Path(spec)
    if spec and path.exists():
        # A folder or a manifest is named after its folder (AA: replays/<set>/manifest-x86_64.json).
        named_by_folder = path.is_dir() or path.suffix == ".json"
        name = (path if path.is_dir() else path.parent).resolve().name if named_by_folder else path.name.split(".")[0]
        return path, name
    bundled = BUNDLED_DIR / spec
    if spec and "/" not in spec and "\\" not in spec and bundled.is_dir():
        return bundled, spec
    names = ", ".join(bundled_sets()) or "none"
    raise AgentperfError(f"{spec or '(empty)'}: no such trajectory file or folder, and not a bundled set ({names})")


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = _trace_files(path)
        if not files:
            raise AgentperfError(f"{path}: no trajectory files ({', '.join('*' + s for s in TRACE_SUFFIXES)}) in folder")
        return files
    if path.suffix == ".json":
        return _manifest(path)
    return [path]


def _trace_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TRACE_SUFFIXES))


def _manifest(path: Path) -> list[Path]:
    """Trace files listed by a manifest: AA's ``{"tasks": [{"trace": ...}]}``, ``{"traces": [...]}``
    or a plain list; paths are relative to the manifest."""
    try:
        with open_text(path) as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        fail(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg})")
    except (OSError, UnicodeDecodeError) as exc:
        fail(str(path), f"cannot read ({exc})")
    if isinstance(document, dict) and isinstance(document.get("tasks"), list):
        entries = [task.get("trace") if isinstance(task, dict) else task for task in document["tasks"]]
    elif isinstance(document, dict):
        entries = document.get("traces")
    else:
        entries = document
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        fail(str(path), "a manifest must list trace files: tasks[].trace, traces: [...], or a list of paths; "
                        f"got {got(document)}")
    files = [path.parent / entry for entry in entries]
    for entry, file in zip(entries, files):
        if not file.is_file():
            fail(str(path), f"trace file {entry} does not exist ({file})")
    return files
