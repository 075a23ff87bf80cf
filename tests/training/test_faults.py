"""Faults around a run, each with the real failure (issue: tracking outage, full disk, two processes on
one run folder; the truncated checkpoint is in test_resume.py): mgrpo_cli/training/runlock.py,
training/checkpointing.py, training/lifecycle.py, reporting/tracking.py, cli/train.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

FAST = ["debug=fast", "warmup.enabled=false"]


def _popen(log: Path, *args: str) -> subprocess.Popen:
    """``mgrpo <args>`` in its own process group, output to ``log``."""
    exe = Path(sys.executable).parent / "mgrpo"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", COLUMNS="120")
    return subprocess.Popen([str(exe), *args], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_a_second_process_on_a_run_folder_stops_at_once_and_a_requeue_after_death_works(tmp_path):
    from mgrpo_cli.training import runlock

    run = tmp_path / "run"
    first = _popen(tmp_path / "first.log", "train", *FAST, "logger=none", "trainer.max_steps=100000",
                   f"paths.outputs={tmp_path}", f"hydra.run.dir={run}")
    try:
        _wait_for(lambda: (run / ".hydra" / "config.yaml").is_file() and (run / "status.json").is_file(),
                  first, tmp_path / "first.log")
        for args in ([f"resume={run}"], [*FAST, "logger=none", f"paths.outputs={tmp_path}", f"hydra.run.dir={run}"]):
            started = time.monotonic()
            second = run_cli("train", *args, timeout=120)
            took = time.monotonic() - started
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            key = args[0].split("=")[0] if args[0].startswith("resume") else "hydra.run.dir"
            assert second.stderr.strip() == (f"error: {key}={run}: this run folder is in use by process {first.pid} "
                                             f"on {os.uname().nodename}; one mgrpo train runs in a folder at a time "
                                             f"(wait for it to end, or stop it)")
            assert "Traceback" not in second.stdout + second.stderr and took < 60
        assert first.poll() is None  # the holder trains on
        assert json.loads((run / "status.json").read_text())["status"] == "RUNNING"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # SIGKILL released the lock with the process (the stale file says nothing): a requeue takes it
    assert (run / runlock.LOCK).read_text().split()[0] == str(first.pid)
    assert runlock.lock(run, "resume")
    runlock.release(run)
    res = run_cli("train", f"resume={run}", "trainer.max_steps=1", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "FINISHED"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a checkpoint of debug=fast is 2.1 MB: the second one does not fit beside the first)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or made.returncode}): needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


FULL_DISK_RUN = [*FAST, "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.val_every=2"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_failed_status_no_temporary_files_and_resume_continues_exactly(small_disk, tmp_path):
    from safetensors.torch import load_file

    run = small_disk / "run"
    res = run_cli("train", *FULL_DISK_RUN, f"paths.outputs={small_disk}", f"hydra.run.dir={run}", timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on device writing {run / 'checkpoints' / 'last.ckpt'}"], res.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "FAILED" and status["error"] == f"DiskFull: {errors[0][len('error: '):]}"
    leftovers = [p.name for p in small_disk.rglob(".*") if p.is_file() and (".tmp" in p.name or ".status" in p.name)]
    assert leftovers == []
    assert (run / "checkpoints" / "last.ckpt").is_file()  # the first checkpoint is whole

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    res = run_cli("train", f"resume={run}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "FINISHED"

    reference = tmp_path / "reference"
    res = run_cli("train", *FULL_DISK_RUN, f"paths.outputs={reference}", f"hydra.run.dir={reference / 'run'}",
                  timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (run / "result.json").read_text() == (reference / "run" / "result.json").read_text()
    a, b = load_file(run / "export" / "model.safetensors"), load_file(reference / "run" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    import sqlite3

    with sqlite3.connect(small_disk / "mlflow.db") as con:  # the outbox sent the failed leg's record on resume
        assert [s for (s,) in con.execute("select status from runs")] == ["FINISHED"]
        steps = {s for (s,) in con.execute("select step from metrics where key = 'train/step_time'")}
    assert steps == set(range(4))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refusing_server():
    """An HTTP server on 127.0.0.1 that answers every request 403 (a proxy without the user's credentials)."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_error(403)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("which", ["unreachable", "refusing"])
def test_a_tracking_server_that_does_not_work_at_start_is_one_line_before_any_model_loads(tmp_path, which, request):
    uri = f"http://127.0.0.1:{_free_port()}" if which == "unreachable" else request.getfixturevalue("refusing_server")
    run = tmp_path / "run"
    started = time.monotonic()
    res = run_cli("train", *FAST, f"logger.tracking_uri={uri}", f"paths.outputs={tmp_path}", f"hydra.run.dir={run}",
                  timeout=300)
    took = time.monotonic() - started
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    why = "no answer (" if which == "unreachable" else "it refuses: HTTP 403 Forbidden"
    assert res.stderr.startswith(f"error: logger.tracking_uri={uri}: the tracking store does not work: {why}")
    assert res.stderr.rstrip().endswith("start it or fix the address, or train without tracking: logger=none")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stdout
    assert "policy:" not in res.stdout and "warm" not in res.stdout.lower()  # nothing loaded, no warm-up
    assert took < 240  # the old 255 s of retries; on an idle machine it is a few seconds of start-up
    from mgrpo_cli.reporting.tracking import TrackingUnavailable, check_reachable

    started = time.monotonic()
    with pytest.raises(TrackingUnavailable):
        check_reachable(uri)
    assert time.monotonic() - started < 10  # the check alone: no retries, no backoff
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "FAILED" and status["error"].startswith("UserError: logger.tracking_uri=")


def _outage(tmp_path: Path, *args: str) -> dict:
    """scripts/tracking_outage.py: two runs side by side on real mlflow servers, one server killed and
    (maybe) started again mid-run; its JSON report."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "tracking_outage.py"), "--out", str(tmp_path), *args,
                          "warmup.enabled=false", "trainer.checkpoint_every=4", "trainer.val_every=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.slow
def test_a_tracking_server_killed_and_restarted_mid_run_neither_slows_nor_stops_it(tmp_path):
    report = _outage(tmp_path, "--steps", "16", "--kill-at", "3", "--restart-at", "10")
    assert [e[0] for e in report["events"]] == ["killed", "restarted"], report
    assert report["exit"] == {"calm": 0, "troubled": 0}, report
    assert report["status_json"] == {"calm": "FINISHED", "troubled": "FINISHED"}
    calm, troubled = report["mlflow"]["calm"], report["mlflow"]["troubled"]
    assert troubled == calm and troubled["runs"] == ["FINISHED"] and troubled["steps"] == 16, report
    paused = [line for line in report["tracking_lines"] if "tracking paused" in line]
    resumed = [line for line in report["tracking_lines"] if "tracking resumed" in line]
    assert len(paused) == 1 and len(resumed) == 1, report["tracking_lines"]
    assert report["seconds"]["troubled"] < 1.5 * report["seconds"]["calm"], report["seconds"]


@pytest.mark.slow
def test_a_tracking_server_that_never_returns_ends_finished_on_disk_and_mgrpo_sync_sends_the_rest(tmp_path):
    report = _outage(tmp_path, "--steps", "8", "--kill-at", "2", "--restart-at", "0")
    assert report["exit"] == {"calm": 0, "troubled": 0} and report["status_json"]["troubled"] == "FINISHED", report
    (unsent,) = [line for line in report["tracking_lines"] if "not sent" in line]
    assert "the run's end: FINISHED" in unsent and f"mgrpo sync {tmp_path / 'troubled' / 'run'}" in unsent
    assert report["sync"]["exit"] == 0 and "sent" in report["sync"]["output"], report["sync"]
    calm, troubled = report["mlflow"]["calm"], report["mlflow"]["troubled"]
    assert troubled == calm and troubled["runs"] == ["FINISHED"] and troubled["steps"] == 8, report
