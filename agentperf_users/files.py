"""The run folder: its names, how it is claimed, and how every file in it is written.

A run may be stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, a lost pod), and a later
``agentperf report`` rebuilds the report from what the folder holds, so each file the run writes whole
(the search's state, the report, the run's context) is written to a temporary name beside it and renamed
into place: a reader sees the old version or the new one, never half of one. The request-record and
power files are append-only logs of one line per entry instead (their readers skip a torn last line).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

from agentperf_users.errors import AgentperfError

PARTIAL_SUFFIX = ".partial"  # a temporary file's suffix: what a run killed mid-write may leave behind
RUNS_ROOT = Path("agentperf-runs")
SEARCH_FILE = "search.json"  # the search's state, rewritten after every judged step (the shape's)
CONTEXT_FILE = "run.json"  # the run's context (target, power, ground truth): agentperf capacity's
RECORDS_DIR = "records"  # the per-process record files
# What makes a folder a run's: reusing it would merge an old run's records into the new one.
RUN_MARKERS = (RECORDS_DIR, "records.jsonl", SEARCH_FILE, CONTEXT_FILE, "report.json", "power.jsonl",
               "server_metrics.jsonl", "locust.log")


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename. The temporary name is unique to this write (process
    and a random token), so two writers of the same file never share a half-written one; it is created
    as ``open`` creates files (the umask's permissions, where ``mkstemp`` would make it private). No
    fsync: the runs this guards against are killed processes, not lost power."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def new_run_folder(root: Path = RUNS_ROOT, now: datetime | None = None) -> Path:
    """A fresh folder named by the start time to the second (so the folders sort in run order), with
    ``-2``, ``-3``, … when that name is taken: ``mkdir`` either creates the folder or fails, so two runs
    started in the same second, even in two processes, never share one."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentperfError(f"{root}: cannot create the runs folder: {exc.strerror}") from None
    for attempt in range(1, 1000):
        folder = root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as exc:
            raise AgentperfError(f"{folder}: cannot create the run folder: {exc.strerror}") from None
    raise AgentperfError(f"{root}: 999 run folders named {stamp}* already exist")


def claim_run_folder(path: Path) -> Path:
    """``--out``: a new or empty folder, or one without a run's files. A folder that holds an earlier
    run's records is refused rather than reused: its records would be read as this run's."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentperfError(f"--out {path}: cannot create the run folder: {exc.strerror}") from None
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    if found:
        raise AgentperfError(f"--out {path}: already holds a run ({', '.join(found)}); expected a new or empty folder")
    return path


def read_json_object(path: Path, missing_ok: bool, missing: str = "missing") -> dict | None:
    """A whole-file JSON object of the run folder, or one line saying why not (None where the file is
    missing and that is ok). ``missing`` says what a missing file means."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise AgentperfError(f"{path}: {missing}") from None
    except OSError as exc:
        raise AgentperfError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentperfError(f"{path}: not valid JSON ({exc}); the file is torn or not a run's") from None
    if not isinstance(data, dict):
        raise AgentperfError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
