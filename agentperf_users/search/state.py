"""The search's state file (``search.json``): one type, one writer (the live shape, after every judged
step), one reader (the report, ``agentperf capacity``'s exit code, ``agentperf report``, ``compare``).

Why a type of its own: the file is read by other processes, later, possibly from a run killed at any
moment or from an older version; read as a plain dict, a missing or mistyped field surfaced as a
``KeyError`` deep in the report. Here each field is checked once, on reading, into one line naming the
file and the field. Steps and capacities stay the dicts their own ``to_dict`` made (``shape.StepResult``,
``policy.TierCapacity``): the report reads them field by field as written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from agentperf_users import files
from agentperf_users.errors import AgentperfError


@dataclass(frozen=True)
class SearchState:
    run_id: str = ""
    slo: dict | None = None  # {"source", "tiers": [...]}: the tiers the search judged
    parameters: dict | None = None  # SearchParameters, as a dict
    steps: tuple[dict, ...] = ()  # every judged step (shape.StepResult.to_dict), in order
    capacity: dict[str, dict] | None = None  # tier -> policy.TierCapacity.to_dict
    complete: bool = False  # the search ended on its own (not interrupted, not stopped)
    interrupted: bool = False
    lost_workers: tuple[dict, ...] = ()
    stopped: dict | None = None  # why a failing server stopped the search (policy.SearchStopped)
    prediction: dict | None = None  # what the search started from (--predict: predicted.Prediction)

    @property
    def ended_unfinished(self) -> bool:
        """The search was cut short: it says so (a signal, the web UI's Stop), or it neither ended on its
        own nor stopped itself (a master killed before it could write its last word, by SIGKILL or the
        OOM killer, or by losing its parent and every worker at once, where which of them Locust hears
        first decides whether a last write happens). Judged from the file alone, so a report rebuilt
        from any run folder says the same."""
        return self.interrupted or (not self.complete and self.stopped is None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(steps=list(self.steps), lost_workers=list(self.lost_workers), capacity=self.capacity or {})
        return data

    def write(self, path: str | Path) -> None:
        """The whole file, atomically: a reader never sees half a state."""
        files.atomic_write(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: Any, where: str = files.SEARCH_FILE) -> SearchState:
        """A state from the file's JSON, each field of the type written (a missing one takes its default)."""
        if not isinstance(data, dict):
            raise AgentperfError(f"{where}: expected a JSON object, got {type(data).__name__}")
        expected = {"run_id": (str,), "slo": (dict, type(None)), "parameters": (dict, type(None)),
                    "steps": (list,), "capacity": (dict, type(None)), "complete": (bool,), "interrupted": (bool,),
                    "lost_workers": (list,), "stopped": (dict, type(None)), "prediction": (dict, type(None))}
        values = {}
        for field in fields(cls):
            if field.name not in data:
                continue
            value = data[field.name]
            if not isinstance(value, expected[field.name]):
                raise AgentperfError(f"{where}: {field.name}: expected "
                                     f"{' or '.join(t.__name__ for t in expected[field.name])}, got {type(value).__name__}")
            if field.name in ("steps", "lost_workers"):
                if not all(isinstance(item, dict) for item in value):
                    raise AgentperfError(f"{where}: {field.name}: expected a list of objects")
                value = tuple(value)
            values[field.name] = value
        return cls(**values)

    @classmethod
    def read(cls, folder: Path, missing_ok: bool = False) -> SearchState | None:
        """The folder's state; None where the file is missing and that is ok (the search never began)."""
        path = folder / files.SEARCH_FILE
        data = files.read_json_object(path, missing_ok, "missing (the search's state; was the search started?)")
        return None if data is None else cls.from_dict(data, str(path))
