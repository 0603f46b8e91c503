"""Trajectory readers: resolve a spec to files, pick the format, and hand back a ``TrajectorySet``.

A spec is a trajectory file, a folder of them (its ``*.jsonl``, ``*.jsonl.gz``, ``*.yaml`` and
``*.yml`` files, not recursive), a JSON manifest listing trace files, or the name of a set bundled
with the package (``agentperf_users/data/trajectories/<name>/``). Every file of a set must be in the
same format: AA traces (``aa``), Mooncake traces (``mooncake``) or agentperf's compact format
(``agentperf``), sniffed from the first line unless given.

A manifest lists files relative to its own folder, and may not reach outside it: an absolute path, a
``..`` or a symbolic link that leads out of the folder is refused, so a manifest that came with a
downloaded set can't make agentperf read (and send to a server, or echo in an error) files elsewhere.
The person running agentperf (never the file) can allow it: ``allow_outside=True`` here,
``agentperf trajectories stats --allow-outside-manifest``, or the environment variable
``AGENTPERF_MANIFEST_OUTSIDE=1``, which reaches every process of a run (Locust workers included).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from agentperf_users.bounded import short
from agentperf_users.errors import AgentperfError
from agentperf_users.options import TRAJECTORY_FORMATS
from agentperf_users.workload.readers.aa import read_aa
from agentperf_users.workload.readers.common import (
    fail,
    first_json_line,
    got,
    parse_json,
    read_file_text,
)
from agentperf_users.workload.readers.compact import YAML_SUFFIXES, read_compact
from agentperf_users.workload.readers.mooncake import read_mooncake
from agentperf_users.workload.trajectory import TrajectoryPlan, TrajectorySet

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data" / "trajectories"
TRACE_SUFFIXES = (".jsonl", ".jsonl.gz", *YAML_SUFFIXES)
READERS: dict[str, Callable[[Sequence[Path]], Sequence[TrajectoryPlan]]] = {
    "aa": read_aa,
    "mooncake": read_mooncake,
    "agentperf": read_compact,
}
FORMATS = TRAJECTORY_FORMATS  # "auto" (sniffed) and the READERS (tests/test_layout.py checks they agree)
MANIFEST_OUTSIDE_ENV = "AGENTPERF_MANIFEST_OUTSIDE"
"""Set to 1 to let manifests list files outside their folder (see the module docstring)."""
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_ENTRIES = 100_000
MAX_PATH_CHARS = 4096


def bundled_sets() -> list[str]:
    """Names of the sets shipped with the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir() and _trace_files(p))


def load_trajectories(spec: str, fmt: str = "auto", allow_outside: bool | None = None) -> TrajectorySet:
    """Load a set from a file, a folder, a manifest, or a bundled set name ("default", "demo").

    ``fmt`` is ``auto`` (sniffed from content), ``aa``, ``mooncake`` or ``agentperf``. Raises
    ``AgentperfError`` with a one-line ``path:line: ...`` message on any problem; nothing is
    half-loaded. ``allow_outside``: whether a manifest may list files outside its folder (None: as the
    environment variable ``AGENTPERF_MANIFEST_OUTSIDE`` says, default no)."""
    if fmt not in FORMATS:
        raise AgentperfError(f"unknown trajectory format {short(fmt)} (expected {', '.join(FORMATS)})")
    if allow_outside is None:
        allow_outside = os.environ.get(MANIFEST_OUTSIDE_ENV, "") == "1"
    path, name = _resolve(spec)
    files = _expand(path, allow_outside)
    formats = {file: fmt if fmt != "auto" else sniff(file) for file in files}
    if len(set(formats.values())) > 1:
        first, other = files[0], next(f for f in files if formats[f] != formats[files[0]])
        fail(spec, f"one set must use one format, but {first} is {formats[first]} and {other} is {formats[other]}")
    plans = READERS[formats[files[0]]](files)
    if not plans:
        fail(spec, f"no trajectories in {', '.join(str(f) for f in files)}")
    return TrajectorySet(name, plans, source=str(path))


def sniff(path: Path) -> str:
    """The format of one trace file, from its name (YAML) or its first JSON line."""
    if path.name.endswith(YAML_SUFFIXES):
        return "agentperf"
    first = first_json_line(path)
    if first is None:
        fail(str(path), "empty file, no trajectories")
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
    fail(spec[:MAX_PATH_CHARS] or "(empty)", f"no such trajectory file or folder, and not a bundled set ({names})")


def _expand(path: Path, allow_outside: bool) -> list[Path]:
    if path.is_dir():
        files = _trace_files(path)
        if not files:
            fail(str(path), f"no trajectory files ({', '.join('*' + s for s in TRACE_SUFFIXES)}) in folder")
        return files
    if path.suffix == ".json":
        return _manifest(path, allow_outside)
    return [path]


def _trace_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TRACE_SUFFIXES))


def _manifest(path: Path, allow_outside: bool) -> list[Path]:
    """Trace files listed by a manifest: AA's ``{"tasks": [{"trace": ...}]}``, ``{"traces": [...]}``
    or a plain list; paths are relative to the manifest, and inside its folder unless ``allow_outside``."""
    text = read_file_text(path, MAX_MANIFEST_BYTES, "a JSON manifest listing trace files")
    document = parse_json(text, str(path))
    if isinstance(document, dict) and isinstance(document.get("tasks"), list):
        entries = [task.get("trace") if isinstance(task, dict) else task for task in document["tasks"]]
    elif isinstance(document, dict):
        entries = document.get("traces")
    else:
        entries = document
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e for e in entries):
        fail(str(path), "a manifest must list trace files: tasks[].trace, traces: [...], or a list of paths; "
                        f"got {got(document)}")
    if len(entries) > MAX_MANIFEST_ENTRIES:
        fail(str(path), f"a manifest may list at most {MAX_MANIFEST_ENTRIES:,} trace files, got {len(entries):,}")
    folder = path.parent.resolve()
    files = []
    for entry in entries:
        if len(entry) > MAX_PATH_CHARS or "\0" in entry:
            fail(str(path), f"trace file {got(entry)} is not a usable path")
        file = path.parent / entry
        if not allow_outside and (Path(entry).is_absolute() or not file.resolve().is_relative_to(folder)):
            fail(str(path), f"trace file {got(entry)} is outside the manifest's folder {folder}; expected a path "
                            f"inside it (or set {MANIFEST_OUTSIDE_ENV}=1 to allow it)")
        if not file.is_file():
            fail(str(path), f"trace file {entry} does not exist ({file})")
        files.append(file)
    return files
