"""Status file and stop signals (mgrpo_cli/lifecycle.py); the end-to-end runs are in test_resume.py."""
import json
import os
import signal

import pytest

from mgrpo_cli.lifecycle import StopRequests, read_status, write_status


def test_status_file_round_trip_and_bad_status(tmp_path):
    assert read_status(tmp_path) is None
    write_status(tmp_path, "RUNNING", mlflow_run_id="abc")
    write_status(tmp_path, "FAILED", "model.path=/x: no such folder", "abc")
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "status": "FAILED", "error": "model.path=/x: no such folder", "mlflow_run_id": "abc"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left
    with pytest.raises(ValueError, match="DONE"):
        write_status(tmp_path, "DONE")


def test_stop_signals_are_recorded_and_a_second_ctrl_c_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    requests = StopRequests()
    requests.install()
    try:
        assert not requests.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert requests.requested and requests.name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal keeps the first one's name
        assert requests.name == "SIGUSR1" and not requests.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert requests.interrupted
    finally:
        requests.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_first_ctrl_c_only_asks_to_stop():
    requests = StopRequests()
    requests.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.name == "SIGINT" and not requests.interrupted
    finally:
        requests.restore()
