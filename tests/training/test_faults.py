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
