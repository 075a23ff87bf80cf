"""What a run sends to MLflow, kept in its run folder until the store has it.

Training never waits for the tracking store. Every metric, param, tag, artifact and status change of
a run is one line (a JSON object, an *operation*) appended to ``<run>/tracking/outbox.jsonl``, and a
background thread sends the lines in order to the store of ``<run>/tracking/target.json``, recording
how far it got in ``<run>/tracking/sent`` (a byte offset). The file is written by the process at
once (a SIGKILL loses nothing logged; ``sync_to_disk`` makes it survive a machine crash too, and the
run does it at every checkpoint), and its memory cost is nil however long the store is away.

When the store does not answer (a tracking server stopped or unreachable), the thread logs one
warning line (tracking paused), keeps trying every few seconds, and when the store answers again
sends everything kept, in order, and says so in one line. An operation the store refuses (a value
MLflow rejects) is dropped with a warning, so one bad value cannot hold back the rest. Sending is
idempotent (a metric carries the time it was logged, artifacts are whole files, the samples table is
the whole table), so an operation sent twice, by a process killed before it recorded the offset,
changes nothing.

What is still unsent when the command ends is sent by the next ``resume=`` of the run, or by
``mgrpo sync <run folder>`` (:func:`send_all`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

FOLDER = "tracking"
OUTBOX = "outbox.jsonl"
SENT = "sent"
TARGET = "target.json"
# errors MLflow answers for an operation it will never accept: drop it, do not retry
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
           "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED"}
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits
RETRY_S = (1, 2, 5, 10)  # waits between tries while the store does not answer


def now_ms() -> int:
    return int(time.time() * 1000)


def refused(error: BaseException) -> bool:
    """Whether the store answered and refused the operation (vs. did not answer)."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError)):
        return True  # an artifact whose file is gone
    return getattr(error, "error_code", None) in REFUSED


