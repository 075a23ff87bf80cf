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


def _mlflow(db):
    import sqlite3

    with sqlite3.connect(db) as con:
        runs = con.execute("select run_uuid, status, start_time, end_time from runs").fetchall()
        tags = {(r, k): v for r, k, v in con.execute("select run_uuid, key, value from tags")}
    return runs, tags


def test_a_run_that_raised_is_failed_in_mlflow_and_in_its_status_file(small_cfg, tmp_path, monkeypatch):
    from mgrpo_cli.module import MGRPOModule
    from mgrpo_cli.train import run_train

    def broken_step(self, batch, batch_idx):
        raise RuntimeError("boom\nmore detail")

    monkeypatch.setattr(MGRPOModule, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(small_cfg("logger.enabled=true", "layer=grpo"))
    (run_id, status, start, end), = _mlflow(tmp_path / "mlflow.db")[0]
    assert status == "FAILED" and end >= start
    assert _mlflow(tmp_path / "mlflow.db")[1][(run_id, "error")] == "RuntimeError: boom"
    (folder,) = (tmp_path / "train" / "runs").iterdir()
    assert read_status(folder) == {"status": "FAILED", "error": "RuntimeError: boom", "mlflow_run_id": run_id}


def test_sweep_jobs_that_fail_before_loading_a_model_still_leave_a_failed_run(tmp_path):
    from conftest import run_cli

    res = run_cli("train", "-m", "model.path=/missing/a,/missing/b", "debug=fast", f"paths.outputs={tmp_path}",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 sweep jobs failed: #0 (model.path=/missing/a")
    runs, tags = _mlflow(tmp_path / "mlflow.db")
    assert sorted(status for _, status, _, _ in runs) == ["FAILED", "FAILED"]
    for job, name in ((0, "a"), (1, "b")):
        status = read_status(tmp_path / "sweep" / str(job))
        assert status["status"] == "FAILED"
        assert status["error"].startswith(f"UserError: model.path=/missing/{name}: no such folder")
        assert tags[(status["mlflow_run_id"], "error")] == status["error"]
