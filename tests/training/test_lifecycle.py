"""Status file and stop signals (mgrpo_cli/training/lifecycle.py); the end-to-end runs are in test_resume.py."""
import json
import os
import signal

import pytest

from mgrpo_cli.reporting import provenance
from mgrpo_cli.training.lifecycle import StopRequests, read_status, write_status


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
    from mgrpo_cli.cli.train import run_train
    from mgrpo_cli.training.module import MGRPOModule

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
    # what it was made with, recorded when it started: in its folder and as MLflow tags
    recorded = provenance.read(folder)
    assert {"torch", "transformers", "lightning"} <= set(recorded["packages"]) and recorded["resumes"] == []
    assert _mlflow(tmp_path / "mlflow.db")[1][(run_id, "provenance.commit")] == str(recorded["commit"])


def test_sweep_jobs_that_fail_before_loading_a_model_still_leave_a_failed_run(tmp_path):
    from conftest import run_cli

    res = run_cli("train", "-m", "model.path=/missing/a,/missing/b", "debug=fast", f"paths.outputs={tmp_path}",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 sweep jobs failed: #0 (model.path=/missing/a")
    runs, tags = _mlflow(tmp_path / "mlflow.db")
    jobs = [status for run, status, _, _ in runs if tags.get((run, "mgrpo.kind")) != "sweep"]  # not the parent
    assert jobs == ["FAILED", "FAILED"]
    for job, name in ((0, "a"), (1, "b")):
        status = read_status(tmp_path / "sweep" / str(job))
        assert status["status"] == "FAILED"
        assert status["error"].startswith(f"UserError: model.path=/missing/{name}: no such folder")
        assert tags[(status["mlflow_run_id"], "error")] == status["error"]


class _StubTrainer:
    """What StopAndCheckpoint uses of a Trainer: the step."""

    def __init__(self):
        self.global_step = 0


class _StubWriter:
    """What StopAndCheckpoint uses of a CheckpointWriter: ``save_last`` writes a step once."""

    def __init__(self):
        self.saved_step, self.saved, self.last = None, [], "last.ckpt"

    def save_last(self, trainer):
        if trainer.global_step != self.saved_step:
            self.saved.append(trainer.global_step)
            self.saved_step = trainer.global_step


def test_checkpoints_every_n_minutes_besides_the_step_checkpoints_and_at_the_end(monkeypatch, tmp_path):
    from mgrpo_cli.training import lifecycle

    clock = [0.0]
    monkeypatch.setattr(lifecycle.time, "monotonic", lambda: clock[0])
    writer = _StubWriter()
    cb = lifecycle.StopAndCheckpoint(StopRequests(), writer, every_minutes=1)
    trainer = _StubTrainer()
    cb.on_train_start(trainer, None)
    cb.requests.restore()
    # seconds at which steps 1..6 end; step 4 is StepCheckpoint's (it runs first), which restarts the clock
    for step, t in zip(range(1, 7), (30, 70, 100, 130, 180, 200), strict=True):
        trainer.global_step, clock[0] = step, t
        if step == 4:
            writer.save_last(trainer)
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    assert writer.saved == [2, 4, 6] and not cb.stop_pending
    cb.on_train_end(trainer, None)
    assert writer.saved == [2, 4, 6]  # the last step is in a checkpoint already
    trainer.global_step = 7
    cb.on_train_end(trainer, None)
    assert writer.saved == [2, 4, 6, 7]


def test_a_stop_request_checkpoints_that_step_and_leaves_before_the_next(tmp_path):
    from mgrpo_cli.training import lifecycle

    writer = _StubWriter()
    cb = lifecycle.StopAndCheckpoint(StopRequests(), writer)
    trainer = _StubTrainer()
    for step in (1, 2):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, None, None, step - 1)
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    assert writer.saved == []
    cb.requests.signum = signal.SIGTERM  # as the handler records it
    trainer.global_step = 3
    cb.on_train_batch_end(trainer, None, None, None, 2)
    assert writer.saved == [3] and cb.stop_pending
    cb.on_validation_start(trainer, None)  # a validation due at that step still runs
    with pytest.raises(lifecycle.StopRequested):
        cb.on_train_batch_start(trainer, None, None, 3)
    cb.requests.restore()