class Sender:
    """Sends operations to one MLflow store (``client`` is an ``MlflowClient``)."""

    def __init__(self, client):
        self.client = client

    def send(self, ops: list[dict[str, Any]]) -> None:
        """Send ``ops`` in order; consecutive metric operations of a run go as one ``log_batch``."""
        from mlflow.entities import Metric

        i = 0
        while i < len(ops):
            op = ops[i]
            if op["op"] == "metrics":
                batch = []
                while i < len(ops) and ops[i]["op"] == "metrics" and ops[i]["run"] == op["run"] \
                        and len(batch) + len(ops[i]["metrics"]) <= MAX_METRICS:
                    batch += [Metric(k, v, ops[i]["ts"], ops[i]["step"]) for k, v in ops[i]["metrics"].items()]
                    i += 1
                if not batch:  # one operation above the limit
                    batch = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
                    i += 1
                for start in range(0, len(batch), MAX_METRICS):
                    self.client.log_batch(op["run"], metrics=batch[start:start + MAX_METRICS], synchronous=True)
                continue
            self.one(op)
            i += 1

    def one(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        run, kind, c = op["run"], op["op"], self.client
        if kind == "params":
            items = [Param(k, v) for k, v in op["params"].items()]
            for start in range(0, len(items), MAX_PARAMS):
                c.log_batch(run, params=items[start:start + MAX_PARAMS], synchronous=True)
        elif kind == "tags":
            items = [RunTag(k, v) for k, v in op["tags"].items()]
            for start in range(0, len(items), MAX_TAGS):
                c.log_batch(run, tags=items[start:start + MAX_TAGS], synchronous=True)
        elif kind == "text":
            c.log_text(run, op["text"], op["file"])
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                c.log_artifacts(run, str(path), op.get("dir"))
            elif path.is_file():
                c.log_artifact(run, str(path), op.get("dir"))
            else:
                raise FileNotFoundError(f"{path} is gone")
        elif kind == "table":
            self._table(op)
        elif kind == "status":
            c.update_run(run, status=op["status"])
        elif kind == "end":
            c.set_terminated(run, op["status"], end_time=op["ts"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _table(self, op: dict[str, Any]) -> None:
        """The whole local table file as the run's table artifact, listed as a table (what
        ``MlflowClient.log_table`` does, without its download-and-append)."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        path = Path(op["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path} is gone")
        folder = os.path.dirname(op["file"]) or None
        self.client.log_artifact(op["run"], str(path), folder)
        listed = json.loads(self.client.get_run(op["run"]).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": op["file"], "type": "table"}
        if entry not in listed:
            self.client.set_tag(op["run"], MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))


class Outbox:
    """The operations of the run folder ``folder`` (see the module docstring). ``put`` appends one;
    ``start`` begins sending in the background; ``close`` waits for the rest a bounded time."""

    def __init__(self, folder: str | Path, uri: str):
        self.folder = Path(folder) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.path = self.folder / OUTBOX
        target = self.folder / TARGET
        if not target.is_file() or json.loads(target.read_text()).get("uri") != uri:
            target.write_text(json.dumps({"uri": uri}) + "\n")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._memory: list[dict[str, Any]] = []  # what a full disk kept out of the file, in order
        self._memory_sent = 0
        if os.fstat(self._fd).st_size and not _ends_a_line(self.path):
            os.write(self._fd, b"\n")  # a line cut short by a crash stays a line of its own (skipped)
        self._sent = os.open(self.folder / SENT, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._closing = self._stopped = False
        self.lost = 0
        self._thread: Optional[threading.Thread] = None
        self.paused = False
        self.dropped = 0

    # ---- the producer side (the training process's thread)

    def put(self, op: dict[str, Any]) -> None:
        """Append ``op`` to the file (in the OS's hands at once: a SIGKILL of this process loses nothing);
        on a full disk, to memory, from then on, still sent in order."""
        line = (json.dumps(op, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if not self._memory and not self._stopped:
                size = os.fstat(self._fd).st_size
                try:
                    if os.write(self._fd, line) == len(line):
                        line = b""
                except OSError:
                    pass
                if line:  # the disk is full: no half line stays behind
                    os.ftruncate(self._fd, size)
            if line:
                self._memory.append(op)
        with self._wake:
            self._wake.notify()

    def sync_to_disk(self) -> None:
        with self._lock:
            if not self._stopped:
                os.fsync(self._fd)

    # ---- the sending side

    def sent_offset(self) -> int:
        try:
            return int(os.pread(self._sent, 64, 0).decode().strip() or 0)
        except ValueError:
            return 0

    def _record_sent(self, offset: int) -> None:
        with self._lock:
            if not self._stopped:
                os.pwrite(self._sent, f"{offset:>20}\n".encode(), 0)  # in place, fixed width: no new block

    def wait_sent(self, timeout: float) -> bool:
        """Whether everything put so far was sent within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.sent_offset() < self.path.stat().st_size:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def unsent(self) -> list[dict[str, Any]]:
        return [op for op, _ in _read(self.path, self.sent_offset())]

    def start(self, sender: Sender) -> None:
        self._thread = threading.Thread(target=self._run, args=(sender,), name="mgrpo-tracking", daemon=True)
        self._thread.start()

    def _run(self, sender: Sender) -> None:
        offset, tries = self.sent_offset(), 0
        while not self._stopped:
            batch = list(_read(self.path, offset, limit=MAX_METRICS))
            if not batch and self._memory_sent < len(self._memory):
                if self._send_memory(sender):
                    continue
                tries += 1
                with self._wake:
                    self._wake.wait(timeout=RETRY_S[min(tries, len(RETRY_S)) - 1])
                continue
            if not batch:
                with self._wake:
                    if self._closing:
                        return
                    self._wake.wait(timeout=1.0)
                continue
            ops = [op for op, _ in batch]
            try:
                sender.send(ops)
            except Exception as e:
                if refused(e):  # find and drop the refused operation: send them one by one
                    offset, _ = self._send_one_by_one(sender, batch, offset)
                    continue
                tries += 1
                if not self.paused:
                    self.paused = True
                    log.warning("tracking paused: %s does not answer (%s); training goes on, and what it logs "
                                "is kept in %s and sent when the store answers again", self.uri, first_line(e), self.path)
                with self._wake:
                    self._wake.wait(timeout=RETRY_S[min(tries, len(RETRY_S)) - 1])
                continue
            offset = batch[-1][1]
            self._record_sent(offset)
            if self.paused:
                self.paused, tries = False, 0
                log.warning("tracking resumed: %s answers again; what was kept has been sent", self.uri)

    def _send_memory(self, sender: Sender) -> bool:
        """Send what a full disk kept in memory; whether all of it went."""
        while self._memory_sent < len(self._memory):
            op = self._memory[self._memory_sent]
            try:
                sender.send([op])
            except Exception as e:
                if not refused(e):
                    return False
                self.dropped += 1
            self._memory_sent += 1
        return True

    def _send_one_by_one(self, sender: Sender, batch: list[tuple[dict, int]],
                         offset: int) -> tuple[int, Optional[Exception]]:
        """Send ``batch`` one operation at a time, dropping those the store refuses: (the offset reached,
        the error that stopped it when the store stopped answering)."""
        for op, end in batch:
            try:
                sender.send([op])
            except Exception as e:
                if not refused(e):
                    return offset, e
                self.dropped += 1
                log.warning("tracking: MLflow refused a %s operation (%s); it is dropped", op["op"], first_line(e))
            offset = end
            self._record_sent(offset)
        return offset, None

    def close(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Stop sending once everything is sent or ``timeout`` seconds have passed; the operations still
        unsent: kept in the outbox for ``resume=`` or ``mgrpo sync``, but for the last ``lost`` of them,
        which a full disk kept in memory only."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._stopped = True  # a send still under way records nothing after this
            os.close(self._fd)
            self.lost = len(self._memory) - self._memory_sent
            unsent = self.unsent() + self._memory[self._memory_sent:]
            os.close(self._sent)
        return unsent


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def first_line(error: BaseException) -> str:
    """The error's first line, cut to 160 characters (for the one-line warnings)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:160]


def _read(path: Path, offset: int, limit: Optional[int] = None) -> Iterator[tuple[dict[str, Any], int]]:
    """(operation, offset after it) of the whole lines of ``path`` from byte ``offset``."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        n = 0
        for line in f:
            if not line.endswith(b"\n"):
                return  # being written
            offset += len(line)
            try:
                op = json.loads(line)
            except ValueError:
                continue  # a line cut by a full disk: nothing to send
            yield op, offset
            n += 1
            if limit is not None and n >= limit:
                return


def target_uri(run_folder: str | Path) -> str:
    """The tracking store the run folder's outbox sends to."""
    return json.loads((Path(run_folder) / FOLDER / TARGET).read_text())["uri"]


def send_all(run_folder: str | Path, client_for) -> tuple[int, int, str]:
    """Send what the run folder's outbox holds unsent, now, in order (``mgrpo sync``): (operations sent,
    operations the store refused, the store's address). ``client_for(uri)`` makes the store's client. When
    the store does not answer, what was sent is recorded and the error raised."""
    uri = target_uri(run_folder)
    box = Outbox(run_folder, uri)
    try:
        sender = Sender(client_for(uri))
        offset, count = box.sent_offset(), 0
        while batch := list(_read(box.path, offset, limit=MAX_METRICS)):
            try:
                sender.send([op for op, _ in batch])
            except Exception as e:
                if not refused(e):
                    raise
                offset, error = box._send_one_by_one(sender, batch, offset)
                if error is not None:
                    raise error from None
            else:
                offset = batch[-1][1]
                box._record_sent(offset)
            count += len(batch)
        return count - box.dropped, box.dropped, uri
    finally:
        box.close(timeout=0)
