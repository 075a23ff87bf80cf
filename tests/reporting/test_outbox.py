"""The run folder's outbox (mgrpo_cli/reporting/outbox.py): in order, paused and resumed with one line
each, kept across processes, refused operations dropped, a full disk kept in memory. The real server
killed and restarted mid-run is in tests/training/test_faults.py."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest

from mgrpo_cli.reporting import outbox
from mgrpo_cli.reporting.outbox import Outbox, send_all


class _Store:
    """A sender whose store can be down (no answer) or refuse one kind of value."""

    def __init__(self):
        self.got, self.down, self.refuse = [], threading.Event(), None

    def send(self, ops):
        for op in ops:
            if self.down.is_set():
                raise ConnectionError("Connection refused")
            if op.get("metrics", {}).get("x") == self.refuse:
                error = RuntimeError("INVALID_PARAMETER_VALUE: bad value")
                error.error_code = "INVALID_PARAMETER_VALUE"
                raise error
            self.got.append(op["step"])


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_S", (0.05,))


def _op(step: int, x: float = 1.0) -> dict:
    return {"op": "metrics", "run": "r", "metrics": {"x": x}, "step": step, "ts": step}


def test_an_outage_pauses_with_one_line_and_everything_arrives_in_order(tmp_path, caplog):
    store, box = _Store(), Outbox(tmp_path, "http://store")
    box.start(store)
    with caplog.at_level(logging.WARNING):
        box.put(_op(0))
        assert box.wait_sent(5)
        store.down.set()
        for step in range(1, 50):
            box.put(_op(step))  # never waits for the store
        assert not box.wait_sent(0.3) and box.paused
        store.down.clear()
        assert box.wait_sent(5)
        assert box.close() == []
    assert store.got == list(range(50))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("tracking paused: http://store does not answer (Connection refused)")
    assert lines[1].startswith("tracking resumed")


def test_what_a_process_left_unsent_is_sent_by_mgrpo_sync_into_a_real_store(tmp_path):
    from mgrpo_cli.reporting import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run = client.create_run(client.create_experiment("e")).info.run_id
    store = _Store()
    store.down.set()
    box = Outbox(tmp_path / "run", uri)
    box.start(store)
    for step in range(5):
        box.put({**_op(step), "run": run})
    box.put({"op": "end", "run": run, "status": "FINISHED", "ts": 10})
    assert len(box.close(timeout=0.2)) == 6  # kept on disk
    with open(tmp_path / "run" / outbox.FOLDER / outbox.OUTBOX, "ab") as f:
        f.write(b'{"op":"metr')  # a line cut short by a crash: skipped
    assert send_all(tmp_path / "run", tracking.client) == (6, 0, uri)
    assert [m.step for m in client.get_metric_history(run, "x")] == list(range(5))
    assert client.get_run(run).info.status == "FINISHED"
    assert send_all(tmp_path / "run", tracking.client) == (0, 0, uri)  # nothing twice


def test_a_refused_operation_is_dropped_and_the_rest_goes(tmp_path, caplog):
    store, box = _Store(), Outbox(tmp_path, "http://store")
    store.refuse = -1.0
    box.start(store)
    with caplog.at_level(logging.WARNING):
        for step in range(6):
            box.put(_op(step, -1.0 if step == 3 else 1.0))
        assert box.wait_sent(5)
        box.close()
    # the batch is tried whole, then one by one (sending twice changes nothing in MLflow)
    assert list(dict.fromkeys(store.got)) == [0, 1, 2, 4, 5] and box.dropped == 1
    assert [r.getMessage() for r in caplog.records] == [
        "tracking: MLflow refused a metrics operation (INVALID_PARAMETER_VALUE: bad value); it is dropped"]


def test_a_full_disk_keeps_the_operations_in_memory_in_order(tmp_path, monkeypatch):
    store, box = _Store(), Outbox(tmp_path, "http://store")
    store.down.set()
    box.start(store)
    box.put(_op(0))
    real_write = os.write

    def full(fd, data):
        if fd == box._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    box.put(_op(1))
    box.put(_op(2))
    monkeypatch.setattr(os, "write", real_write)
    box.put(_op(3))  # memory from then on: the order holds
    assert (tmp_path / outbox.FOLDER / outbox.OUTBOX).read_bytes().count(b"\n") == 1
    store.down.clear()
    deadline = time.monotonic() + 5
    while len(store.got) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert box.close() == [] and store.got == [0, 1, 2, 3] and box.lost == 0


def test_mgrpo_sync_of_a_folder_without_an_outbox_is_one_line(tmp_path, capsys):
    from mgrpo_cli.cli import sync

    with pytest.raises(SystemExit) as stopped:
        sync.main([str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}: not the folder of a run that logs to MLflow "
                                       f"(no tracking/target.json)\n")
