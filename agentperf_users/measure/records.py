"""One exact record per request, and the per-process file that keeps them.

Every number an SLO verdict uses comes from these records, never from Locust's bucketed response
times. Each process appends its records to its own JSONL file as they complete, flushed per record, so
a killed process loses at most the request in flight; the master's file also keeps a copy of every record
its workers reported. After a run the report is recomputed from the union of those files and must equal
what the live verdict saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from agentperf_users.client.outcome import Status
from agentperf_users.errors import AgentperfError

RECORD_FILE_PATTERN = "records-*.jsonl"


@dataclass(frozen=True)
class RequestRecord:
    """Everything measured about one request. Times ending ``_epoch_s`` are wall clock (comparable
    across hosts only as far as their clocks agree); durations ending ``_s`` come from the monotonic
    clock of the process that measured them. ``None`` means "not reached" (e.g. no first token)."""

    run_id: str
    worker_id: str
    agent: int  # global agent index across all workers
    trajectory: str  # trajectory id (with the cache-namespace suffix when the set wrapped around)
    turn: int  # 0-based turn index within the trajectory
    load_step: int  # the load step (agent-count level) that was active when the request started
    scheduled_start_epoch_s: float  # when the agent meant to send it (previous end + tool wait)
    start_epoch_s: float  # when it was actually sent
    end_epoch_s: float  # when the last byte arrived (or the request failed)
    ttfb_s: float | None  # time to the first response byte
    ttft_s: float | None  # time to the first chunk carrying content, reasoning or tool-call text
    e2e_s: float  # send to end
    itl_p50_s: float | None  # inter-token gaps (between content-carrying chunks)
    itl_p95_s: float | None
    itl_max_s: float | None
    output_tokens: int
    output_tokens_estimated: bool  # True when no usage arrived and chunks were counted instead
    prompt_tokens: int | None
    cached_tokens: int | None
    output_tps: float | None  # (output_tokens - 1) / (last token time - first token time)
    status: Status
    message: str = ""  # short, redacted: never contains an API key or the request body
    # The agent's first request after it joined the load step: the whole conversation so far, nothing of
    # it cached anywhere. Not a steady-state request: windows never judge it (``slo.records_in_window``).
    cold_join: bool = False
    # agentperf's own count of the prompt it sent (``tokens.count_prompt_tokens``: what a twin's profile is
    # priced in), beside the server's ``prompt_tokens``: their ratio is the server's tokens per agentperf
    # token, which ``calibrate --from-run`` needs. None in records written before it was kept.
    counted_prompt_tokens: int | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "RequestRecord":
        return cls(**{**data, "status": Status(data["status"])})

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class RecordWriter:
    """Appends records to ``<directory>/records-<process_id>.jsonl``, one flushed line per record."""

    def __init__(self, directory: str | os.PathLike, process_id: str) -> None:
        self.path = Path(directory) / f"records-{process_id}.jsonl"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise AgentperfError(f"{self.path}: cannot open the records file: {exc.strerror}") from None

    def write(self, record: RequestRecord) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(paths: Iterable[str | os.PathLike]) -> list[RequestRecord]:
    """Records from JSONL files (or folders of ``records-*.jsonl``), each request once: the master's file
    holds a copy of what its workers reported, beside their own files where those are on the same disk
    (records are equal field for field: floats survive JSON exactly). A torn last line, as a killed
    process may leave, is skipped; any other malformed line is a one-line error."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.glob(RECORD_FILE_PATTERN)) if path.is_dir() else [path])
    records = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentperfError(f"{file}: cannot read the records file ({exc})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(RequestRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                if number == len(lines) and not line.endswith("}"):
                    continue  # torn final write of a killed process
                raise AgentperfError(f"{file}:{number}: not a request record ({exc})") from None
    return list(dict.fromkeys(records))


class RecordLog:
    """Where an agent's records go in one process: its own file first (the source of truth that
    survives a killed process), then a buffer that aggregation drains towards the master."""

    def __init__(self, writer: RecordWriter | None) -> None:
        self._writer = writer
        self._pending: list[RequestRecord] = []
        self._in_flight: dict[object, float] = {}  # ticket -> when its request began (epoch seconds)

    @property
    def path(self) -> Path | None:
        return self._writer.path if self._writer else None

    def begin(self, epoch_s: float) -> object:
        """A request is in flight from ``epoch_s`` on: until ``add(record, ticket)`` (or ``end(ticket)``), no
        time after it counts as covered, however long the agent's greenlet waits to add the record."""
        ticket = object()
        self._in_flight[ticket] = epoch_s
        return ticket

    def progress(self, ticket: object, epoch_s: float) -> None:
        """The request of ``ticket`` cannot end before ``epoch_s`` (the arrival of what it has read so far,
        ``ChatStreamClient.post``'s ``progress``): coverage may pass its start. Without this a request in
        flight held coverage at its start until it ended, so a window was known complete only once every
        request streaming across its end had ended; at loads where requests run for 20 s that took past
        ``shape.COVERAGE_TIMEOUT_S``, and steps were judged on whatever had arrived by then."""
        began = self._in_flight.get(ticket)
        if began is not None and epoch_s > began:
            self._in_flight[ticket] = epoch_s

    def end(self, ticket: object) -> None:
        self._in_flight.pop(ticket, None)

    def add(self, record: RequestRecord, ticket: object = None) -> None:
        if self._writer:
            self._writer.write(record)
        self._pending.append(record)
        self._in_flight.pop(ticket, None)

    def covered_until(self, now_epoch_s: float, grace_s: float) -> float:
        """Every request that ended before the time returned has its record here (drained or pending): one
        not added yet is in flight, and ends at or after its start or its last ``progress``. ``grace_s`` covers records added
        without a ticket (within that long of their end)."""
        return min([now_epoch_s - grace_s, *self._in_flight.values()])

    def keep(self, records: Iterable[RequestRecord]) -> None:
        """Other processes' records, received here: written to this process's file only (never drained).
        The master keeps what its workers report, so a run whose workers are on other hosts, or lose their
        disk with their pod, still has every reported record on the master's."""
        if self._writer:
            for record in records:
                self._writer.write(record)

    def drain(self) -> list[RequestRecord]:
        """The records added since the last drain (each record is drained exactly once)."""
        pending, self._pending = self._pending, []
        return pending

    def close(self) -> None:
        if self._writer:
            self._writer.close()
